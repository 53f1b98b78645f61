"""Which models the daemon holds, who may see them, and how many bytes they take.

Primitives: `ModelRegistry(capacity, weights_dir, roots=())`, `register(tenant, path,
dtype, name, shared, base_model="")`, `list(tenant, model="")`, `drop(tenant, model)`,
`fd_for(tenant, model) -> (fd, size, fingerprint)`, `close()`; for adapters and the KV
that depends on them (`tierd.core.adapters` decides): `adapter_for(tenant, adapter,
model)`, `sees(tenant, fingerprint)`, `adapters()`, `evict(fingerprint)`, the hooks
`reclaim` and `dropped`; `Registration`, `Held`, `AdapterUse`.

A registration is (tenant, name) -> fingerprint; an area is held once per fingerprint
however many registrations name it, and its bytes count against `capacity` once. The
rule of visibility: a tenant sees the models it registered, and every model some tenant
registered with `shared` set (that tenant chose to publish it; only it can drop it). A
model another tenant registered unshared is answered exactly like one that does not
exist. A name is looked up among the caller's own registrations first, then the shared
ones; a fingerprint names a model directly.

A LoRA adapter (`base_model` set: a PEFT directory, see `adapters`) is registered,
listed, shared and dropped like a model; it adapts a model the caller sees. When a
registration needs room over `capacity`, `reclaim(bytes)` (set by the core) may evict
cold adapters first; a drop calls `dropped()` once the registration is gone.

Registering reads the files only when this content is not held already: the registry
remembers, per fingerprint, the files it was read from (paths, sizes, modification times)
and the dtype asked for, and answers a repeat with the held fingerprint.

Everything is on disk under `weights_dir`: `models.json` (the registrations, replaced
atomically on each change) and per area `<fingerprint>.json` and `.bin` (see `area`).
Areas are put back into memory on first use after a restart, verified there.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tierd.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from tierd.weights import area
from tierd.weights.adapters import describe, open_adapter
from tierd.weights.area import Manifest
from tierd.weights.sources import open_source, resolve_dtype, within

log = logging.getLogger("tierd.weights")

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 256
MAX_MODELS = 4096


@dataclass(frozen=True)
class Registration:
    tenant: str
    name: str
    fingerprint: str
    shared: bool
    source: str
    dtype_asked: str  # "" when the default was taken
    stamp: list[Any]


@dataclass
class Held:
    manifest: Manifest
    fd: int | None = None  # the sealed memfd, once in memory


@dataclass(frozen=True)
class ModelView:
    """One registration as a caller sees it."""

    registration: Registration
    manifest: Manifest


@dataclass(frozen=True)
class AdapterUse:
    """One held adapter as the core's reclaim sees it."""

    fingerprint: str
    size: int
    last_used: float  # registered, named by a namespace, or handed to a client


