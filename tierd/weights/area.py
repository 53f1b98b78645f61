"""One model's weights area: its tensors in one sealed memory file, and its copy on disk.

Primitives: `Manifest` (`to_json()`, `from_json()`), `TensorEntry`, `AdapterMeta`,
`layer_of(name)`, `build(source, weights_dir, adapter=None) -> (Manifest, fd)`,
`materialize(manifest, weights_dir) -> fd`, `remove(fingerprint, weights_dir)`,
`read_only_fd(fd)`, `ALIGN`.

Layout: tensors outside the decoder layers first, then layer by layer (`model.layers.N.`),
each at a 64-byte aligned offset, so one layer is one contiguous range; tied tensors share
one offset. The fingerprint is the sha256 of a domain tag, the manifest's canonical JSON
(names, shapes, dtypes, offsets, config) and the area's bytes: it depends on the content
only, never on who registered it, its name or its path.

The area lives in a memfd sealed against writes, growing and shrinking once written, so
the descriptor handed to a worker can only be mapped read-only and never changes size
(no SIGBUS). The daemon does not keep it mapped: the pages are charged to the mappings of
the workers that read them.

On disk, `<fingerprint>.bin` holds the area's bytes and `<fingerprint>.json` the manifest;
both are written to temporary names, fsynced and renamed, the manifest last, so a
manifest on disk always names a complete area. A daemon that starts again re-reads the
area into a new memfd on first use and recomputes the fingerprint over manifest and bytes:
a mismatch is DataLoss, and the damaged files are renamed `*.corrupt` for inspection.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tierd.errors import DataLoss
from tierd.weights.sources import Source

log = logging.getLogger("tierd.weights")

ALIGN = 64
FORMAT = 1
_TAG = b"tierd-weights-v1\0"
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_CHUNK = 8 << 20
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int:
    """N of the first `layers.N.` in a tensor's name (`model.layers.N.`); -1 if none."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name without the prefix: bfloat16, int64, ...
    offset: int
    nbytes: int
    layer: int


@dataclass(frozen=True)
class AdapterMeta:
    """What a LoRA adapter's manifest records besides its tensors (see `adapters`)."""

    base: str  # the fingerprint of the model it adapts
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    size: int
    dtype: str
    config_json: str
    tensors: tuple[TensorEntry, ...]
    adapter: AdapterMeta | None = None  # set for a LoRA adapter

    @property
    def layers(self) -> int:
        return len({t.layer for t in self.tensors if t.layer >= 0})

    def canonical(self) -> bytes:
        """What the fingerprint covers besides the bytes (everything but itself)."""
        doc = {"format": FORMAT, "align": ALIGN, "size": self.size, "dtype": self.dtype,
               "config": self.config_json, "tensors": [asdict(t) for t in self.tensors]}  # fmt: skip
        if self.adapter is not None:  # absent for models: their fingerprints stay as they were
            doc["adapter"] = asdict(self.adapter)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint,
                           "manifest": json.loads(self.canonical())})  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        doc = json.loads(text)
        m = doc["manifest"]
        if m["format"] != FORMAT or m["align"] != ALIGN:
            raise ValueError(f"format {m['format']} align {m['align']}")
        tensors = tuple(TensorEntry(t["name"], tuple(t["shape"]), t["dtype"], t["offset"],
                                    t["nbytes"], t["layer"]) for t in m["tensors"])  # fmt: skip
        a = m.get("adapter")
        adapter = None if a is None else AdapterMeta(
            a["base"], a["rank"], a["alpha"], tuple(a["target_modules"]))  # fmt: skip
        return cls(doc["fingerprint"], m["size"], m["dtype"], m["config"], tensors, adapter)


def plan(source: Source) -> tuple[int, tuple[TensorEntry, ...]]:
    """The area's size and where each tensor goes (aliases at their target's offset)."""
    order = sorted(source.tensors, key=lambda t: (layer_of(t.name), t.name))
    at: dict[str, int] = {}
    entries, end = [], 0
    for t in order:
        if t.alias_of is None:
            at[t.name] = end
            end = _align(end + t.nbytes)
    for t in order:
        offset = at[t.alias_of] if t.alias_of is not None else at[t.name]
        entries.append(TensorEntry(t.name, t.shape, t.dtype, offset, t.nbytes,
                                   layer_of(t.name)))  # fmt: skip
    return max(end, ALIGN), tuple(entries)


