"""`tierctl capacity`: what this machine can hold of a model's KV cache, and how fast.

Primitives: `COMMAND`, `Tier`, `Report`, `build_report(...)`, `tiers_for_model(...)`,
`render_text(report)`, `report_json(report)`.

Each tier (a GPU or MIG slice, host RAM, each disk) gets its usable bytes now (free GPU
memory, available RAM, free disk space) and a read bandwidth. Given a model:
  tokens     = usable bytes // KV bytes per token
  sequences  = tokens // context length
  attend     = context x KV bytes per token / bandwidth: the time one decode step spends
               streaming one sequence's KV out of that tier (attention is memory-bound,
               so bandwidth, not FLOPs, sets it).
With `--codec [KIND=]CODEC` a tier keeps KV as tierd's codec would store it there (as a
tier's `codec` in the daemon's config; bare: the disks): its KV bytes per token are the
encoded ones (`--block-tokens` per block, as a namespace's layout says), which set its
tokens and attend time. A codec that would not shrink the KV is not used (tierd stores it
raw then too).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierctl import bench, probe, tables
from tierctl.cli import Command
from tierctl.errors import ExitCode, UsageError
from tierctl.models import ModelSpec, dtype_bytes, resolve_model
from tierd.config import default_data_dir, format_size, parse_size
from tierd.errors import ConfigError
from tierd.slice_config import SliceConfig

DEFAULT_CONTEXT = 4096  # when the model does not say what it was trained for


@dataclass
class Tier:
    name: str  # "gpu0", "gpu0/mig0", "ram", "disk /"
    kind: str  # "gpu" | "mig" | "ram" | "disk"
    device: str
    usable_bytes: int
    total_bytes: int
    read_bps: float | None = None
    write_bps: float | None = None
    measured: str = "not measured"  # how read_bps was obtained
    tokens: int | None = None
    sequences: int | None = None
    attend_ms: float | None = None
    codec: str = "raw"  # how tierd would store KV here (tierd.transfer.encoding)
    kv_bytes_per_token: float | None = None  # in that encoding
    uuid: str = ""  # a GPU's or MIG instance's, as nvidia-smi -L prints it


@dataclass
class Report:
    tiers: list[Tier]
    model: dict[str, Any] | None = None
    dtype: str = "bfloat16"
    context: int | None = None
    kv_bytes_per_token: int | None = None
    notes: list[str] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)  # the config's [[slices]]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="SPEC",
                   help="a preset (llama-3-8b, llama-3-70b, smollm2-135m, mistral-7b), a HF "
                        "config.json (or its directory) or a .gguf file")  # fmt: skip
    p.add_argument("--dtype", default="bf16", help="KV dtype (bf16, fp16, fp32, fp8, int8)")
    p.add_argument("--context", type=int, metavar="TOKENS",
                   help="tokens per sequence (default: the model's trained context, else "
                        f"{DEFAULT_CONTEXT})")  # fmt: skip
    p.add_argument("--codec", action="append", default=[], metavar="[KIND=]CODEC",
                   help="count KV in a tierd codec in tiers of KIND (gpu, mig, ram, disk; "
                        "default disk): raw, int8, fp8, kivi4, kivi2, with options as "
                        "'kivi2;k_group=16;v_group=32' (repeatable)")  # fmt: skip
    p.add_argument("--block-tokens", type=int, default=16, metavar="N",
                   help="tokens per KV block, as the namespace's layout (default 16)")
    p.add_argument("--data-dir", type=Path, help="tierd data dir (default: tierd's default)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a tierd config: show its [[slices]] against the GPUs found")  # fmt: skip
    p.add_argument("--bench-dir", type=Path, action="append", metavar="DIR",
                   help="measure O_DIRECT bandwidth of the disk holding DIR (repeatable; "
                        "default: the data dir if it exists, else the current directory)")  # fmt: skip
    p.add_argument(
        "--all-disks",
        action="store_true",
        help="also measure every writable disk, in a temporary file at its mountpoint",
    )
    p.add_argument(
        "--bench-size",
        default="256MiB",
        metavar="SIZE",
        help="bytes written then read per measured disk (default 256MiB)",
    )
    p.add_argument("--no-bench", action="store_true", help="probe only; measure nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the report (matplotlib)"
    )


def _bench_dirs(args: argparse.Namespace, disks: list[probe.Disk]) -> list[Path]:
    if args.bench_dir:
        dirs = [d.expanduser() for d in args.bench_dir]
    else:
        data_dir = args.data_dir or default_data_dir()
        dirs = [data_dir if data_dir.is_dir() else Path.cwd()]
    if args.all_disks:
        dirs += [Path(d.mountpoint) for d in disks
                 if not d.read_only and os.access(d.mountpoint, os.W_OK)]  # fmt: skip
    return dirs


def gpu_tiers(gpus: list[probe.Gpu]) -> list[Tier]:
    """A tier per GPU, or per MIG instance of a GPU in MIG mode (the GPU itself is not one
    then: its memory is the instances')."""
    tiers = []
    for gpu in gpus:
        if gpu.mig_enabled and gpu.mig:
            tiers += [Tier(f"gpu{gpu.index}/mig{s.index}", "mig", f"{gpu.name} {s.profile}",
                           s.memory, s.memory, uuid=s.uuid) for s in gpu.mig]  # fmt: skip
        else:
            tiers.append(Tier(f"gpu{gpu.index}", "gpu", gpu.name, gpu.free, gpu.total,
                              uuid=gpu.uuid))  # fmt: skip
    return tiers


def probe_tiers(args: argparse.Namespace, bench_size: int) -> tuple[list[Tier], list[str]]:
    notes: list[str] = []
    tiers: list[Tier] = []
    gpus, gpu_note = probe.find_gpus()
    if gpu_note:
        notes.append(gpu_note)
    for t in gpu_tiers(gpus):
        measure = t.kind == "gpu" and not args.no_bench
        bps = bench.measure_gpu(int(t.name.removeprefix("gpu"))) if measure else None
        if bps is not None:
            t.read_bps, t.measured = bps, "device copy"
        tiers.append(t)
    ram = probe.probe_ram()
    t = Tier("ram", "ram", "host memory", ram.available, ram.total)
    if not args.no_bench:
        t.read_bps, t.measured = bench.measure_memory(), "memcpy"
    tiers.append(t)

    disks = probe.probe_disks()
    by_mount: dict[str, Tier] = {}
    for d in disks:
        by_mount[d.mountpoint] = Tier(f"disk {d.mountpoint}", "disk",
                                      f"{d.device} ({d.fstype}, {d.media})", d.free, d.total)  # fmt: skip
    if not args.no_bench:
        for directory in dict.fromkeys(_bench_dirs(args, disks)):  # ordered, no repeats
            disk = probe.disk_of(directory, disks) or probe.filesystem_of(directory)
            tier = by_mount.get(disk.mountpoint)
            if tier is None:  # e.g. a tmpfs bench dir: listed because it was asked for
                tier = by_mount[disk.mountpoint] = Tier(
                    f"disk {disk.mountpoint}", "disk", f"{disk.device} ({disk.fstype})",
                    disk.free, disk.total)  # fmt: skip
            if tier.read_bps is not None:
                continue  # two bench dirs on one disk: once is enough
            result = bench.measure_disk(directory, bench_size)
            tier.read_bps, tier.write_bps = result.read_bps, result.write_bps
            tier.measured = "O_DIRECT" if result.direct else "buffered (no O_DIRECT)"
            if not result.direct:
                notes.append(f"{directory}: the filesystem refused O_DIRECT; the figures "
                             "include the page cache")  # fmt: skip
    tiers.extend(by_mount.values())
    return tiers, notes


KINDS = ("gpu", "mig", "ram", "disk")


def codecs_by_kind(specs: list[str]) -> dict[str, str]:
    """`--codec` values -> {tier kind: encoding}; a UsageError names a bad one."""
    from tierd.transfer.encoding import codec_of

    out: dict[str, str] = {}
    for spec in specs:
        kind, encoding = spec.split("=", 1) if "=" in spec.split(";")[0] else ("disk", spec)
        if kind not in KINDS:
            raise UsageError(f"--codec {spec}: no tier kind {kind!r} (one of {', '.join(KINDS)})")
        try:
            codec_of(encoding)
        except ValueError as e:
            raise UsageError(f"--codec {spec}: {e}") from None
        out[kind] = encoding
    return out


def encoded_block_bytes(model: ModelSpec, dtype: str, encoding: str, block_tokens: int) -> int:
    """Bytes of one block of `block_tokens` tokens of every layer in `encoding`."""
    from tierd.transfer.encoding import codec_of
    from tierd_client.layout import KVLayout

    if model.head_dim != model.v_head_dim:
        raise UsageError(f"--codec: {model.name} has K and V heads of different sizes; "
                         "tierd's codecs take equal ones")  # fmt: skip
    codec = codec_of(encoding)
    torch_dtype = KVLayout(1, 1, 1, dtype_bytes(dtype)[0], 1).torch_dtype()
    heads = model.kv_heads_per_layer or (model.num_kv_heads,) * model.num_layers
    try:
        return sum(codec.record_bytes((2, h, block_tokens, model.head_dim), torch_dtype)
                   for h in heads)  # fmt: skip
    except ValueError as e:
        raise UsageError(f"--codec {encoding}: {e}") from None


def apply_model(
    tiers: list[Tier], model: ModelSpec, dtype: str, context: int,
    codecs: dict[str, str] | None = None, block_tokens: int = 16,
) -> int:  # fmt: skip
    """Fill tokens, sequences and attend time (each tier in its codec's bytes); returns raw
    KV bytes per token."""
    per_token = model.kv_bytes_per_token(dtype)
    for t in tiers:
        encoding = (codecs or {}).get(t.kind, "raw")
        stored = per_token * block_tokens
        if encoding != "raw":
            stored = encoded_block_bytes(model, dtype, encoding, block_tokens)
        if stored >= per_token * block_tokens:  # no saving: tierd would store it raw
            encoding, stored = "raw", per_token * block_tokens
        t.codec, t.kv_bytes_per_token = encoding, stored / block_tokens
        t.tokens = t.usable_bytes // stored * block_tokens if encoding != "raw" else (
            t.usable_bytes // per_token)  # fmt: skip
        t.sequences = t.tokens // context
        if t.read_bps:
            t.attend_ms = context * t.kv_bytes_per_token / t.read_bps * 1e3
    return per_token


def build_report(args: argparse.Namespace) -> Report:
    dtype_name, _ = dtype_bytes(args.dtype)
    model = resolve_model(args.model) if args.model else None
    try:
        bench_size = parse_size(args.bench_size, key="--bench-size")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.context is not None and args.context <= 0:
        raise UsageError("--context must be a positive number of tokens")
    if args.block_tokens <= 0:
        raise UsageError("--block-tokens must be a positive number of tokens")
    codecs = codecs_by_kind(args.codec)
    configured = slices_of(args.config) if args.config is not None else ()
    tiers, notes = probe_tiers(args, bench_size)
    report = Report(tiers=tiers, dtype=dtype_name, notes=notes,
                    slices=place_slices(configured, tiers))  # fmt: skip
    if model is not None:
        report.context = args.context or model.max_context or DEFAULT_CONTEXT
        report.model = dataclasses.asdict(model)
        report.kv_bytes_per_token = apply_model(tiers, model, args.dtype, report.context,
                                                codecs, args.block_tokens)  # fmt: skip
    return report


def slices_of(path: Path) -> tuple[SliceConfig, ...]:
    """The [[slices]] of the tierd config at `path` (the whole file checked, as tierd would)."""
    from tierd.config import load_config

    try:
        return load_config(path).slices
    except ConfigError as e:
        raise UsageError(f"--config: {e}") from None


def place_slices(slices: tuple[SliceConfig, ...], tiers: list[Tier]) -> list[dict[str, Any]]:
    """Each slice with the tier it names (a GPU by index, a MIG instance by UUID) and that
    tier's memory; a budget larger than the memory is flagged."""
    out = []
    for s in slices:
        if s.is_mig:
            tier = next((t for t in tiers if t.kind == "mig" and t.uuid == s.slice), None)
        else:
            tier = next((t for t in tiers if t.kind == "gpu" and t.name == f"gpu{s.slice}"), None)
        memory = tier.total_bytes if tier is not None else None
        out.append({"slice": s.slice, "tier": tier.name if tier is not None else None,
                    "memory_bytes": memory, "weight_budget": s.weight_budget,
                    "models": list(s.models),
                    "over_memory": memory is not None and s.weight_budget > memory})  # fmt: skip
    return out


def render_slices(slices: list[dict[str, Any]]) -> str:
    rows = []
    for s in slices:
        where = s["tier"] or "not on this machine"
        memory = "-" if s["memory_bytes"] is None else format_size(s["memory_bytes"])
        budget = format_size(s["weight_budget"]) + (" (over memory)" if s["over_memory"] else "")
        rows.append([tables.printable(s["slice"]), where, memory, budget,
                     tables.printable(", ".join(s["models"]))])  # fmt: skip
    return tables.render(["slice", "tier", "memory", "weight budget", "models"], rows,
                         right={2, 3})  # fmt: skip


def report_json(report: Report) -> str:
    return json.dumps(dataclasses.asdict(report), indent=2)


def render_text(report: Report) -> str:
    out: list[str] = []
    if report.model is not None:
        m = report.model
        out.append(
            f"model {m['name']} ({m['source']}): {m['num_layers']} layers, "
            f"{m['num_kv_heads']} KV heads x {m['head_dim']} dim, {report.dtype}: "
            f"{format_size(report.kv_bytes_per_token or 0)} of KV per token "
            f"({report.kv_bytes_per_token:,} B); context {report.context:,} tokens = "
            f"{format_size((report.kv_bytes_per_token or 0) * (report.context or 0))} per sequence"
        )
        out.append("")
    headers = ["tier", "device", "uuid", "usable", "total", "read", "write", "measured"]
    if report.model is not None:
        headers += ["codec", "B/token", "tokens", "sequences", "attend/token"]
    rows = []
    for t in report.tiers:
        row = [t.name, t.device, t.uuid or "-", format_size(t.usable_bytes),
               format_size(t.total_bytes),
               tables.rate(t.read_bps), tables.rate(t.write_bps), t.measured]  # fmt: skip
        if report.model is not None:
            attend = "-" if t.attend_ms is None else f"{t.attend_ms:.3g} ms"
            per = "-" if t.kv_bytes_per_token is None else f"{t.kv_bytes_per_token:,.0f}"
            row += [t.codec, per, tables.count(t.tokens), tables.count(t.sequences), attend]
        rows.append(row)
    out.append(tables.render(headers, rows, right={3, 4, 5, 6, 9, 10, 11, 12}))
    if report.slices:
        out += ["", render_slices(report.slices)]
    out.extend(f"note: {n}" for n in report.notes)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Checked before measuring anything: a missing plot library should fail fast.
        raise UsageError("--plot needs matplotlib, which is not installed "
                         "(pip install 'tierd[tools]')")  # fmt: skip
    report = build_report(args)
    print(report_json(report) if args.json else render_text(report))
    if args.plot is not None:
        from tierctl.plot import plot_report

        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return ExitCode.OK


COMMAND = Command(
    name="capacity",
    help="what fits in each tier of this machine, and how fast it can be attended",
    add_arguments=_add_arguments,
    run=run,
)
