"""tierctl capacity --codec: tokens per tier in the encoded bytes a tierd codec stores."""

from __future__ import annotations

import json

import pytest

from tierctl.cli import main

# smollm2-135m: 30 layers x 3 KV heads x 64 dim. One kivi4 layer of a 16-token block:
# codes 2*3*16*64/2, key scale+zero 2*2*3*64 (one group of 16 tokens), value scale+zero
# 2*2*3*16 (one group of 64 channels).
KIVI4_BLOCK = 30 * (2 * 3 * 16 * 32 + 2 * 2 * 3 * 64 + 2 * 2 * 3 * 16)


def report(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["capacity", "--model", "smollm2-135m", "--no-bench", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_codec_counts_encoded_bytes_per_token(capsys: pytest.CaptureFixture[str]) -> None:
    doc = report(capsys, "--codec", "kivi4", "--context", "2048")
    assert doc["kv_bytes_per_token"] == 23040  # the model's raw KV, as before
    for t in doc["tiers"]:
        if t["kind"] == "disk":
            assert (t["codec"], t["kv_bytes_per_token"]) == ("kivi4", KIVI4_BLOCK / 16)
            assert t["tokens"] == t["usable_bytes"] // KIVI4_BLOCK * 16
            assert t["tokens"] > 3 * (t["usable_bytes"] // 23040)
        else:
            assert (t["codec"], t["kv_bytes_per_token"]) == ("raw", 23040)
            assert t["tokens"] == t["usable_bytes"] // 23040


def test_codec_options_and_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    doc = report(capsys, "--codec", "ram=kivi2;v_group=32", "--block-tokens", "32")
    ram = next(t for t in doc["tiers"] if t["kind"] == "ram")
    layer = 2 * 3 * 32 * 16 + 2 * 2 * 3 * 64 + 2 * 2 * 3 * 32 * 2
    assert ram["codec"] == "kivi2;v_group=32" and ram["kv_bytes_per_token"] == 30 * layer / 32
    # One-byte KV: int8 would not shrink it, so it is counted raw (as tierd stores it).
    doc = report(capsys, "--dtype", "fp8", "--codec", "int8")
    assert {t["codec"] for t in doc["tiers"]} == {"raw"}


@pytest.mark.parametrize(
    ("codec", "message"),
    [
        ("zstd", "unknown codec 'zstd'"),
        ("tape=kivi4", "no tier kind 'tape'"),
        ("kivi4;k_group=5", "k_group 5 does not divide 16"),
        ("int8;k_group=4", "does not take"),
    ],
)
def test_bad_codecs_are_usage_errors(
    codec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["capacity", "--model", "smollm2-135m", "--no-bench", "--codec", codec]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
