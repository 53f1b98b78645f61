"""The chaos run, bounded for CI: `tools/chaos.py` for a short while, then its figures.

While three clients put, get, attend and move blocks, the daemon and its CSD workers are
killed with SIGKILL, bytes are flipped in the NVMe and CSD files and the disk fills up;
the checker compares every answer with what was committed. Every kind of fault must have
been injected, no answer served as success may be wrong, and no block a move made durable
(and no flip touched) may be missing after a clean restart.

The tool runs as a subprocess in its own session, so a run that outlives its deadline is
killed whole (daemon and workers with it); its mount and segments are removed here then.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tierd.tiers.host import segments_of

TOOL = Path(__file__).resolve().parents[2] / "tools" / "chaos.py"
SECONDS = float(os.environ.get("TIERD_CHAOS_SECONDS", "20"))
# A ceiling for a run that hangs, not its expected length (about SECONDS + 15 s): the
# faults may run to 3 x SECONDS, and the restarts and the final check have their own bounds.
DEADLINE_S = 3 * SECONDS + 240

pytestmark = pytest.mark.slow


def _cleanup_after_kill(run: Path) -> None:
    mnt = run / "mnt"
    for seg in segments_of(mnt / "data"):
        seg.unlink(missing_ok=True)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_chaos_run_answers_nothing_wrong_and_loses_no_durable_block() -> None:
    if os.geteuid() != 0:
        pytest.skip("the chaos run mounts a small tmpfs: it needs root")
    base = Path(tempfile.mkdtemp(prefix="tchaos-"))  # short: unix socket paths
    out, run = base / "figures.json", base / "run"
    cmd = [sys.executable, str(TOOL), "--seconds", str(SECONDS), "--seed", "1",
           "--clients", "3", "--json", str(out), "--base", str(run)]  # fmt: skip
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        try:
            printed, _ = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            printed, _ = proc.communicate()
            _cleanup_after_kill(run)
            pytest.fail(f"the chaos run did not end within {DEADLINE_S:.0f}s:\n{printed[-8000:]}")
        log = (run / "tierd.log").read_text(errors="replace")[-6000:] if run.exists() else ""
        shown = f"{printed[-8000:]}\n---- daemon log (end) ----\n{log}"
        assert proc.returncode in (0, 1) and out.exists(), f"the rig failed:\n{shown}"
        fig = json.loads(out.read_text())
        print(printed)  # the figures, for `pytest -s` or a report
    finally:
        shutil.rmtree(base, ignore_errors=True)

    assert not fig.get("aborted"), shown
    assert all(fig["calls"][op] > 0 for op in ("put", "get", "attend", "move")), shown
    missing = [kind for kind, n in fig["faults"].items() if n == 0]
    assert not missing, f"faults never injected: {missing}\n{shown}"
    assert fig["answers_checked"].get("get_blocks", 0) > 0, shown
    assert fig["answers_checked"].get("attends", 0) > 0, shown
    assert fig["wrong"] == 0, f"wrong answers served as success:\n{shown}"
    assert fig["required"] > 0 and fig["unanswered_at_end"] == 0, shown
    assert fig["lost"] == 0, f"committed blocks lost on durable tiers:\n{shown}"
    assert proc.returncode == 0, shown
