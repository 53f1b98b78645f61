"""The tenant's shared memory in this process: received as descriptors, mapped once.

Primitives: `SegmentMaps(tenant, token)` (`.map(segment) -> Mapping`,
`.unusable(segment) -> reason | None`, `.close()`), `receive_fds(...)`, `exchange(...)`
(one handoff exchange: the shared-memory, attend-ring and weights handoffs all use it),
`slot_view(mm, offset, layout) -> np.ndarray`.

The daemon never gives out a path. A client connects to the handoff socket the daemon
names (`segment.handoff`), proves its tenant (the bearer token, or in open mode just the
tenant's name, guarded by the socket's permissions), and receives two descriptors: the
tenant's block segment, read-only (gets copy out of it), and its staging area,
read-write (puts copy into it; the daemon copies committed slots out). A restarted daemon
announces a new `instance` (as does one that replaced a tenant's staging area after a
lease expired); mappings of the old one are replaced, since writing into staging the
daemon no longer reads would silently lose every block.

Replaced mappings are not closed here: another thread may be copying through a view of
one, and the mmap unmaps itself once the last view is gone.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from . import errors
from .errors import Internal
from .hostinfo import host_id
from .layout import KVLayout

HANDOFF_TIMEOUT = 5.0
T = TypeVar("T")
_MAX_REPLY = 4096


@dataclass(frozen=True)
class Mapping:
    store: mmap.mmap  # the block segment, read-only: get slots
    staging: mmap.mmap  # put slots
    instance: bytes


@dataclass(frozen=True)
class HandedFds:
    segment_fd: int
    size: int
    staging_fd: int
    staging_size: int
    instance: bytes


def exchange(handoff: str, request: dict[str, Any], *, max_fds: int, timeout: float,
             what: str, field: str, parse: Callable[[dict[str, Any], list[int]], T],
             keep: bool = False) -> tuple[T, socket.socket | None]:  # fmt: skip
    """One handoff exchange: send `request` (JSON) to the daemon at `handoff`, receive its
    reply with up to `max_fds` descriptors, and `parse(reply, fds)` into the result. A
    refusal raises the error class the daemon named (`what` refused); anything garbled,
    refused or timed out raises Unavailable; either way every descriptor received (and
    the connection) is closed. `keep`: return the open connection too (its life is the
    caller's: an attend ring lives as long as it); else it is closed and None returned."""
    fds: list[int] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(handoff)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_REPLY, max_fds)
        while b"\n" not in data and len(data) < _MAX_REPLY:
            more = sock.recv(_MAX_REPLY - len(data))
            if not more:
                break
            data += more
        reply = json.loads(data.split(b"\n", 1)[0])
        if not isinstance(reply, dict):
            raise TypeError("not a JSON object")
        if not reply.get("ok"):
            cls = getattr(errors, str(reply.get("code")), None)
            if not (isinstance(cls, type) and issubclass(cls, errors.TierdError)):
                cls = errors.Unavailable
            raise cls(f"{what} refused: {reply.get('error')}", field=field)
        result = parse(reply, fds)
    except BaseException as e:
        sock.close()
        _close_all(fds)
        if isinstance(e, (OSError, ValueError, KeyError, TypeError)) and not isinstance(
            e, errors.TierdError
        ):  # timeout, refused, garbled
            raise errors.Unavailable(f"{what} handoff at {handoff} failed: {e!r}",
                                     field=field) from e  # fmt: skip
        raise
    if keep:
        sock.settimeout(None)
        return result, sock
    sock.close()
    return result, None


