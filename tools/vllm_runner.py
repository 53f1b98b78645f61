"""Serve a list of token prompts with vLLM in this process and report what happened, as JSON.

    .venv-vllm/bin/python tools/vllm_runner.py SPEC.json OUT.json

SPEC: {"model": DIR, "tierd": {kv_connector_extra_config} or null, "prefix_caching": bool,
"requests": [{"prompt_token_ids": [...] or "text": str, "cache_salt": str|null,
"max_tokens": n}]}.
OUT: {"load_s", "requests": [{"prompt_token_ids", "token_ids", "text", "cached_tokens",
"ttft_s", "decode_tok_s", "wall_s"}], "connector": {scheduler and worker counters}}.

Requests run one at a time, greedy, so each one's time to first token is its own. The
engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the connector's
counters can be read back; vLLM keeps global state, so one process serves one SPEC.
Used by tests/vllm and tools/bench_vllm.py; runs in the vLLM environment
(tools/vllm_env.sh).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

CONNECTOR = "TierdConnector"
CONNECTOR_MODULE = "tierd_client.vllm_connector"


def _connector_counters(llm: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if has_kv_transfer_group():
            out["worker"] = dict(get_kv_transfer_group().counters)
    except (ImportError, AttributeError):
        pass
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    connector = getattr(getattr(core, "scheduler", None), "connector", None)
    if connector is not None and hasattr(connector, "counters"):
        out["scheduler"] = dict(connector.counters)
    return out


def _flush_connector() -> None:
    """Let the worker's connector finish its pending commits before the process ends."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if has_kv_transfer_group():
        get_kv_transfer_group().shutdown()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv = None
    if spec.get("tierd") is not None:
        kv = KVTransferConfig(
            kv_connector=CONNECTOR, kv_connector_module_path=CONNECTOR_MODULE,
            # kv_load_failure_policy left at vLLM's default: the connector makes it recompute.
            kv_role="kv_both", kv_connector_extra_config=spec["tierd"],
        )  # fmt: skip
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"], dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
        enable_prefix_caching=spec.get("prefix_caching", True), kv_transfer_config=kv,
        disable_log_stats=False, seed=0,
    )  # fmt: skip
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "requests": []}
    tokenizer = llm.get_tokenizer()
    for r in spec["requests"]:
        ids = r.get("prompt_token_ids") or list(tokenizer.encode(r["text"]))
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if r.get("cache_salt"):
            prompt["cache_salt"] = r["cache_salt"]
        params = SamplingParams(max_tokens=r.get("max_tokens", 16), temperature=0.0,
                                ignore_eos=True)  # fmt: skip
        t = time.perf_counter()
        res = llm.generate([prompt], params, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        m = res.metrics
        n = len(res.outputs[0].token_ids)
        ttft = getattr(m, "first_token_latency", 0.0) or None
        span = (m.last_token_ts - m.first_token_ts) if m is not None else 0.0
        out["requests"].append({
            "token_ids": list(res.outputs[0].token_ids),
            "text": res.outputs[0].text,
            "prompt_token_ids": ids,
            "cache_salt": r.get("cache_salt"),
            "cached_tokens": res.num_cached_tokens or 0,
            "ttft_s": ttft,
            "decode_tok_s": (n - 1) / span if n > 1 and span > 0 else None,
            "wall_s": wall,
        })  # fmt: skip
    _flush_connector()  # its pending commits count among its saves
    out["connector"] = _connector_counters(llm)
    return out


def main() -> int:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    # vLLM's teardown can take long or hang on some builds; the answer is written.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
