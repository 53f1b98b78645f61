"""tierctl replay: a hand-computed trace through the real chain and policies, the sweep,
the JSON and plot outputs, and refused input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tierctl.cli import main
from tierctl.errors import ExitCode
from tierctl.replay import Spec, ideal_hit_rate, read_trace, replay

# 4-token blocks of 100 bytes; host holds 3 blocks, NVMe 5; LRU on both.
TRACE = [
    (0, 8, [1, 2]),  # miss: host 1 2
    (1000, 7, [1, 3]),  # 1 hits in host (4 tokens); host 1 2 3
    (2000, 12, [4, 5, 6]),  # host full: 2 1 3 (LRU order) go to NVMe; host 4 5 6
    # 1 2 hit in NVMe (8 tokens), promoted with 7: 4 5 6 go down, NVMe drops 3
    (3000, 9, [1, 2, 7]),
    (4000, 8, [3, 8]),  # 3 was dropped: a miss; 1 2 leave host, NVMe has them (no write)
    # 4 5 hit in NVMe (8 tokens); 7 3 8 go down, NVMe drops 6 (oldest access), 1, 2
    (5000, 12, [4, 5, 9]),
    (6000, 8, [10, 9]),  # 10 misses: 9, cached in host, is past the miss and not counted
]


def write_trace(path: Path, rows: list[tuple[int, int, list[int]]]) -> Path:
    lines = [json.dumps({"timestamp": t, "input_length": n, "output_length": 1, "hash_ids": ids})
             for t, n, ids in rows]  # fmt: skip
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def test_hand_computed_replay(tmp_path: Path) -> None:
    requests = read_trace(write_trace(tmp_path / "t.jsonl", TRACE), block_tokens=4)
    r = replay(requests, [300, 500], Spec("lru", "lru"), block_bytes=100, block_tokens=4)
    assert (r.input_tokens, r.tokens_saved) == (64, 20)
    assert r.hit_rate == 20 / 64
    assert r.bytes_read == {"host": 100, "nvme": 400}
    assert r.bytes_written == {"nvme": 900}  # 2 1 3, then 4 5 6, then 7 3 8
    assert r.dropped_blocks == 4  # 3, then 6 1 2
    assert r.capacity_bytes == {"host": 300, "nvme": 500}
    assert r.occupancy["host"][-1] == 1.0 and r.occupancy["nvme"][-1] == 1.0
    assert len(r.occupancy["t_s"]) == len(TRACE) and r.occupancy["t_s"][-1] == 6.0
    # A cache that never evicts: 1 (R2), 1 2 (R4), 3 (R5), 4 5 (R6), but not 9 in R7.
    assert ideal_hit_rate(requests, 4) == (4 + 8 + 4 + 8) / 64
    # One level only: every victim is dropped, nothing is read from below.
    r = replay(requests, [300], Spec("lru", "lru"), block_bytes=100, block_tokens=4)
    assert (r.tokens_saved, r.bytes_read, r.bytes_written) == (4, {"host": 100}, {})


def test_admission_filter_changes_the_outcome(tmp_path: Path) -> None:
    requests = read_trace(write_trace(tmp_path / "t.jsonl", TRACE), block_tokens=4)
    r = replay(requests, [300, 500], Spec("lru", "second_hit"), block_bytes=100, block_tokens=4)
    # Only 1 was read before it left host (R3): 2 and 3 are dropped instead of written,
    # so R4 hits 1 alone from NVMe.
    assert r.bytes_written["nvme"] < 900 and r.tokens_saved == 4 + 4 + 0


def test_cli_sweep_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl.gz", TRACE)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["replay", str(trace), "--block-tokens", "4", "--block-bytes", "100",
                 "--capacity", "300,500", "200,300", "--capacity", "100",
                 "--policy", "lru,lfu", "--policy", "lru/tinylfu", "--jobs", "2",
                 "--json", str(out), "--plot", str(png)])  # fmt: skip
    assert code == ExitCode.OK
    doc = json.loads(out.read_text())
    got = [(r["policy"], list(r["capacity_bytes"].values())) for r in doc["results"]]
    assert got == [(p, c) for c in ([300, 500], [200, 300], [100])
                   for p in ("lru", "lfu", "lru/tinylfu")]  # fmt: skip
    lru = doc["results"][0]
    assert (lru["tokens_saved"], lru["bytes_read"], lru["hit_rate"]) == (
        20, {"host": 100, "nvme": 400}, 20 / 64)  # fmt: skip
    assert doc["ideal_hit_rate"] == 24 / 64 and doc["block_bytes"] == 100
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "lru/tinylfu" in table and "31.25%" in table and "would hit 37.50%" in table


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"timestamp": 0, "input_length": 4, "hash_ids": [1]}\n{"hash_ids": "x"}\n', [],
         "t.jsonl:2: hash_ids must be a list of integers"),
        ('{"timestamp": 0, "input_length": -1, "hash_ids": [1]}\n', [],
         "t.jsonl:1: input_length must be a non-negative integer"),
        ("[1]\n", [], "t.jsonl:1: expected an object"),
        ("{oops\n", [], "t.jsonl:1: not JSON"),
        ("\n", [], "t.jsonl: no requests"),
        ('{"input_length": 4, "hash_ids": [1]}\n', ["--policy", "mru"], "unknown policy 'mru'"),
        ('{"input_length": 4, "hash_ids": [1]}\n', ["--capacity", "1GiB,2GiB,3GiB,4GiB"],
         "1 to 3 sizes"),
        ('{"input_length": 4, "hash_ids": [1]}\n', ["--capacity", "lots"], "cannot read"),
        ('{"input_length": 4, "hash_ids": [1]}\n', ["--block-bytes", "0"], "above 0"),
    ],
)  # fmt: skip
def test_refused_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                       args: list[str], message: str) -> None:  # fmt: skip
    trace = tmp_path / "t.jsonl"
    trace.write_text(content)
    assert main(["replay", str(trace), "--jobs", "1", *args]) == ExitCode.USAGE
    assert message in capsys.readouterr().err
