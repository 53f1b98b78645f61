"""What this machine has: RAM, disks, GPUs and their MIG slices. Nothing is measured here.

Primitives: `probe_ram() -> Ram`, `probe_disks() -> list[Disk]`, `disk_of(path, disks)`,
`probe_gpus() -> list[Gpu]` (nvidia-smi when on PATH, else torch.cuda when a driver is
present), `find_gpus() -> (gpus, note)` (the note says why there are none),
`parse_nvidia_smi(query_csv, list_output)` (pure, for tests), `GPU_QUERY`.

GPU probing avoids importing torch unless a driver is there: on a CPU machine importing
torch costs seconds and finds nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Filesystems that hold no KV worth tiering (memory- or kernel-backed, or read-only
# images). tmpfs is memory: the host tier already counts it under RAM.
PSEUDO_FS = frozenset({
    "proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs",
    "debugfs", "tracefs", "pstore", "bpf", "autofs", "mqueue", "hugetlbfs", "fusectl",
    "configfs", "binfmt_misc", "nsfs", "ramfs", "efivarfs", "rpc_pipefs", "squashfs",
    "overlay_ro", "iso9660", "nfsd", "selinuxfs", "fuse.lxcfs", "fuse.portal", "zram",
})  # fmt: skip
_NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Ram:
    total: int
    available: int


@dataclass(frozen=True)
class Disk:
    device: str
    mountpoint: str
    fstype: str
    total: int
    free: int
    media: str  # "ssd", "hdd" or "?" (from /sys/block/*/queue/rotational)
    read_only: bool


@dataclass(frozen=True)
class MigSlice:
    gpu_index: int
    index: int
    profile: str  # e.g. "1g.10gb"
    memory: int  # bytes, from the profile name (nvidia-smi -L gives nothing finer)
    uuid: str


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total: int
    free: int
    mig_enabled: bool
    source: str  # "nvidia-smi" or "torch"
    mig: list[MigSlice] = field(default_factory=list)
    uuid: str = ""  # "GPU-..." (nvidia-smi only)


def probe_ram() -> Ram:
    vm = psutil.virtual_memory()
    return Ram(total=vm.total, available=vm.available)


def _media(device: str) -> str:
    name = Path(device).name
    sys_dev = Path("/sys/class/block") / name
    try:
        if (sys_dev / "partition").exists():  # a partition: the queue is its parent's
            sys_dev = sys_dev.resolve().parent
        flag = (sys_dev / "queue" / "rotational").read_text().strip()
    except OSError:
        return "?"
    return "hdd" if flag == "1" else "ssd"


def probe_disks() -> list[Disk]:
    """Real block-device filesystems, one entry per device (bind mounts show once)."""
    seen: set[str] = set()
    out: list[Disk] = []
    for part in psutil.disk_partitions(all=False):
        if part.fstype in PSEUDO_FS or part.device in seen or part.device.startswith("/dev/loop"):
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:  # unmounted under us, or no permission
            continue
        seen.add(part.device)
        opts = set(part.opts.split(","))
        out.append(Disk(part.device, part.mountpoint, part.fstype, usage.total, usage.free,
                        _media(part.device), "ro" in opts))  # fmt: skip
    return out


def disk_of(path: Path, disks: list[Disk]) -> Disk | None:
    """The disk holding `path` (same st_dev as its mountpoint), if it is one of `disks`."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    for d in disks:
        try:
            if os.stat(d.mountpoint).st_dev == dev:
                return d
        except OSError:
            continue
    return None


def filesystem_of(path: Path) -> Disk:
    """A Disk entry for whatever filesystem holds `path`, pseudo ones included."""
    path = path.resolve()
    best = None
    for part in psutil.disk_partitions(all=True):
        mp = Path(part.mountpoint)
        inside = path == mp or mp in path.parents
        if inside and (best is None or len(str(mp)) > len(best.mountpoint)):
            best = part
    usage = psutil.disk_usage(str(path))
    if best is None:
        return Disk("?", str(path), "?", usage.total, usage.free, "?", False)
    return Disk(best.device, best.mountpoint, best.fstype, usage.total, usage.free,
                _media(best.device), "ro" in best.opts.split(","))  # fmt: skip


# -- GPUs -----------------------------------------------------------------------------------

