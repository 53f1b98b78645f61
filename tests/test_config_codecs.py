"""A tier's codec in the config: known codecs and their options, refused on the memory
tier (clients map its bytes), taken by storage, CSD and shared tiers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierd.config import load_config
from tierd.errors import ConfigError

HOST = '[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "64MiB"\n'


def nvme(extra: str) -> str:
    return f'{HOST}\n[[tiers]]\nname = "disk"\nkind = "nvme"\ncapacity = "128MiB"\n{extra}\n'


def load(tmp_path: Path, body: str):
    path = tmp_path / "tierd.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n{body}')
    return load_config(path)


def test_a_storage_tier_takes_a_codec_and_its_options(tmp_path: Path) -> None:
    cfg = load(tmp_path, nvme('codec = "kivi4"\ncodec_params = {k_group = 8, v_group = 32}'))
    disk = cfg.tiers[1]
    assert (disk.codec, dict(disk.codec_params)) == ("kivi4", {"k_group": 8, "v_group": 32})
    assert cfg.tiers[0].codec == "raw"
    assert load(tmp_path, nvme('codec = "int8"')).tiers[1].codec == "int8"


def test_an_unknown_codec_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.codec: unknown codec 'zstd'; known: "
                                          r"raw, int8, fp8, kivi4, kivi2"):  # fmt: skip
        load(tmp_path, nvme('codec = "zstd"'))


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ('codec = "kivi2"\ncodec_params = {k_group = 0}', "codec_params.k_group", "positive"),
        ('codec = "kivi4"\ncodec_params = {groups = 4}', "codec_params.groups", "does not take"),
        ('codec = "int8"\ncodec_params = {k_group = 8}', "codec_params.k_group", "does not take"),
        ('codec = "kivi4"\ncodec_params = {k_group = "8"}', "codec_params.k_group", "expected int"),
        ('codec = "kivi4"\ncodec_params = 8', "codec_params", "expected a table"),
    ],
)
def test_codec_options_are_checked_by_name(tmp_path: Path, extra: str, key: str,
                                           reason: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=rf"tiers\[1\]\.{key}: .*{reason}"):
        load(tmp_path, nvme(extra))


def test_the_memory_tier_stays_raw(tmp_path: Path) -> None:
    body = HOST + 'codec = "kivi4"\n\n[[tiers]]\nname = "disk"\nkind = "nvme"\n'
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.codec: a host tier stores blocks raw"):
        load(tmp_path, body)


@pytest.mark.parametrize(
    ("kind", "keys", "codec"),
    [
        ("csd", "", "int8"),
        ("redis", 'capacity = "1GiB"\nnodes = ["127.0.0.1:6379"]', "kivi4"),
        ("mooncake", 'capacity = "1GiB"\nmaster = "127.0.0.1:50051"', "int8"),
    ],
)
def test_csd_and_shared_tiers_take_a_codec(tmp_path: Path, kind: str, keys: str,
                                           codec: str) -> None:  # fmt: skip
    body = nvme("") + f'\n[[tiers]]\nname = "below"\nkind = "{kind}"\ncodec = "{codec}"\n{keys}\n'
    assert load(tmp_path, body).tiers[2].codec == codec
