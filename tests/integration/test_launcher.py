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
