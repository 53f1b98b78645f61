"""Remote value headers with encodings: raw values keep the version 1 bytes (what daemons
before codecs wrote and read), encoded values are version 2 and name their encoding, and a
header a reader cannot use (an encoding it does not know, cut short, a version 1 reader's
length) is refused, never read as some other copy."""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from tierd.tiers.checksum import layer_checksums
from tierd.tiers.remote_value import decode, encode, header_bytes, max_header_bytes

NS, KEY = b"n" * 16, b"k" * 16
LAYERS = 2


def v1_value(data: bytes) -> bytes:
    """A raw value as the version 1 format lays it out, packed by hand."""
    sums = layer_checksums(memoryview(data), LAYERS)
    size = struct.calcsize("<8sHHIIQQ16s16s") + 8 * LAYERS + 8
    head = struct.pack("<8sHHIIQQ16s16s", b"TIERDRV1", 1, 0, size, LAYERS, len(data),
                       xxhash.xxh3_64_intdigest(data), NS, KEY)  # fmt: skip
    head += struct.pack(f"<{LAYERS}Q", *sums)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + data


def test_raw_values_are_the_version_1_bytes_and_read_back() -> None:
    data = np.random.default_rng(0).bytes(4096)
    value = encode(NS, KEY, data, xxhash.xxh3_64_intdigest(data), None, LAYERS)
    assert value == v1_value(data)
    h = decode(v1_value(data), NS, KEY, LAYERS)
    assert h is not None and (h.encoding, h.nbytes, h.size) == ("raw", 4096, header_bytes(2))
    assert (h.block_nbytes, h.block_checksum) == (h.nbytes, h.checksum)


def test_encoded_values_name_their_encoding_and_block() -> None:
    codes = np.random.default_rng(1).bytes(1200)
    value = encode(NS, KEY, codes, xxhash.xxh3_64_intdigest(codes), None, LAYERS,
                   "kivi4;k_group=8", 4096, 77)  # fmt: skip
    assert struct.unpack_from("<H", value, 8)[0] == 2
    hlen = header_bytes(LAYERS, "kivi4")
    assert hlen == max_header_bytes(LAYERS) > header_bytes(LAYERS)
    h = decode(value, NS, KEY, LAYERS)
    assert h is not None and h.size == hlen and value[hlen:] == codes
    assert (h.encoding, h.nbytes, h.block_nbytes, h.block_checksum) == (
        "kivi4;k_group=8", 1200, 4096, 77)  # fmt: skip
    # What a reader of the raw header's length sees: not an intact header.
    assert decode(value[: header_bytes(LAYERS)], NS, KEY, LAYERS) is None


def test_an_encoding_this_build_cannot_read_is_refused() -> None:
    codes = b"\1" * 64
    for name in ("zstd", "kivi4;k_group=x", "int8;bits=3"):
        value = encode(NS, KEY, codes, xxhash.xxh3_64_intdigest(codes), None, LAYERS, name,
                       4096, 1)  # fmt: skip
        assert decode(value, NS, KEY, LAYERS) is None, name