def receive_fds(handoff: str, tenant: str, token: str | None,
                timeout: float = HANDOFF_TIMEOUT) -> HandedFds:  # fmt: skip
    """Ask the daemon at `handoff` for `tenant`'s shared memory; the caller owns the fds."""

    def parse(reply: dict[str, Any], fds: list[int]) -> HandedFds:
        if len(fds) != 2:
            raise Internal(f"daemon handed over {len(fds)} descriptors, not 2",
                           field="segment")  # fmt: skip
        return HandedFds(fds[0], int(reply["size"]), fds[1], int(reply["staging_size"]),
                         bytes.fromhex(reply["instance"]))  # fmt: skip

    handed, _ = exchange(handoff, {"tenant": tenant, "token": token}, max_fds=2,
                         timeout=timeout, what="shared memory", field="segment",
                         parse=parse)  # fmt: skip
    return handed


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


STALE_FIELD = "segment.instance"  # the field of the error that says "ask again"


class SegmentMaps:
    def __init__(self, tenant: str = "", token: str | None = None) -> None:
        self._tenant = tenant
        self._token = token
        self._lock = threading.Lock()
        self._maps: dict[str, Mapping] = {}

    def map(self, segment: Any) -> Mapping:
        """The mappings of `segment` (a ShmSegment or SegmentInfo)."""
        handoff, instance = segment.handoff, bytes(segment.instance)
        if not handoff or int(segment.size) <= 0 or int(segment.staging_size) <= 0:
            raise Internal("daemon sent an unusable segment", field="segment")
        with self._lock:
            cur = self._maps.get(handoff)
            if cur is not None and cur.instance == instance:
                return cur
            fds = receive_fds(handoff, self._tenant, self._token)
            try:
                if fds.instance != instance:
                    # It restarted, or replaced its staging area, since it answered: the
                    # caller's retry asks again.
                    raise errors.Unavailable("the daemon's shared memory changed during the "
                                             "handoff; retry", field=STALE_FIELD)  # fmt: skip
                if (fds.size, fds.staging_size) != (int(segment.size), int(segment.staging_size)):
                    raise Internal(
                        f"daemon announced {segment.size}/{segment.staging_size} bytes and "
                        f"handed over {fds.size}/{fds.staging_size}", field="segment.size",
                    )
                store = _map(fds.segment_fd, fds.size, mmap.PROT_READ)
                staging = _map(fds.staging_fd, fds.staging_size,
                               mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            finally:
                os.close(fds.segment_fd)
                os.close(fds.staging_fd)
            self._maps[handoff] = cur = Mapping(store, staging, instance)
            return cur

    def unusable(self, segment: Any) -> str | None:
        """Why this process cannot use `segment` (None: it can, and it is now mapped)."""
        if segment is None or not segment.handoff:
            return "the daemon offers no shared memory"
        if segment.host_id != host_id():
            return f"the daemon runs on another host ({segment.host_id!r})"
        try:
            self.map(segment)
        except errors.Unavailable as e:
            if e.field == STALE_FIELD:  # the answer named an area since replaced: ask again
                raise
            return f"cannot map the shared memory of {segment.handoff}: {e}"
        except (OSError, ValueError, errors.TierdError) as e:
            return f"cannot map the shared memory of {segment.handoff}: {e}"
        return None

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for m in maps.values():
            for mm in (m.store, m.staging):
                try:
                    mm.close()
                except BufferError:
                    pass  # a view is still alive somewhere; it unmaps when that view dies


def _map(fd: int, size: int, prot: int) -> mmap.mmap:
    st = os.fstat(fd)
    if st.st_size < size:  # mapping past the end would SIGBUS on first touch
        raise Internal(f"shared memory has {st.st_size} bytes, daemon says {size}",
                       field="segment.size")  # fmt: skip
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)


def slot_view(mm: mmap.mmap, offset: int, layout: KVLayout) -> np.ndarray:
    """The block at `offset` as a [*block_shape] array over the mapping (read-only when
    the mapping is)."""
    if offset + layout.block_bytes > len(mm):
        raise Internal(
            f"slot at {offset} (+{layout.block_bytes}) lies outside the {len(mm)}-byte segment",
            field="offset",
        )
    flat = np.frombuffer(mm, dtype=layout.numpy_dtype, count=layout.block_elems, offset=offset)
    return flat.reshape(layout.block_shape)
