"""Codecs per tier in the core: which encoding a namespace gets in a tier, moves between
tiers of different codecs (decode, then encode), what the catalog keeps of an encoded
copy, and attend over codes against attention over the decoded blocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.attention.test_attend_core import dense, put_sequence
from tierd.attention.attend import AttendCall
from tierd.config import Config, TierSpec
from tierd.core.catalog import Catalog
from tierd.core.service import CacheService
from tierd.core.startup import CATALOG_FILE
from tierd.errors import Unavailable
from tierd.transfer.encoding import RAW, encoding_for, stored_bytes
from tierd_client.layout import KVLayout
from tierd_kernels.codecs import make_codec

LAY = KVLayout(3, 2, 64, "bfloat16", 16)  # what put_sequence writes: 3 layers, 2 KV heads


def chain(data_dir: Path) -> Config:
    bb = LAY.block_bytes
    return Config(data_dir=data_dir, tier_list=(
        TierSpec("mem", "host", 64 * bb, options=(("pin_memory", False),)),
        TierSpec("near", "nvme", 64 * bb, codec="int8"),
        TierSpec("far", "nvme", 64 * bb, codec="kivi2", codec_params=(("v_group", 32),)),
    )).resolved()  # fmt: skip


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[CacheService]:
    s = CacheService(chain(tmp_path / "data"))
    s.start()
    yield s
    s.close()
    s.top.arena.destroy()


def decoded(name: str, block: torch.Tensor, dtype: torch.dtype | None = None,
            **params: int) -> torch.Tensor:  # fmt: skip
    codec = make_codec(name, **params)
    return codec.decode(codec.encode(block), tuple(block.shape), dtype or block.dtype)


def blocks_of(kv: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [kv[:, :, :, i * 16 : (i + 1) * 16].contiguous() for i in range(n)]


def test_which_encoding_a_namespace_gets(svc: CacheService) -> None:
    near, far = svc.tiers.get("near"), svc.tiers.get("far")
    ns, _ = svc.open_namespace("t", "m", LAY)
    assert (encoding_for(svc.top, ns), encoding_for(near, ns)) == (RAW, "int8")
    assert encoding_for(far, ns) == "kivi2;v_group=32"  # the options travel with the copy
    exact, _ = svc.open_namespace("t", "m", LAY, lossless=True)
    assert exact.id != ns.id and encoding_for(near, exact) == RAW
    odd, _ = svc.open_namespace("t", "m", KVLayout(3, 2, 48, "bfloat16", 16))
    assert encoding_for(far, odd) == RAW  # v_group 32 does not divide head dim 48
    bytes_, _ = svc.open_namespace("t", "m", KVLayout(3, 2, 64, "uint8", 16))
    assert encoding_for(near, bytes_) == RAW  # one byte per value: int8 saves nothing
    assert stored_bytes("int8", LAY) == 3 * (2 * 2 * 16 * 64 + 4 * 2 * 2 * 16)


def test_moves_between_codecs_decode_then_encode_and_persist(svc: CacheService) -> None:
    ns, keys, _, kv = put_sequence(svc, LAY, 4, seed=7)
    blocks = blocks_of(kv, 4)
    assert svc.move(ns.id, keys, "near") == 4
    entry = svc.index.get(ns.id, keys[0])
    near = entry.copies["near"]
    assert (near.encoding, near.length) == ("int8", stored_bytes("int8", LAY))
    assert near.checksum != entry.checksum and len(near.layer_sums) == LAY.num_layers
    assert svc.tiers.get("near").used_bytes < 4 * LAY.block_bytes

    assert svc.move(ns.id, keys, "far") == 4  # int8 codes -> bfloat16 -> kivi2 codes
    far = entry.copies["far"]
    assert list(entry.copies) == ["far"] and far.encoding == "kivi2;v_group=32"
    assert far.length == stored_bytes(far.encoding, LAY)

    # The catalog holds what a restart needs to read the copy.
    rows = {r.key: r for r in Catalog(svc.config.data_dir / CATALOG_FILE).blocks()}
    (row,) = rows[keys[0]].copies
    assert (row.encoding, row.length, row.checksum, row.layer_sums) == (
        far.encoding, far.length, far.checksum, far.layer_sums)  # fmt: skip

    # A get decodes it: both codecs' error, and exactly int8 then kivi2.
    got = svc.prepare_get(ns.id, keys[:1])
    out = torch.frombuffer(bytearray(svc.view(ns, got.slots[0].offset)), dtype=torch.bfloat16)
    svc.release(got.lease_id)
    want = decoded("kivi2", decoded("int8", blocks[0]), v_group=32)
    assert torch.equal(out.view(LAY.block_shape), want)
    memory = svc.index.get(ns.id, keys[0]).copies["mem"]
    assert memory.encoding == RAW and memory.checksum != entry.checksum
    assert memory.layer_sums is not None  # not the block as put: its own sums


def test_attend_on_codes_equals_attend_on_decoded_blocks(svc: CacheService) -> None:
    ns, keys, _, kv = put_sequence(svc, LAY, 5, seed=3)
    blocks = blocks_of(kv, 5)
    assert svc.move(ns.id, keys[:2], "near") == 2
    assert svc.move(ns.id, keys[2:4], "far") == 2
    # Codes are computed on in float32: the dequantized values, unrounded to bfloat16.
    f32 = torch.float32
    seen = [decoded("int8", b, f32) for b in blocks[:2]]
    seen += [decoded("kivi2", b, f32, v_group=32) for b in blocks[2:4]]
    seen += [b.float() for b in blocks[4:]]
    kv_seen = torch.cat(seen, dim=3)
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    for layer in range(LAY.num_layers):
        q = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(layer))
        ((out, _),) = svc.attend.attend([AttendCall(seq_id, layer, q)])
        want = dense(q, kv_seen[layer, 0].float(), kv_seen[layer, 1].float())
        assert ((out.double() - want).norm() / want.norm()) <= 1e-5
    svc.attend.close_sequence(seq_id)


def test_a_block_kivi_cannot_hold_stays_exact_and_is_never_served_as_nan(
    svc: CacheService,
) -> None:
    ns, _, _, kv = put_sequence(svc, LAY, 1, seed=11)
    big = kv.clone()
    big[0, 0, 0, 0, 0] = -1e5  # finite in bfloat16; past float16's range
    key = bytes(16)
    held = svc.store_block(ns, key, memoryview(big[:, :, :, :16].contiguous().view(torch.uint8)
                                               .numpy()).cast("B"))  # fmt: skip
    assert held is not None
    with svc.cond:
        svc.drop_reader(held)
    with pytest.raises(Unavailable):
        svc.move(ns.id, [key], "far")  # kivi2 refuses it: no copy made, nothing dropped
    assert list(held.copies) == ["mem"]
    got = svc.prepare_get(ns.id, [key])
    out = torch.frombuffer(bytearray(svc.view(ns, got.slots[0].offset)), dtype=torch.bfloat16)
    svc.release(got.lease_id)
    assert torch.equal(out.view(LAY.block_shape), big[:, :, :, :16])
