"""vLLM with tierd as its KV store, end to end: real vLLM processes (the vLLM environment of
tools/vllm_env.sh) serving SmolLM2-135M with the connector, against a real tierd daemon.

One long prompt (~1.2k tokens, ten 128-token blocks), greedy:
- a first vLLM process computes it and stores its blocks in tierd;
- a second process, started afresh (empty prefix cache), loads the prefix from tierd: the
  same tokens, all whole blocks counted as cached by vLLM itself; a request with another
  `cache_salt` gets nothing from tierd;
- the blocks moved to the NVMe tier, the daemon restarted with its memory segments gone:
  a third process still gets the prefix (from NVMe);
- the NVMe copies' data damaged (headers intact, so lookups still hit): every load fails,
  the connector reports the blocks, and vLLM recomputes them, same tokens;
- the daemon stopped: a fifth process serves the prompt by computing, same tokens.

Each vLLM runs in its own process (tools/vllm_runner.py; vLLM keeps global state), one
after the other; time to first token is printed, not asserted (2 shared cores).
Skipped when the vLLM environment is missing (run tools/vllm_env.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DaemonProcess
from tierd_client import KVLayout, TierdClient
from tierd_client.vllm_store import ConnectorSettings, namespace_spec

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("TIERD_VLLM_VENV", ROOT / ".venv-vllm"))
PYTHON = VENV / "bin" / "python"
MODEL = VENV / "models" / "smollm2-135m-f32"
BLOCK = 128  # vLLM's CPU block size, and so tierd's block_tokens
LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", block_tokens=BLOCK)
NEW_TOKENS = 24
RUN_DEADLINE_S = 600
PAGE = 4096  # the NVMe tier's extents are page-aligned, each block's header page first
HEADER_MAGIC = b"TIERDHB1"

ANIMALS = ("fox", "heron", "otter", "lynx", "badger", "crane", "marten", "ibex")
CITIES = ("Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Tartu", "Cusco")


def _prompt() -> str:
    lines = [
        f"Entry {i}: a {ANIMALS[i % 8]} from {CITIES[(i * 3) % 8]} carried {i * 7 % 50} "
        f"stones across the river on day {i % 30 + 1}."
        for i in range(60)
    ]
    return "Here is a logbook.\n" + "\n".join(lines) + "\nQuestion: what did entry 42 carry?"


PROMPT = _prompt()


@dataclass
class Served:
    """What one vLLM process answered, per request, and its connector's counters."""

    requests: list[dict[str, Any]]
    connector: dict[str, dict[str, int]]


def _serve(address: str, requests: list[dict[str, Any]], tag: str) -> Served:
    with tempfile.TemporaryDirectory(prefix=f"tierd-vllm-{tag}-") as tmp:
        spec, out, log = Path(tmp, "spec.json"), Path(tmp, "out.json"), Path(tmp, "vllm.log")
        spec.write_text(json.dumps({
            "model": str(MODEL),
            "tierd": {"address": address, "timeout_s": 5.0},
            "requests": requests,
        }))  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        with open(log, "wb") as err:
            proc = subprocess.run(
                [str(PYTHON), str(ROOT / "tools" / "vllm_runner.py"), str(spec), str(out)],
                stdout=err, stderr=subprocess.STDOUT, env=env, timeout=RUN_DEADLINE_S,
                check=False,
            )  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            tail = log.read_text(errors="replace")[-8000:]
            pytest.fail(f"vLLM ({tag}) exited with {proc.returncode}:\n{tail}", pytrace=False)
        result = json.loads(out.read_text())
    for r in result["requests"]:
        print(f"[{tag}] prompt {len(r['prompt_token_ids'])} tokens, cached {r['cached_tokens']}, "
              f"TTFT {r['ttft_s']:.3f} s, salt {r['cache_salt']}")  # fmt: skip
    print(f"[{tag}] connector: {result['connector']}")
    return Served(result["requests"], result["connector"])


def _request(salt: str | None = None) -> dict[str, Any]:
    return {"text": PROMPT, "max_tokens": NEW_TOKENS, "cache_salt": salt}


def _whole_blocks(r: dict[str, Any]) -> int:
    return len(r["prompt_token_ids"]) // BLOCK


# -- fixtures: one daemon, four vLLM processes in sequence ---------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    if not (PYTHON.exists() and (MODEL / ".converted").exists()):
        pytest.skip(f"the vLLM environment is missing at {VENV} (run bash tools/vllm_env.sh)")
    base = Path(tempfile.mkdtemp(prefix="tierd-vl-"))
    d = DaemonProcess(base)
    d.start()
    try:
        yield d
    finally:
        d.discard()


@pytest.fixture(scope="module")
def cold(daemon: DaemonProcess) -> Served:
    return _serve(daemon.address, [_request()], "cold")


@pytest.fixture(scope="module")
def warm(daemon: DaemonProcess, cold: Served) -> Served:
    return _serve(daemon.address, [_request(), _request("tenant-b")], "warm")


