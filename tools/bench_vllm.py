"""vLLM with tierd as its KV store: time to first token and prompt tokens computed for a
shared 2k-token prefix, and decode speed with and without the connector.

    python tools/bench_vllm.py --json FILE [--reps 3] [--decode 64] [--rounds 1]

Needs the vLLM environment (bash tools/vllm_env.sh) and runs a tierd daemon of its own.
Each vLLM is a fresh process (tools/vllm_runner.py), SmolLM2-135M float32 on the CPU,
greedy, one request at a time. Per repetition k a new 2048-token prefix (random token
ids, 16 blocks of 128) is followed by a short suffix that differs per request:
- `cold`: a process without the connector computes prefix+suffix (vLLM alone);
- `vLLM prefix cache`: that process again with another suffix (vLLM's own cache);
- `cold, saving to tierd`: a process with the connector computes prefix+suffix and stores
  the blocks (`save=end`: after the forward; `save=layer`: layer by layer in it);
- `warm from tierd`: a fresh process with the connector, another suffix: the prefix's 16
  blocks are loaded from tierd.
Decode: tokens/s over `--decode` greedy tokens after a 100-token prompt, in processes
with the connector and without, `--rounds` pairs run alternately (medians of all), and the
time the connector itself spends in its hooks per engine step (robust to the machine's
load, which moves tokens/s by far more than 5 % between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tierd_client import TierdClient, TierdError

ROOT = Path(__file__).resolve().parents[1]

VENV = Path(os.environ.get("TIERD_VLLM_VENV", ROOT / ".venv-vllm"))
MODEL = VENV / "models" / "smollm2-135m-f32"
PREFIX = 2048
VOCAB = (1000, 40000)


class Daemon:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tierd-bv-"))
        self.address = f"unix:{self.base}/tierd.sock"
        cmd = [sys.executable, "-m", "tierd", "serve", "--listen", self.address,
               "--data-dir", str(self.base / "data"), "--host-capacity", "1GiB",
               "--nvme-capacity", "2GiB"]  # fmt: skip
        self.log = open(self.base / "tierd.stderr", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 60
        with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
            while True:
                try:
                    probe.stats()
                    return
                except TierdError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise SystemExit("tierd did not start") from None
                    time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()
        from tierd.tiers.host import segments_of

        for path in segments_of(self.base / "data"):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)


def serve(requests: list[dict[str, Any]], tierd: dict[str, Any] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tierd-bv-run-") as tmp:
        spec, out = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec.write_text(json.dumps({"model": str(MODEL), "tierd": tierd, "requests": requests}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        with open(Path(tmp, "log"), "wb") as log:
            rc = subprocess.run(
                [str(VENV / "bin" / "python"), str(ROOT / "tools" / "vllm_runner.py"),
                 str(spec), str(out)], stdout=log, stderr=subprocess.STDOUT, env=env,
                check=False,
            ).returncode  # fmt: skip
        if rc != 0 or not out.exists():
            raise SystemExit(f"vLLM run failed ({rc}):\n{Path(tmp, 'log').read_text()[-6000:]}")
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def prompts(seed: int, reps: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(*VOCAB) for _ in range(PREFIX)] for _ in range(reps)]
    suffixes = [[rng.randrange(*VOCAB) for _ in range(16)] for _ in range(4)]
    return prefixes, suffixes


def req(ids: list[int], max_tokens: int = 1) -> dict[str, Any]:
    return {"prompt_token_ids": ids, "max_tokens": max_tokens}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ttft_s": statistics.median(r["ttft_s"] for r in rows),
        "ttft_all_s": [round(r["ttft_s"], 4) for r in rows],
        "prompt_tokens": rows[0]["prompt_tokens"],
        "computed_tokens": statistics.median(r["prompt_tokens"] - r["cached_tokens"] for r in rows),
    }


def decode_rate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["decode_tok_s"] for r in rows if r["decode_tok_s"]]
    return {"tok_s": statistics.median(rates), "all": [round(x, 2) for x in rates]}


def run(reps: int, decode: int, rounds: int) -> dict[str, Any]:
    prefixes, (s_cold, s_local, s_warm, _) = prompts(1, reps)
    other, _ = prompts(2, reps)  # the no-connector cold run gets prefixes of its own
    rng = random.Random(3)
    short = [[rng.randrange(*VOCAB) for _ in range(100)] for _ in range(reps)]
    decode_reqs = [req(p, decode) for p in short]
    layer_prefixes, _ = prompts(4, reps)
    daemon = Daemon()
    try:
        conn = {"address": daemon.address}
        # vLLM alone: cold, then its own prefix cache (nothing of tierd's running beside it).
        base = serve([r for p in other for r in (req(p + s_cold), req(p + s_local))], None)
        first = serve([req(p + s_cold) for p in prefixes], {**conn, "save": "end"})
        layer = serve([req(p + s_cold) for p in layer_prefixes], {**conn, "save": "layer"})
        warm = serve([req(p + s_warm) for p in prefixes], conn)
        # Decode in processes of its own, alternating, so drift in the machine's load hits
        # both sides; the connector's own time in its hooks is counted too.
        off: list[dict[str, Any]] = []
        on: list[dict[str, Any]] = []
        hook_ns = 0
        for _ in range(rounds):
            off += serve(decode_reqs, None)["requests"]
            got = serve(decode_reqs, conn)
            on += got["requests"]
            hook_ns += sum(c.get("hook_ns", 0) for c in got["connector"].values())
    finally:
        daemon.stop()
    b, f, w = base["requests"], first["requests"], warm["requests"]
    for r in (*b, *f, *w, *layer["requests"], *off, *on):
        r["prompt_tokens"] = len(r.pop("prompt_token_ids"))
    return {
        "model": "SmolLM2-135M float32 (vLLM 0.32.0 CPU, block 128)",
        "prefix_tokens": PREFIX,
        "reps": reps,
        "ttft": {
            "cold": summary(b[0::2]),
            "cold, saving to tierd (save=end)": summary(f),
            "cold, saving to tierd (save=layer)": summary(layer["requests"]),
            "vLLM prefix cache (same process)": summary(b[1::2]),
            "warm from tierd (fresh process)": summary(w[:reps]),
        },
        "decode": {
            "without connector": decode_rate(off),
            "with connector": decode_rate(on),
            "new_tokens": decode,
            # every request: a prefill step, then one step per further token
            "connector_ms_per_step": hook_ns / 1e6 / (len(on) * decode),
        },
        "connector": {
            "first": first["connector"],
            "layer": layer["connector"],
            "warm": warm["connector"],
        },
        "load_s": {"base": base["load_s"], "first": first["load_s"], "warm": warm["load_s"]},
    }


def table(res: dict[str, Any]) -> str:
    lines = ["| case | TTFT median (s) | prompt tokens computed |", "|---|---|---|"]
    for name, s in res["ttft"].items():
        lines.append(f"| {name} | {s['ttft_s']:.3f} | {s['computed_tokens']:.0f} "
                     f"of {s['prompt_tokens']} |")  # fmt: skip
    d = res["decode"]
    on, off = d["with connector"]["tok_s"], d["without connector"]["tok_s"]
    change = (on / off - 1) * 100
    hook = d["connector_ms_per_step"]
    share = hook * off / 10  # percent of a step without the connector (1000 / off ms)
    lines += ["", f"| decode ({d['new_tokens']} tokens) | tokens/s |", "|---|---|",
              f"| without connector | {off:.2f} |", f"| with connector | {on:.2f} ({change:+.1f} %) |",
              f"| connector's own time per step | {hook:.3f} ms ({share:.2f} % of a step) |"]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="process pairs for the decode rate")
    args = ap.parse_args()
    if not (MODEL / ".converted").exists():
        raise SystemExit(f"no vLLM environment at {VENV}: run bash tools/vllm_env.sh")
    res = run(args.reps, args.decode, args.rounds)
    args.json.write_text(json.dumps(res, indent=2))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
