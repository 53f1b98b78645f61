"""The [peers] section: off by default, checked keys, errors that name them."""

from __future__ import annotations

import pytest

from tierd.config import Config, config_from_dict
from tierd.errors import ConfigError
from tierd.peer_config import PeersConfig


def test_off_by_default() -> None:
    assert Config().peers == PeersConfig() and not Config().peers.enabled
    assert not config_from_dict({}).peers.enabled


def test_a_full_section_parses() -> None:
    cfg = config_from_dict({"peers": {
        "listen": "0.0.0.0:7001", "engine_hostname": "10.0.0.2", "protocol": "rdma",
        "peers": ["10.0.0.3:7001", "[fd00::4]:7001"], "token_file": "/etc/tierd/peer.token",
        "ca_file": "ca.pem", "cert_file": "me.pem", "key_file": "me.key", "timeout_ms": 500,
    }}).peers  # fmt: skip
    assert cfg.enabled and cfg.tls and cfg.protocol == "rdma"
    assert cfg.peers == ("10.0.0.3:7001", "[fd00::4]:7001") and cfg.timeout_ms == 500


def test_bulk_alone_opens_the_engine_for_clients_and_needs_no_secret() -> None:
    cfg = config_from_dict({"peers": {"bulk": True, "engine_hostname": "10.0.0.2"}}).peers
    assert cfg.enabled and cfg.bulk and not cfg.group and cfg.token_file is None
    assert cfg.bulk_exchange == 256 << 20
    sized = config_from_dict({"peers": {"bulk": True, "bulk_exchange": "1GiB"}}).peers
    assert sized.bulk_exchange == 1 << 30


def test_a_directory_section_parses() -> None:
    cfg = config_from_dict({"peers": {
        "listen": "0.0.0.0:7001", "advertise": "10.0.0.2:7001", "token_file": "t",
        "directory": "remote", "directory_ttl_ms": 5000,
    }}).peers  # fmt: skip
    assert (cfg.directory, cfg.directory_ttl_ms, cfg.advertise) == ("remote", 5000,
                                                                     "10.0.0.2:7001")  # fmt: skip
    assert PeersConfig().directory == "" and PeersConfig().directory_ttl_ms == 30_000


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"listen": "127.0.0.1:7001"}, "peers.token_file"),
        ({"peers": ["127.0.0.1:7001"]}, "peers.token_file"),
        ({"listen": "nowhere", "token_file": "t"}, "peers.listen"),
        ({"listen": "h:70000", "token_file": "t"}, "peers.listen"),
        ({"peers": ["h:1", "unix:/x"], "token_file": "t"}, "peers.peers[1]"),
        ({"protocol": "udp"}, "peers.protocol"),
        ({"timeout_ms": 0}, "peers.timeout_ms"),
        ({"listen": "h:1", "token_file": "t", "ca_file": "ca.pem"}, "peers.cert_file"),
        ({"listne": "h:1"}, "peers.listne"),
        ({"bulk": "yes"}, "peers.bulk"),
        ({"bulk": True, "bulk_exchange": "512KiB"}, "peers.bulk_exchange"),
        ({"bulk": True, "bulk_exchange": "65GiB"}, "peers.bulk_exchange"),
        ({"bulk": True, "bulk_exchange": True}, "peers.bulk_exchange"),
        ({"bulk": True, "bulk_exchange": "lots"}, "peers.bulk_exchange"),
        ({"bulk_exchange": "1GiB", "listen": "h:1", "token_file": "t"}, "peers.bulk_exchange"),
        ({"bulk": True, "listen": "h:1"}, "peers.token_file"),
        ({"directory": "", "listen": "h:1", "token_file": "t"}, "peers.directory"),
        ({"directory": "remote"}, "peers.directory"),
        ({"directory": "remote", "bulk": True}, "peers.directory"),
        ({"peers": ["h:1"], "token_file": "t", "directory_ttl_ms": 0}, "peers.directory_ttl_ms"),
        ({"listen": "h:1", "token_file": "t", "advertise": "0.0.0.0"}, "peers.advertise"),
        ({"listen": "0.0.0.0:7001", "token_file": "t", "directory": "r"}, "peers.advertise"),
        ({"listen": "[::]:7001", "token_file": "t", "directory": "r"}, "peers.advertise"),
        (
            {"listen": "h:1", "token_file": "t", "directory": "r", "advertise": "0.0.0.0:1"},
            "peers.advertise",
        ),
    ],
)
def test_bad_values_name_their_key(section: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"peers": section})
    assert err.value.field == key


def test_peers_change_only_on_restart() -> None:
    old = Config()
    new = config_from_dict({"peers": {"listen": "127.0.0.1:7001", "token_file": "t"}})
    live, restart = old.reload_changes(new)
    assert live.peers == old.peers and "peers.listen" in restart