@pytest.fixture(scope="module")
def after_restart(daemon: DaemonProcess, warm: Served) -> tuple[list[str | None], Served]:
    tokens = warm.requests[0]["prompt_token_ids"]
    with TierdClient(daemon.address) as client:
        ns = _namespace(client)
        keys = client.block_keys(ns, tokens)
        assert client.move(ns, keys, "nvme") == len(keys)
    daemon.stop()
    daemon.remove_segments()  # the host tier's copies are gone: only NVMe can serve
    daemon.start()
    with TierdClient(daemon.address) as client:
        tiers = client.locate(_namespace(client), keys)
    return tiers, _serve(daemon.address, [_request()], "restarted")


@pytest.fixture(scope="module")
def corrupted(daemon: DaemonProcess, after_restart: Any) -> Served:
    """Only NVMe copies left, their data damaged: lookups hit, every load fails."""
    daemon.stop()
    daemon.remove_segments()
    nvme = daemon.base / "data" / "nvme" / "blocks.dat"
    damaged = 0
    with open(nvme, "r+b") as f:
        offset = 0
        while page := f.read(PAGE):
            # Leave the block headers (so the blocks are still listed), damage the data.
            if not page.startswith(HEADER_MAGIC) and any(page):
                f.seek(offset)
                f.write(bytes(b ^ 0xFF for b in page[:16]))
                f.seek(offset + len(page))
                damaged += 1
            offset += len(page)
    assert damaged
    daemon.start()
    return _serve(daemon.address, [_request()], "corrupted")


@pytest.fixture(scope="module")
def tierd_down(daemon: DaemonProcess, corrupted: Any) -> Served:
    daemon.stop()
    return _serve(daemon.address, [_request()], "down")


def _namespace(client: TierdClient) -> Any:
    model, extra = namespace_spec(ConnectorSettings(), str(MODEL), None)
    return client.open_namespace(model, LAYOUT, extra_keys=extra)


# -- tests ---------------------------------------------------------------------------------------


def test_first_process_computes_and_stores_the_prompt(daemon: DaemonProcess, cold: Served) -> None:
    r = cold.requests[0]
    assert r["cached_tokens"] == 0
    assert len(r["token_ids"]) == NEW_TOKENS
    n = _whole_blocks(r)
    assert n >= 8  # a long prompt: ~1.2k tokens
    with TierdClient(daemon.address) as client:
        hit = client.lookup(_namespace(client), r["prompt_token_ids"])
    assert hit.cached_tokens == n * BLOCK
    assert cold.connector["worker"]["saved_blocks"] >= n


def test_fresh_process_reuses_the_prefix_from_tierd(cold: Served, warm: Served) -> None:
    want, got = cold.requests[0], warm.requests[0]
    assert got["prompt_token_ids"] == want["prompt_token_ids"]
    assert got["token_ids"] == want["token_ids"], (want["text"], got["text"])
    # vLLM's own count: every whole block came from tierd, so it computed only the rest.
    assert got["cached_tokens"] == _whole_blocks(got) * BLOCK
    assert warm.connector["worker"]["loaded_blocks"] >= _whole_blocks(got)
    assert warm.connector["worker"]["load_failed_blocks"] == 0
    print(f"TTFT cold {want['ttft_s']:.3f} s, warm from tierd {got['ttft_s']:.3f} s")


def test_another_cache_salt_never_hits(cold: Served, warm: Served) -> None:
    salted = warm.requests[1]
    assert salted["cached_tokens"] == 0  # neither vLLM's prefix cache nor tierd
    assert salted["token_ids"] == cold.requests[0]["token_ids"]  # the salt changes no output
    # The scheduler's tierd hits are the unsalted request's only.
    assert warm.connector["scheduler"]["hit_blocks"] == _whole_blocks(warm.requests[0])


def test_restarted_daemon_serves_the_prefix_from_nvme(
    cold: Served, after_restart: tuple[list[str | None], Served]
) -> None:
    tiers, served = after_restart
    assert tiers and set(tiers) == {"nvme"}
    got = served.requests[0]
    assert got["token_ids"] == cold.requests[0]["token_ids"]
    assert got["cached_tokens"] == _whole_blocks(got) * BLOCK
    assert served.connector["worker"]["load_failed_blocks"] == 0


def test_failed_loads_fall_back_to_recomputing(cold: Served, corrupted: Served) -> None:
    got = corrupted.requests[0]
    assert corrupted.connector["scheduler"]["hit_blocks"] == _whole_blocks(got)  # listed...
    assert corrupted.connector["worker"]["loaded_blocks"] == 0  # ...but none could be read
    assert corrupted.connector["worker"]["load_failed_blocks"] == _whole_blocks(got)
    assert got["token_ids"] == cold.requests[0]["token_ids"]  # vLLM recomputed them
    # ...and the recomputed blocks went back into tierd in place of the damaged ones.
    assert corrupted.connector["worker"]["saved_blocks"] >= _whole_blocks(got)


def test_tierd_down_vllm_recomputes(cold: Served, tierd_down: Served) -> None:
    got = tierd_down.requests[0]
    assert got["token_ids"] == cold.requests[0]["token_ids"]
    assert got["cached_tokens"] == 0
    assert tierd_down.connector["worker"]["saved_blocks"] == 0
    assert tierd_down.connector["worker"]["loaded_blocks"] == 0
