"""tools/vllm_env.sh: a failed first install removes only what the script itself made."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "vllm_env.sh"
# A stand-in for python3 whose venv's pip fails at once: the install fails as on a full
# disk or a registry error, with nothing downloaded.
FAKE_PY = """#!/bin/sh
[ "$1 $2" = "-m venv" ] || exit 2
mkdir -p "$3/bin"
printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/python"
printf '#!/bin/sh\\necho "$@" >> "$(dirname "$0")/../pip-calls"\\nexit 1\\n' > "$3/bin/pip"
chmod +x "$3/bin/python" "$3/bin/pip"
"""


def _run(tmp_path: Path, venv: Path) -> subprocess.CompletedProcess[str]:
    if shutil.disk_usage(tmp_path).free < 8 << 30:
        pytest.skip("the script refuses to start with under 8 GiB free")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "TIERD_VLLM_VENV": str(venv),
           "TMPDIR": str(tmp_path)}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def test_a_failed_install_into_an_existing_directory_leaves_its_files(tmp_path: Path) -> None:
    venv = tmp_path / "tools"
    venv.mkdir()
    (venv / "mine.txt").write_text("not the script's")
    out = _run(tmp_path, venv)
    assert out.returncode != 0
    assert (venv / "mine.txt").read_text() == "not the script's"


def test_a_failed_first_install_removes_its_venv_and_so_does_a_retry(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert _run(tmp_path, venv).returncode != 0
    assert not venv.exists()
    # A run killed mid-install leaves its half-made venv: the next failed run removes it.
    made = subprocess.run([str(tmp_path / "python3"), "-m", "venv", str(venv)], check=True)
    assert made.returncode == 0
    (venv / ".tierd-vllm-partial").touch()
    assert _run(tmp_path, venv).returncode != 0
    assert not venv.exists()