_MIG_LINE = re.compile(r"^\s*MIG\s+(\S+)\s+Device\s+(\d+):\s*\(UUID:\s*([^)]+)\)")
_GPU_LINE = re.compile(r"^GPU\s+(\d+):.*?(?:\(UUID:\s*([^)]+)\))?\s*$")
_PROFILE_MEM = re.compile(r"(\d+)gb$")
_UNIT = re.compile(r"\s*\[[^\]]*\]$")  # " [MiB]" after a column's name in the header
# What probe_gpus asks for (`--format=csv`: a header, values with their units).
GPU_QUERY = "index,uuid,name,memory.total,memory.used,mig.mode.current"
_NOHEADER = ("index", "name", "memory.total", "memory.free", "mig.mode.current")


def _mib(value: str) -> int:
    """Bytes of "143771 MiB" or "143771"; ValueError for "[N/A]" and the like."""
    return int(value.removesuffix("MiB").strip()) << 20


def _csv_rows(query_csv: str) -> list[dict[str, str]]:
    """Rows of the query by column name: with the header `--format=csv` prints (names with
    units, which are dropped), or without one in the older `--query-gpu=index,name,
    memory.total,memory.free,mig.mode.current --format=csv,noheader,nounits` order."""
    lines = [line for line in query_csv.strip().splitlines() if line.strip()]
    names = list(_NOHEADER)
    if lines and lines[0].split(",")[0].strip() == "index":
        names = [_UNIT.sub("", c.strip()) for c in lines.pop(0).split(",")]
    return [dict(zip(names, (c.strip() for c in line.split(",")), strict=False))
            for line in lines]  # fmt: skip


def parse_nvidia_smi(query_csv: str, list_output: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=GPU_QUERY --format=csv` (or the older form `_csv_rows` reads)
    and `nvidia-smi -L`, parsed. A MIG instance's memory is its profile's ("1g.18gb":
    18 GB); `-L` gives nothing finer."""
    migs: dict[int, list[MigSlice]] = {}
    uuids: dict[int, str] = {}
    current = -1
    for line in list_output.splitlines():
        if m := _GPU_LINE.match(line):
            current = int(m.group(1))
            uuids[current] = (m.group(2) or "").strip()
        elif (m := _MIG_LINE.match(line)) and current >= 0:
            profile = m.group(1)
            gb = _PROFILE_MEM.search(profile)
            memory = int(gb.group(1)) * 10**9 if gb else 0
            slices = migs.setdefault(current, [])
            slices.append(MigSlice(current, int(m.group(2)), profile, memory, m.group(3).strip()))
    gpus: list[Gpu] = []
    for row in _csv_rows(query_csv):
        try:
            index, total = int(row["index"]), _mib(row["memory.total"])
            free = (_mib(row["memory.free"]) if "memory.free" in row
                    else total - _mib(row["memory.used"]))  # fmt: skip
        except (KeyError, ValueError):  # "[N/A]" on some virtualised GPUs
            continue
        uuid = row.get("uuid") or uuids.get(index, "")
        gpus.append(Gpu(index, row.get("name", "?"), total, free,
                        row.get("mig.mode.current") == "Enabled", "nvidia-smi",
                        migs.get(index, []), uuid))  # fmt: skip
    return gpus


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def _gpus_from_torch() -> list[Gpu]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(Gpu(i, torch.cuda.get_device_name(i), total, free, False, "torch"))
    return out


def find_gpus() -> tuple[list[Gpu], str | None]:
    """The GPUs, and when there are none, one line saying why."""
    smi = shutil.which("nvidia-smi")
    driver = Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()
    note = None
    if smi:
        query = _run([smi, f"--query-gpu={GPU_QUERY}", "--format=csv"])
        if query is not None:
            gpus = parse_nvidia_smi(query, _run([smi, "-L"]) or "")
            return gpus, None if gpus else "no GPU: nvidia-smi lists none"
        note = "no GPU: nvidia-smi failed"
    if driver:
        gpus = _gpus_from_torch()
        return gpus, None if gpus else (note or "no GPU: torch sees none")
    if note is None:
        note = "no GPU: nvidia-smi is not on PATH and no NVIDIA driver is loaded"
    return [], note


def probe_gpus() -> list[Gpu]:
    return find_gpus()[0]
