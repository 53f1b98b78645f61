"""In-band framing: block payloads cut into stream chunks and put back together.

Primitives: `CHUNK_BYTES`, `iter_chunks(pieces, chunk_bytes) -> Iterator[bytes]`,
`put_chunks(header, pieces, chunk_bytes) -> Iterator[PutChunk]`,
`GetAssembler(dest, block_bytes)` (`.feed(chunk)`, `.finish() -> found`).

The proto only fixes the concatenation (`len(keys) * block_bytes` bytes for a put, the
found blocks in order for a get), so chunk boundaries need not meet block boundaries:
pieces are re-cut into chunks of exactly `chunk_bytes` (the last one shorter). Protobuf
`bytes` fields only take `bytes`, so each chunk costs one copy out of the caller's memory
(never the whole payload at once); a get writes each chunk's bytes straight into the rows
of the output buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ._proto import tierd_pb2 as pb
from .errors import Internal

# Well under the 64 MiB message limit, big enough that per-message cost is noise.
CHUNK_BYTES = 4 << 20


def _join(parts: list[memoryview]) -> bytes:
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


def iter_chunks(pieces: Iterable[memoryview], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of `pieces`, concatenated and re-cut into chunks of `chunk_bytes`."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    parts: list[memoryview] = []
    have = 0
    for piece in pieces:
        mv = memoryview(piece).cast("B")
        pos = 0
        while pos < len(mv):
            take = min(chunk_bytes - have, len(mv) - pos)
            parts.append(mv[pos : pos + take])
            have += take
            pos += take
            if have == chunk_bytes:
                yield _join(parts)
                parts, have = [], 0
    if parts:
        yield _join(parts)


def put_chunks(
    header: pb.PutHeader, pieces: Iterable[memoryview], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.PutChunk]:
    """The request stream of an in-band Put: the header rides on the first chunk."""
    first = True
    for data in iter_chunks(pieces, chunk_bytes):
        yield pb.PutChunk(header=header, data=data) if first else pb.PutChunk(data=data)
        first = False
    if first:  # no payload at all: the header still has to travel
        yield pb.PutChunk(header=header)


class GetAssembler:
    """Writes the found blocks of a Get stream into the rows of `dest` ([n, block_bytes] u8).

    Rows of missing keys are never written.
    """

    def __init__(self, dest: np.ndarray, block_bytes: int) -> None:
        if dest.ndim != 2 or dest.dtype != np.uint8 or dest.shape[1] != block_bytes:
            raise ValueError("dest must be a [n, block_bytes] uint8 array")
        self._dest = dest
        self._block_bytes = block_bytes
        self._found: list[bool] | None = None
        self._rows: list[int] = []
        self._pos = 0  # bytes received so far

    def feed(self, chunk: pb.GetChunk) -> None:
        if self._found is None:
            self._start(chunk)
        data = memoryview(chunk.data)
        bb = self._block_bytes
        if self._pos + len(data) > len(self._rows) * bb:
            raise Internal("Get stream carried more bytes than its found blocks", field="data")
        done = 0
        while done < len(data):
            i, off = divmod(self._pos, bb)
            take = min(bb - off, len(data) - done)
            self._dest[self._rows[i], off : off + take] = np.frombuffer(
                data, dtype=np.uint8, count=take, offset=done
            )
            done += take
            self._pos += take

    def _start(self, chunk: pb.GetChunk) -> None:
        n = self._dest.shape[0]
        if len(chunk.found) != n:
            raise Internal(f"Get stream reported {len(chunk.found)} keys for {n}", field="found")
        # block_bytes only matters when bytes follow; a daemon may leave it 0 on all-miss.
        if any(chunk.found) and chunk.block_bytes != self._block_bytes:
            raise Internal(
                f"Get stream block_bytes {chunk.block_bytes} != {self._block_bytes}",
                field="block_bytes",
            )
        self._found = list(chunk.found)
        self._rows = [i for i, f in enumerate(self._found) if f]

    def finish(self) -> list[bool]:
        if self._found is None:
            if self._dest.shape[0] == 0:
                return []
            raise Internal("Get stream ended before its first chunk", field="found")
        if self._pos != len(self._rows) * self._block_bytes:
            raise Internal(
                f"Get stream ended after {self._pos} of "
                f"{len(self._rows) * self._block_bytes} bytes",
                field="data",
            )
        return self._found
