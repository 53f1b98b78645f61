"""Attend over blocks in a storage tier reads a step's layer ranges while the step before is
reduced: results stay exact, damage found in a later step still fails the call, and no
read is left running into a scratch buffer after the call returns or raises."""

from __future__ import annotations

import pytest

import tierd.attention.engine as attention_engine
import tierd_kernels
from tests.attention.test_attend_core import LAYERS, layout, service
from tests.attention.test_attend_core import put_sequence as put_blocks
from tests.attention.test_attend_integrity import attend, check_exact, flip
from tierd.core.service import CacheService
from tierd.errors import DataLoss


@pytest.fixture
def core(tmp_path):
    yield from service(tmp_path, 64)


@pytest.fixture
def one_block_steps(monkeypatch):
    """Every block its own pipeline step."""
    monkeypatch.setattr(attention_engine, "PIPELINE_BYTES", 1)


@pytest.fixture
def events(core: CacheService, monkeypatch):
    """What the engine starts and reduces, in order: ("read", n blocks) and ("reduce", n)."""
    log: list[tuple[str, int]] = []
    start, reduce = core.transfer.start_ranges, tierd_kernels.attend_blocks

    def start_ranges(reads, scratch):
        log.append(("read", len(reads)))
        return start(reads, scratch)

    def attend_blocks(blocks, *args, **kwargs):
        log.append(("reduce", len(blocks)))
        return reduce(blocks, *args, **kwargs)

    monkeypatch.setattr(core.transfer, "start_ranges", start_ranges)
    monkeypatch.setattr(tierd_kernels, "attend_blocks", attend_blocks)
    return log


@pytest.mark.usefixtures("one_block_steps")
def test_reads_of_the_next_two_steps_start_before_this_step_is_reduced(core, events):
    svc = core
    ns, keys, _, kv = put_blocks(svc, layout("float32"), 5, seed=11)
    assert svc.move(ns.id, keys, "nvme") == len(keys)
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    for layer in range(LAYERS):
        events.clear()
        check_exact(svc, seq_id, kv, layer)
        # read 0, read 1, read 2, reduce 0, read 3, reduce 1, read 4, reduce 2 ... reduce 4:
        # while a step is reduced, the next two are being read.
        want = [("read", 1), ("read", 1)]
        for _ in range(3):
            want += [("read", 1), ("reduce", 1)]
        want += [("reduce", 1), ("reduce", 1)]
        assert events == want
    svc.attend.close_sequence(seq_id)


def test_many_blocks_per_step_stay_exact(core, events):
    svc = core
    ns, keys, _, kv = put_blocks(svc, layout("bfloat16"), 7, seed=12)
    assert svc.move(ns.id, keys, "nvme") == len(keys)
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    check_exact(svc, seq_id, kv, 0)
    assert events == [("read", 7), ("reduce", 7)]  # 7 small blocks: one step
    svc.attend.close_sequence(seq_id)


@pytest.mark.usefixtures("one_block_steps")
def test_damage_in_a_later_step_fails_and_leaves_no_read_running(core, events):
    svc = core
    lay = layout("float32")
    ns, keys, _, kv = put_blocks(svc, lay, 5, seed=13)
    assert svc.move(ns.id, keys, "nvme") == len(keys)
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    check_exact(svc, seq_id, kv, 1)
    victim = svc.index.get(ns.id, keys[2])
    span = lay.block_bytes // LAYERS
    flip(svc.tiers.get("nvme").store.path, victim.copies["nvme"].location + span + 5)
    events.clear()
    with pytest.raises(DataLoss) as e:
        attend(svc, seq_id, 1)
    assert keys[2].hex() in e.value.message
    # Steps 0 and 1 reduced; step 2 failed its check while steps 3's and 4's reads were
    # in flight.
    assert events == [("read", 1), ("read", 1), ("read", 1), ("reduce", 1), ("read", 1),
                      ("reduce", 1), ("read", 1)]  # fmt: skip
    svc.attend.close_sequence(seq_id)


def test_an_io_error_reading_a_layer_drops_that_copy_as_damaged(core, monkeypatch):
    """A disk that fails a layer's read (EIO) is treated as a get treats it: the copy is
    dropped and the call fails with DATA_LOSS naming the block, never INTERNAL, and the
    next attend no longer reads that copy."""
    import errno
    from concurrent.futures import Future

    svc = core
    lay = layout("float32")
    ns, keys, _, _ = put_blocks(svc, lay, 3, seed=14)
    assert svc.move(ns.id, keys, "nvme") == len(keys)
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    nvme = svc.tiers.get("nvme")
    victim = svc.index.get(ns.id, keys[1])
    bad = victim.copies["nvme"].location
    read_range = nvme.read_range

    def failing(block, copy, start, out):
        if copy.location == bad:
            f: Future[None] = Future()
            f.set_exception(OSError(errno.EIO, "Input/output error"))
            return f
        return read_range(block, copy, start, out)

    monkeypatch.setattr(nvme, "read_range", failing)
    before = svc.counters.corrupt_reads
    with pytest.raises(DataLoss) as e:
        attend(svc, seq_id, 0)
    assert keys[1].hex() in e.value.message
    assert "nvme" not in victim.copies
    assert svc.counters.corrupt_reads == before + 1
    svc.attend.close_sequence(seq_id)
