"""Segment mapping: reuse, growth, a recreated file, host checks, slot bounds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tierd_client import KVLayout, SegmentInfo
from tierd_client.errors import Internal
from tierd_client.hostinfo import host_id
from tierd_client.shm import SegmentMaps, slot_view

LAY = KVLayout(1, 1, 8, "float32", 4)  # 256-byte blocks


def _segment(path: Path, size: int, fill: int = 0) -> SegmentInfo:
    path.write_bytes(bytes([fill]) * size)
    return SegmentInfo(str(path), size, host_id())


def test_maps_once_and_shares_memory(tmp_path: Path) -> None:
    seg = _segment(tmp_path / "seg", 4096)
    maps = SegmentMaps()
    assert maps.unusable(seg) is None
    mm = maps.map(seg)
    assert maps.map(seg) is mm
    view = slot_view(mm, 512, LAY)
    view[...] = np.arange(LAY.block_elems, dtype=np.float32).reshape(LAY.block_shape)
    del view
    on_disk = np.frombuffer((tmp_path / "seg").read_bytes()[512 : 512 + 256], np.float32)
    assert (on_disk == np.arange(LAY.block_elems)).all()
    maps.close()


def test_remaps_when_the_segment_grows(tmp_path: Path) -> None:
    seg = _segment(tmp_path / "seg", 4096)
    maps = SegmentMaps()
    first = maps.map(seg)
    with open(seg.path, "r+b") as f:
        f.truncate(8192)
    grown = maps.map(SegmentInfo(seg.path, 8192, seg.host_id))
    assert grown is not first and len(grown) == 8192
    assert maps.map(seg) is grown  # a smaller announced size keeps the bigger map


def test_remaps_a_recreated_file(tmp_path: Path) -> None:
    seg = _segment(tmp_path / "seg", 4096, fill=1)
    maps = SegmentMaps()
    old = maps.map(seg)
    os.unlink(seg.path)  # what a restarted daemon does
    _segment(tmp_path / "seg", 4096, fill=2)
    new = maps.map(seg)
    assert new is not old and new[0] == 2


def test_unusable_reasons(tmp_path: Path) -> None:
    maps = SegmentMaps()
    assert "no shared-memory segment" in (maps.unusable(None) or "")
    seg = _segment(tmp_path / "seg", 4096)
    assert "another host" in (maps.unusable(SegmentInfo(seg.path, 4096, "elsewhere:x")) or "")
    assert "cannot map" in (
        maps.unusable(SegmentInfo(str(tmp_path / "none"), 4096, host_id())) or ""
    )
    too_big = SegmentInfo(seg.path, 1 << 20, host_id())
    assert "cannot map" in (maps.unusable(too_big) or "")


def test_unwritable_file_is_unusable(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can open any file read-write")
    seg = _segment(tmp_path / "seg", 4096)
    os.chmod(seg.path, 0o400)
    assert "cannot map" in (SegmentMaps().unusable(seg) or "")


def test_slot_outside_segment(tmp_path: Path) -> None:
    mm = SegmentMaps().map(_segment(tmp_path / "seg", 4096))
    slot_view(mm, 4096 - 256, LAY)
    with pytest.raises(Internal) as e:
        slot_view(mm, 4096 - 255, LAY)
    assert e.value.field == "offset"