def _fingerprint_like(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class ModelRegistry:
    def __init__(self, capacity: int, weights_dir: Path, roots: tuple[Path, ...] = ()) -> None:
        self.capacity = capacity
        self.dir = weights_dir
        self.roots = tuple(r.resolve() for r in roots)
        self._lock = threading.Lock()
        self._regs: dict[tuple[str, str], Registration] = {}
        self._held: dict[str, Held] = {}
        self._reserved = 0  # bytes of registrations being converted
        self._load_locks: dict[str, threading.Lock] = {}
        # fingerprint -> (tenants that registered it, whether one shared it): `sees`
        # answers from it on every call of an adapter's namespace, so it is kept, not scanned.
        self._sight: dict[str, tuple[frozenset[str], bool]] = {}
        self._last_used: dict[str, float] = {}
        self.reclaim: Callable[[int], None] | None = None
        self.dropped: Callable[[], None] | None = None
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._recover()

    # -- state on disk ----------------------------------------------------------------

    def _recover(self) -> None:
        path = self.dir / "models.json"
        rows: list[dict[str, Any]] = []
        if path.exists():
            try:
                rows = json.loads(path.read_text())["registrations"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("%s is unreadable (%s); registrations are lost, areas kept", path, e)
        for row in rows:
            try:
                reg = Registration(**row)
                if reg.fingerprint not in self._held:
                    text = (self.dir / f"{reg.fingerprint}.json").read_text()
                    manifest = Manifest.from_json(text)
                    if manifest.fingerprint != reg.fingerprint:
                        raise ValueError("the manifest names another fingerprint")
                    self._held[reg.fingerprint] = Held(manifest)
                self._regs[(reg.tenant, reg.name)] = reg
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("model registration %r dropped at start: %s", row, e)
        for p in self.dir.iterdir():  # areas no registration names (a crash mid-register)
            fp = p.name.split(".", 1)[0]
            if p.suffix in (".bin", ".json", ".tmp") and _fingerprint_like(fp) \
                    and fp not in self._held:  # fmt: skip
                p.unlink(missing_ok=True)
        self._see()
        if self._regs:
            log.info("%d model registrations, %d areas (%d bytes) on record", len(self._regs),
                     len(self._held), self.used_bytes())  # fmt: skip

    def _see(self) -> None:
        sight: dict[str, tuple[set[str], bool]] = {}
        for r in self._regs.values():
            tenants, shared = sight.setdefault(r.fingerprint, (set(), False))
            tenants.add(r.tenant)
            sight[r.fingerprint] = (tenants, shared or r.shared)
        self._sight = {fp: (frozenset(t), sh) for fp, (t, sh) in sight.items()}

    def _save(self) -> None:
        """Write the registrations; the caller holds the lock."""
        self._see()
        doc = {"registrations": [asdict(r) for r in self._regs.values()]}
        tmp = self.dir / "models.json.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "models.json")

    def used_bytes(self) -> int:
        return sum(h.manifest.size for h in self._held.values())

    # -- calls --------------------------------------------------------------------------

    def _check_path(self, path: str) -> Path:
        if not path:
            raise InvalidArgument("name the model's path (a safetensors directory or a GGUF "
                                  "file)", field="path")  # fmt: skip
        if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or "\0" in path:
            raise InvalidArgument("path too long or not a path", field="path")
        p = Path(path)
        within(self.roots, [p])
        return p

    def register(self, tenant: str, path: str, dtype: str, name: str, shared: bool,
                 base_model: str = "") -> tuple[ModelView, bool]:  # fmt: skip
        """Hold the model (with `base_model`: the LoRA adapter of that model) at `path` for
        `tenant`; returns it and whether it is new to them."""
        view, created = self._register(tenant, path, dtype, name, shared, base_model)
        if not created and not shared and self.dropped is not None:
            self.dropped()  # registered again unshared: other tenants may no longer see it
        return view, created

    def _register(self, tenant: str, path: str, dtype: str, name: str, shared: bool,
                  base_model: str) -> tuple[ModelView, bool]:  # fmt: skip
        if not tenant:
            raise InvalidArgument("a tenant name is required", field="tenant")
        asked = resolve_dtype(dtype)
        p = self._check_path(path)
        name = name or p.name.removesuffix(".gguf").removesuffix(".safetensors") or "model"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise InvalidArgument(f"a model name is at most {MAX_NAME_BYTES} bytes", field="name")
        if _fingerprint_like(name):
            raise InvalidArgument("a model name must not look like a fingerprint", field="name")
        meta = None
        if base_model:
            with self._lock:
                try:
                    base = self._held[self._find(tenant, base_model).fingerprint].manifest
                except NotFound:
                    raise NotFound(f"no model {base_model!r} to adapt (register it first)",
                                   field="base_model") from None  # fmt: skip
            source = open_adapter(p, asked, self.roots)
        else:
            source = open_source(p, asked, self.roots)
        try:
            if base_model:
                meta = describe(source, base)
            size, entries = area.plan(source)
            with self._lock:
                fp = next((r.fingerprint for r in self._regs.values()
                           if r.stamp == source.stamp and r.dtype_asked == asked
                           and r.fingerprint in self._held
                           and self._held[r.fingerprint].manifest.adapter == meta), None)  # fmt: skip
                if fp is not None:
                    return self._add(tenant, name, fp, shared, source.stamp, asked, str(p))
                short = self._shortfall(size)
            if short > 0 and self.reclaim is not None:
                self.reclaim(short)  # evicts cold adapters (and their KV first), or refuses
            with self._lock:
                self._check_room(size)
                self._reserved += size
            try:
                manifest, fd = area.build(source, size, entries, self.dir, meta)
            finally:
                with self._lock:
                    self._reserved -= size
            with self._lock:
                held = self._held.get(manifest.fingerprint)
                if held is None:
                    self._held[manifest.fingerprint] = Held(manifest, fd)
                elif held.fd is None:
                    held.fd = fd
                else:
                    os.close(fd)  # a concurrent registration of the same content won
                try:
                    return self._add(tenant, name, manifest.fingerprint, shared, source.stamp,
                                     asked, str(p))  # fmt: skip
                except BaseException:
                    self._forget_unused(manifest.fingerprint)
                    raise
        finally:
            source.close()

    def _shortfall(self, size: int) -> int:
        """Bytes over `capacity` were `size` more held; the caller holds the lock."""
        return self.used_bytes() + self._reserved + size - self.capacity

    def _check_room(self, size: int) -> None:
        used = self.used_bytes() + self._reserved
        if len(self._held) >= MAX_MODELS:
            raise ResourceExhausted(f"the daemon holds {MAX_MODELS} models already", field="path")
        if used + size > self.capacity:
            raise ResourceExhausted(
                f"the model takes {size} bytes and weights.capacity is {self.capacity}, of "
                f"which {used} are held: drop a model or raise the capacity",
                field="path",
            )

    def _add(self, tenant: str, name: str, fp: str, shared: bool, stamp: list[Any],
             asked: str, source: str) -> tuple[ModelView, bool]:  # fmt: skip
        """Record (tenant, name) -> fp; the caller holds the lock."""
        cur = self._regs.get((tenant, name))
        if cur is not None:
            if cur.fingerprint != fp:
                raise FailedPrecondition(
                    f"this tenant's model {name!r} is other content ({cur.fingerprint[:16]}); "
                    "drop it first or choose another name",
                    field="name",
                )
            if cur.shared == shared:
                return ModelView(cur, self._held[fp].manifest), False
        reg = Registration(tenant, name, fp, shared, source, asked, stamp)
        self._regs[(tenant, name)] = reg
        try:
            self._save()
        except BaseException:
            if cur is None:
                del self._regs[(tenant, name)]
            else:
                self._regs[(tenant, name)] = cur
            self._see()
            raise
        self._last_used[fp] = time.time()
        return ModelView(reg, self._held[fp].manifest), cur is None

    def _forget_unused(self, fp: str) -> None:
        """Let an area no registration names go; the caller holds the lock."""
        if any(r.fingerprint == fp for r in self._regs.values()):
            return
        held = self._held.pop(fp, None)
        if held is not None and held.fd is not None:
            os.close(held.fd)  # workers' mappings keep their pages until they unmap
        self._last_used.pop(fp, None)
        area.remove(fp, self.dir)

    def _visible(self, tenant: str) -> list[Registration]:
        return [r for r in self._regs.values() if r.tenant == tenant or r.shared]

    def _find(self, tenant: str, model: str) -> Registration:
        """The registration `model` (a name or fingerprint) means to `tenant`."""
        if not model:
            raise InvalidArgument("name a model (its name or fingerprint)", field="model")
        seen = self._visible(tenant)
        found = ([r for r in seen if r.fingerprint == model] if _fingerprint_like(model)
                 else [r for r in seen if r.name == model])  # fmt: skip
        own = [r for r in found if r.tenant == tenant]
        if own or found:
            return (own or found)[0]
        raise NotFound(f"no model {model!r} (register it first)", field="model")

    def list(self, tenant: str, model: str = "") -> list[ModelView]:
        with self._lock:
            regs = [self._find(tenant, model)] if model else self._visible(tenant)
            return [ModelView(r, self._held[r.fingerprint].manifest)
                    for r in sorted(regs, key=lambda r: (r.tenant != tenant, r.name))]  # fmt: skip

    def drop(self, tenant: str, model: str) -> None:
        """Forget the caller's own registration; the area goes when nobody names it."""
        with self._lock:
            reg = self._find(tenant, model)
            if reg.tenant != tenant:
                raise FailedPrecondition(f"model {model!r} was shared by another tenant; only "
                                         "it can drop it", field="model")  # fmt: skip
            del self._regs[(reg.tenant, reg.name)]
            try:
                self._save()
            except BaseException:
                self._regs[(reg.tenant, reg.name)] = reg
                self._see()
                raise
            self._forget_unused(reg.fingerprint)
        if self.dropped is not None:
            self.dropped()  # KV that depended on what this tenant no longer sees goes now

    # -- adapters and the KV that depends on them (tierd.core.adapters decides) -----------

    def adapter_for(self, tenant: str, adapter: str, model: str) -> str:
        """The fingerprint of the adapter `adapter` (a name or fingerprint `tenant` sees)
        of the model whose fingerprint is `model`; a namespace names it, so it is used."""
        with self._lock:
            try:
                reg = self._find(tenant, adapter)
            except NotFound:
                raise NotFound(f"no adapter {adapter!r} (register it first)",
                               field="namespace.adapter") from None  # fmt: skip
            meta = self._held[reg.fingerprint].manifest.adapter
            if meta is None:
                raise InvalidArgument(f"{adapter!r} is a model, not an adapter",
                                      field="namespace.adapter")  # fmt: skip
            if meta.base != model:
                raise InvalidArgument(f"adapter {adapter!r} adapts model {meta.base[:16]}, not "
                                      f"{model[:16]}", field="namespace.adapter")  # fmt: skip
            self._last_used[reg.fingerprint] = time.time()
            return reg.fingerprint

    def sees(self, tenant: str, fingerprint: str) -> bool:
        """Whether `tenant` sees the content `fingerprint` (its own or a shared one). No
        lock: one read of a map replaced whole on every change."""
        tenants, shared = self._sight.get(fingerprint, (frozenset(), False))
        return shared or tenant in tenants

    def adapters(self) -> tuple[AdapterUse, ...]:
        """The adapters held, with their sizes and when each was last used."""
        with self._lock:
            return tuple(AdapterUse(fp, h.manifest.size, self._last_used.get(fp, 0.0))
                         for fp, h in self._held.items() if h.manifest.adapter is not None)  # fmt: skip

    def evict(self, fingerprint: str) -> None:
        """Forget every registration of an adapter and its area (the core's reclaim, once
        the KV that depends on it is gone)."""
        with self._lock:
            held = self._held.get(fingerprint)
            if held is None or held.manifest.adapter is None:
                return
            gone = {k: r for k, r in self._regs.items() if r.fingerprint == fingerprint}
            for key in gone:
                del self._regs[key]
            try:
                self._save()
            except BaseException:
                self._regs.update(gone)
                self._see()
                raise
            self._forget_unused(fingerprint)
        log.info("adapter %s evicted to make room (%d bytes)", fingerprint[:16],
                 held.manifest.size)  # fmt: skip

    def fd_for(self, tenant: str, model: str) -> tuple[int, int, str]:
        """A new read-only descriptor of the model's area (the caller closes it), its size
        and fingerprint. After a restart the area is read back and verified first."""
        with self._lock:
            fp = self._find(tenant, model).fingerprint
            load_lock = self._load_locks.setdefault(fp, threading.Lock())
            self._last_used[fp] = time.time()
        with load_lock:  # one reader of the file per area; others wait for it
            with self._lock:
                held = self._held.get(fp)
                if held is None:
                    raise NotFound(f"no model {model!r} (dropped meanwhile)", field="model")
                if held.fd is not None:
                    return area.read_only_fd(held.fd), held.manifest.size, fp
                manifest = held.manifest
            try:
                fd = area.materialize(manifest, self.dir)
            except Exception:
                with self._lock:
                    for key in [k for k, r in self._regs.items() if r.fingerprint == fp]:
                        del self._regs[key]
                    self._held.pop(fp, None)
                    self._save()
                raise
            with self._lock:
                held = self._held.get(fp)
                if held is None:  # dropped while it was read back
                    os.close(fd)
                    raise NotFound(f"no model {model!r} (dropped meanwhile)", field="model")
                held.fd = fd
                return area.read_only_fd(fd), manifest.size, fp

    def close(self) -> None:
        with self._lock:
            for held in self._held.values():
                if held.fd is not None:
                    os.close(held.fd)
                    held.fd = None