def _new_memfd(size: int) -> int:
    fd = os.memfd_create("tierd-weights", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seal(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)


def _digest(canonical: bytes) -> Any:
    h = hashlib.sha256(_TAG)
    h.update(len(canonical).to_bytes(8, "little"))
    h.update(canonical)
    return h


def build(source: Source, size: int, entries: tuple[TensorEntry, ...], weights_dir: Path,
          adapter: AdapterMeta | None = None) -> tuple[Manifest, int]:  # fmt: skip
    """Write the source's tensors into a new sealed memfd and its copy on disk; returns
    the manifest and the descriptor (the caller owns it)."""
    import torch

    by_name = {t.name: t for t in source.tensors}
    fd = _new_memfd(size)
    try:
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as mm:
            area = torch.frombuffer(mm, dtype=torch.uint8)
            try:
                for e in entries:
                    t = by_name[e.name]
                    if t.alias_of is not None or not e.nbytes:
                        continue
                    src = t.load().contiguous().reshape(-1).view(torch.uint8)
                    area[e.offset : e.offset + e.nbytes].copy_(src)
                    del src
            finally:
                del area  # the mapping cannot close while a tensor exports it
            probe = Manifest("", size, source.dtype, source.config_json, entries, adapter)
            h = _digest(probe.canonical())
            for start in range(0, size, _CHUNK):
                h.update(mm[start : start + _CHUNK])
            manifest = Manifest(h.hexdigest(), size, source.dtype, source.config_json, entries,
                                adapter)  # fmt: skip
            _persist(manifest, mm, weights_dir)
        _seal(fd)
        return manifest, fd
    except BaseException:
        os.close(fd)
        raise


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _persist(manifest: Manifest, mm: mmap.mmap, weights_dir: Path) -> None:
    fp = manifest.fingerprint
    if (weights_dir / f"{fp}.json").exists():
        return  # the same content is on disk already (the fingerprint says so)

    def area(f: Any) -> None:
        for start in range(0, len(mm), _CHUNK):
            f.write(mm[start : start + _CHUNK])

    _write_atomic(weights_dir / f"{fp}.bin", area)
    _write_atomic(weights_dir / f"{fp}.json", lambda f: f.write(manifest.to_json().encode()))
    dir_fd = os.open(weights_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def materialize(manifest: Manifest, weights_dir: Path) -> int:
    """A sealed memfd of the area kept on disk, verified against the fingerprint."""
    fp = manifest.fingerprint
    path = weights_dir / f"{fp}.bin"
    h = _digest(Manifest("", manifest.size, manifest.dtype, manifest.config_json,
                         manifest.tensors, manifest.adapter).canonical())  # fmt: skip
    fd = _new_memfd(manifest.size)
    try:
        try:
            with open(path, "rb") as f, mmap.mmap(fd, manifest.size, flags=mmap.MAP_SHARED) as mm:
                if os.fstat(f.fileno()).st_size != manifest.size:
                    raise _damaged(manifest, weights_dir, "its area file has the wrong size")
                with memoryview(mm) as view:
                    for start in range(0, manifest.size, _CHUNK):
                        with view[start : start + _CHUNK] as chunk:
                            if f.readinto(chunk) != len(chunk):
                                raise _damaged(manifest, weights_dir, "its area file ended early")
                            h.update(chunk)
        except FileNotFoundError:
            raise _damaged(manifest, weights_dir, "its area file is missing") from None
        if h.hexdigest() != fp:
            raise _damaged(manifest, weights_dir, "its bytes do not match its fingerprint")
        _seal(fd)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _damaged(manifest: Manifest, weights_dir: Path, why: str) -> DataLoss:
    fp = manifest.fingerprint
    for suffix in (".bin", ".json"):
        try:
            os.replace(weights_dir / f"{fp}{suffix}", weights_dir / f"{fp}{suffix}.corrupt")
        except FileNotFoundError:
            pass
    log.error("model %s: %s; its files are kept as *.corrupt and it is dropped", fp, why)
    return DataLoss(f"the stored weights of model {fp[:16]} are damaged ({why}); "
                    "register the model again", field="model")  # fmt: skip


def remove(fingerprint: str, weights_dir: Path) -> None:
    for suffix in (".json", ".bin"):  # the manifest first: no manifest naming a lost area
        (weights_dir / f"{fingerprint}{suffix}").unlink(missing_ok=True)


def read_only_fd(fd: int) -> int:
    """A new read-only descriptor of a memfd (what is handed to a worker)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
