"""Mappings of the daemon's shared-memory segments and views of the slots in them.

Primitives: `SegmentMaps()` (`.map(segment) -> mmap`, `.unusable(segment) -> reason|None`,
`.close()`), `slot_view(mm, offset, layout) -> np.ndarray`.

Each segment file is mapped once (opened O_RDWR, MAP_SHARED) and reused by every put and
get. Every Prepare response names the segment again, so a mapping is replaced when the
segment grew or when the path now names a different file: a daemon that restarted
recreates its segment under the same path, and writing into the old, unlinked file would
silently lose every block. One `stat` per prepare is cheap next to the RPC it follows.

Replaced mappings are not closed here: another thread may be copying through a view of
one, and the mmap unmaps itself once the last view is gone.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import Internal
from .hostinfo import host_id
from .layout import KVLayout


@dataclass(frozen=True)
class _Mapping:
    mm: mmap.mmap
    size: int
    dev: int
    ino: int


class SegmentMaps:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, _Mapping] = {}

    def map(self, segment: Any) -> mmap.mmap:
        """The mapping of `segment` (a ShmSegment or SegmentInfo: path, size)."""
        path, size = segment.path, int(segment.size)
        if not path or size <= 0:
            raise Internal(f"daemon sent an unusable segment ({path!r}, {size})", field="segment")
        st = os.stat(path)
        with self._lock:
            cur = self._maps.get(path)
            if cur and cur.size >= size and (cur.dev, cur.ino) == (st.st_dev, st.st_ino):
                return cur.mm
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if st.st_size < size:
                    # Mapping past the end of the file would SIGBUS on first touch.
                    raise Internal(
                        f"segment {path} has {st.st_size} bytes, daemon says {size}",
                        field="segment.size",
                    )
                mm = mmap.mmap(
                    fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            finally:
                os.close(fd)
            self._maps[path] = _Mapping(mm, size, st.st_dev, st.st_ino)
            return mm

    def unusable(self, segment: Any) -> str | None:
        """Why this process cannot use `segment` (None: it can, and it is now mapped)."""
        if segment is None or not segment.path:
            return "the daemon offers no shared-memory segment"
        if segment.host_id != host_id():
            return f"the daemon runs on another host ({segment.host_id!r})"
        try:
            self.map(segment)
        except (OSError, ValueError, Internal) as e:
            return f"cannot map {segment.path}: {e}"
        return None

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for m in maps.values():
            try:
                m.mm.close()
            except BufferError:
                pass  # a view is still alive somewhere; it unmaps when that view dies


def slot_view(mm: mmap.mmap, offset: int, layout: KVLayout) -> np.ndarray:
    """The block at `offset` as a writeable [*block_shape] array over the mapping."""
    if offset + layout.block_bytes > len(mm):
        raise Internal(
            f"slot at {offset} (+{layout.block_bytes}) lies outside the {len(mm)}-byte segment",
            field="offset",
        )
    flat = np.frombuffer(mm, dtype=layout.numpy_dtype, count=layout.block_elems, offset=offset)
    return flat.reshape(layout.block_shape)
