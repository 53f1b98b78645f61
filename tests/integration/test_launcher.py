"""Workers forked from a `WorkerLauncher`: they start with torch and transformers imported
and the launcher's objects frozen, run a model mapped from tierd with the logits of the
model loaded locally, and one process cannot have two launchers that disagree."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.conftest import DaemonProcess
from tests.integration.test_models import _tiny_llama
from tierd_client.launcher import DEFAULT_PRELOAD, WorkerLauncher

PROMPT = [[1, 17, 42, 99, 3, 250, 7, 8]]


def report_start(conn: Any) -> None:
    conn.send({
        "preloaded": [m for m in DEFAULT_PRELOAD if m in sys.modules],
        "frozen": gc.get_freeze_count(),
        "parent": os.getppid(),
        "pid": os.getpid(),
    })  # fmt: skip
    conn.close()


def run_model(conn: Any, address: str, model: str) -> None:
    from tierd_client import TierdClient
    from tierd_client.hf_weights import model_on_weights

    torch.set_num_threads(1)
    with TierdClient(address, timeout=60) as client:
        lm = model_on_weights(client.load_weights(model))
    with torch.no_grad():
        # As numpy: a torch tensor would travel as a shared-memory handle that dies with
        # the worker.
        conn.send(lm(torch.tensor(PROMPT)).logits.numpy())
    conn.close()


@pytest.fixture(scope="module")
def launcher() -> WorkerLauncher:
    return WorkerLauncher()


def _answer(launcher: WorkerLauncher, target: Any, *args: Any) -> Any:
    ours, theirs = launcher.context.Pipe(duplex=False)
    worker = launcher.spawn(target, theirs, *args)
    theirs.close()
    try:
        return ours.recv()
    finally:
        worker.join(timeout=120)
        assert worker.exitcode == 0


def test_workers_start_with_the_imports_done_and_the_launcher_frozen(
    launcher: WorkerLauncher,
) -> None:
    first = _answer(launcher, report_start)
    second = _answer(launcher, report_start)
    assert first["preloaded"] == list(DEFAULT_PRELOAD)
    assert first["frozen"] > 10_000  # torch's and transformers' objects
    # Both are children of the launcher, not of this process, and are two processes.
    assert first["parent"] == second["parent"] == launcher.pid != os.getpid()
    assert first["pid"] != second["pid"]


def test_forked_workers_run_a_model_from_tierd_with_the_local_logits(
    launcher: WorkerLauncher,
    models_daemon: DaemonProcess,
    tmp_path: Path,
) -> None:
    from transformers import LlamaForCausalLM

    from tierd_client import TierdClient

    _tiny_llama(tmp_path / "llama")
    with TierdClient(models_daemon.address, timeout=60) as c:
        c.register_model(str(tmp_path / "llama"), name="forked-llama", dtype="float32")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(PROMPT)).logits
    for _ in range(2):
        got = _answer(launcher, run_model, models_daemon.address, "forked-llama")
        assert torch.equal(torch.from_numpy(got), want)


def test_one_process_has_one_launcher() -> None:
    WorkerLauncher(start=False)  # the default preload, as the fixture's
    with pytest.raises(ValueError, match="one process has one launcher"):
        WorkerLauncher(("json",), start=False)


def _in_a_fresh_process(code: str, path: Path | None = None) -> str:
    """`code` run by a new interpreter (its own fork server), from the repository root, with
    `path` on PYTHONPATH; its stdout. A test that needs a launcher other than the module's,
    or kills one, runs there."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=120, env=env if path else None,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("module", ["no_such_module_here", "fails_at_import"])
def test_a_preload_the_launcher_could_not_import_is_an_error_that_names_it(
    module: str, tmp_path: Path
) -> None:
    # The standard library's fork server skips an ImportError in silence, and dies of any
    # other exception: workers would start without the imports, or start() would fail with
    # a bare EOFError.
    (tmp_path / "fails_at_import.py").write_text("raise ValueError('broken module')\n")
    out = _in_a_fresh_process(
        "from tierd_client.launcher import WorkerLauncher\n"
        "try:\n"
        f"    WorkerLauncher(['json', {module!r}])\n"
        "except RuntimeError as e:\n"
        "    print(repr(e))\n"
        "else:\n"
        "    print('started')\n",
        tmp_path,
    )
    assert out.startswith("RuntimeError(") and module in out, out


def test_a_fork_server_started_before_the_launcher_is_an_error() -> None:
    # Another user of the "forkserver" context started it without our preload; the launcher
    # cannot change a running fork server, and its workers would import everything again.
    out = _in_a_fresh_process(
        "import multiprocessing, os\n"
        "p = multiprocessing.get_context('forkserver').Process(target=os.getpid)\n"
        "p.start(); p.join()\n"
        "from tierd_client.launcher import WorkerLauncher\n"
        "try:\n"
        "    WorkerLauncher(['json'])\n"
        "except RuntimeError as e:\n"
        "    print(repr(e))\n"
    )
    assert "tierd_client._launcher_freeze" in out


def test_pid_names_the_running_launcher_after_one_died() -> None:
    # The standard library starts a new fork server at the next use; `pid` (the process
    # whose memory the workers share) must be the new one, not the dead one.
    out = _in_a_fresh_process(
        "import os, signal, time\n"
        "from tierd_client.launcher import WorkerLauncher\n"
        "launcher = WorkerLauncher(['json'])\n"
        "old = launcher.pid\n"
        "os.kill(old, signal.SIGKILL)\n"
        "deadline = time.monotonic() + 30\n"  # dead, not yet reaped: a zombie
        "while open(f'/proc/{old}/stat').read().split(') ')[1][0] != 'Z':\n"
        "    assert time.monotonic() < deadline\n"
        "    time.sleep(0.01)\n"
        "new = launcher.pid\n"
        "print(old, new, open(f'/proc/{new}/cmdline').read().replace(chr(0), ' '))\n"
    )
    old, new, cmdline = out.split(" ", 2)
    assert old != new and "multiprocessing.forkserver" in cmdline


def test_bench_counts_the_launcher_while_its_workers_share_its_pages(
    launcher: WorkerLauncher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench_weights' forked total is the workers' PSS plus the launcher's: read after the
    workers exit, the launcher's PSS holds the pages it shared with them whole, and the
    total counts them twice."""
    import transformers

    # Workers get this process's sys.path: they import the bench's worker from tools/.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "tools"))
    import bench_weights

    # The bench's prompt has ids up to 4093.
    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    doc = bench_weights.workers_memory("safetensors-forked", str(tmp_path / "llama"), 2, launcher)
    alone = bench_weights._smaps_rollup(launcher.pid)["Pss"] / 1024
    # Two workers shared the launcher's interpreter, torch and transformers pages with it
    # (hundreds of MiB): its share of them was about a third of what it holds alone.
    assert doc["launcher_pss_mib"] < 0.8 * alone, (doc, alone)
