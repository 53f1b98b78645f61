"""Configuration parsing: any bytes in a file give a Config or a ConfigError naming the file,
the key and the reason; every number is checked for finiteness and range."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierd.cli import main as tierd_main
from tierd.config import CONFIG_FILE_LIMIT, Config, load_config, parse_size
from tierd.config_checks import anonymous_listeners
from tierd.errors import ConfigError

TLS = 'tls_cert = "/etc/tierd/cert.pem"\ntls_key = "/etc/tierd/key.pem"\n'
TENANT = '[[tenants]]\nname = "a"\ntoken_sha256 = "' + "0" * 64 + '"\n'
CN_TENANT = '[[tenants]]\nname = "a"\ncert_cn = "a"\n'
HUGE_DECIMAL = "9" * 400 + ".5TiB"

# (file content, text the error must contain besides the file name)
MALFORMED: list[tuple[bytes | str, str]] = [
    (b"[host]\nhigh_watermark = 0.9\n\xff\xfe\n", "not UTF-8 text (byte 0xff at offset 28)"),
    ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("[host]\ncapacity = " + "9" * 5000, "not valid TOML"),
    ("[host]\ncapacity = 1\ncapacity = 2\n", "not valid TOML"),
    ("[host]\ncapacity = 1e400\n", "host.capacity: size must be a finite number"),
    ("[host]\ncapacity = nan\n", "host.capacity: size must be a finite number"),
    ("[host]\ncapacity = 99999999999999999999999\n", "host.capacity: size 9999"),
    (f'[host]\ncapacity = "{HUGE_DECIMAL}"\n', "host.capacity: cannot read"),
    ('[host]\ncapacity = "9999999999 TiB"\n', "over the 1 PiB limit"),
    ("[host]\ncapacity = -1\n", "host.capacity: size must not be negative"),
    ('[host]\npolicy = "mru"\n', "host.policy: unknown policy 'mru'; known: lru, lfu, s3fifo"),
    ('[nvme]\npolicy = 3\n', "nvme.policy"),
    ("[host]\ncapacity = 1.5\n", "host.capacity: size 1.5 is not a whole number"),
    ('[host]\ncapacity = "inf"\n', "host.capacity: cannot read 'inf'"),
    ("[host]\ncapacity = true\n", "host.capacity: expected a size"),
    ("[host]\ncapacity = 1979-05-27\n", "host.capacity: expected a size"),
    ("[host]\nhigh_watermark = nan\n", "host.high_watermark: must be a finite number"),
    ("[host]\nhigh_watermark = 1.5\n", "host.high_watermark: must be between 0 and 1"),
    ("[host]\nlow_watermark = 0.0\n", "host.low_watermark: need 0 < low_watermark"),
    ("[host]\nhigh_watermark = 1" + "0" * 400 + "\n", "host.high_watermark: number too large"),
    ("[server]\nworkers = 0\n", "server.workers: must be between 1 and 1024"),
    ("[server]\nworkers = 99999999999999999999\n", "server.workers: must be between"),
    ("[server]\nmax_message_bytes = 1000\n", "server.max_message_bytes: must be between"),
    ('[server]\nmax_message_bytes = "2GiB"\n', "server.max_message_bytes: must be between"),
    ("[server]\ndrain_seconds = -1.0\n", "server.drain_seconds: must be between 0"),
    ("[server]\ndrain_seconds = inf\n", "server.drain_seconds: must be a finite number"),
    ('[server]\ntls_cert = "a\\u0000b"\n', "server.tls_cert: path contains a NUL byte"),
    ("[server]\ntls_cert = 5\n", "server.tls_cert: expected a path"),
    ('[server]\nlisten = ["unix:"]\n', "server.listen: 'unix:': unix socket path is empty"),
    ('[server]\nlisten = ["unix:/a\\u0000b"]\n', "NUL byte"),
    (f'[server]\nlisten = ["127.0.0.1:99999"]\n{TLS}', "port must be at most 65535"),
    ('[server]\nlisten = ["127.0.0.1:7000"]\n', "needs server.tls_cert"),
    (f'[server]\nlisten = ["0.0.0.0:7000"]\n{TLS}', "would admit any peer"),
    ("[nvme]\nio_threads = 0\n", "nvme.io_threads: must be between 1 and 256"),
    ("[nvme]\nio_threads = 100000\n", "nvme.io_threads: must be between 1 and 256"),
    ("[nvme]\nchunk_bytes = 1000\n", "nvme.chunk_bytes: must be between 4096"),
    ("[nvme]\nchunk_bytes = 5000\n", "nvme.chunk_bytes: must be a multiple of 4096"),
    ('[nvme]\nbackend = "spdk"\n', "nvme.backend: must be one of"),
    ('[nvme]\npath = "x\\u0000y"\n', "nvme.path: path contains a NUL byte"),
    ('[nvme]\npath = ""\n', "nvme.path: expected a path"),
    ('data_dir = "/var/\\u0000/tierd"\n', "data_dir: path contains a NUL byte"),
    ("data_dir = 5\n", "data_dir: expected a path"),
    ("[leases]\ndefault_ttl_ms = 0\n", "leases.default_ttl_ms: need 0 < default_ttl_ms"),
    ("[leases]\ndefault_ttl_ms = 700000\n", "leases.default_ttl_ms: need 0 < default_ttl_ms"),
    ("[leases]\nmax_ttl_ms = 1000000000000\n", "leases.max_ttl_ms: must be between 1"),
    ("[leases]\nmax_keys_per_call = 0\n", "leases.max_keys_per_call: must be between 1"),
    ("[leases]\nsequence_idle_ms = -1\n", "leases.sequence_idle_ms: must be between 1"),
    ("[csd]\nworkers = -1\n", "csd.workers: must be between 0 and 64"),
    ("[csd]\nworkers = 65\n", "csd.workers: must be between 0 and 64"),
    ("[csd]\ncapacity = 0\n", "csd.capacity: must be between 1 byte"),
    ('[csd]\nremote = ["nowhere"]\n', "csd.remote: 'nowhere' is neither"),
    ('[metrics]\nlisten = "host:port"\n', "metrics.listen: 'host:port' is not [HOST:]PORT"),
    ('[metrics]\nlisten = "99999"\n', "metrics.listen: '99999' is not [HOST:]PORT"),
    ('[metrics]\ntenant_labels = "yes"\n', "metrics.tenant_labels: expected bool"),
    (f"{CN_TENANT}weight = nan\n", "tenants[0].weight: must be a finite number"),
    (f"{CN_TENANT}weight = inf\n", "tenants[0].weight: must be a finite number"),
    (f"{CN_TENANT}weight = 0\n", "tenants[0].weight: must be positive"),
    (f"{CN_TENANT}weight = -2.5\n", "tenants[0].weight"),
    (f"{CN_TENANT}host_quota = -5\n", "tenants[0].host_quota: size must not be negative"),
    ('[[tenants]]\nname = "\\u001b[2Jx"\ncert_cn = "a"\n', "tenants[0].name: '\\x1b[2Jx' contains"),
    ("[host]\nbogus = 1\n", "host.bogus: unknown key"),
    ('[host]\n"\\u001b[2J" = 1\n', "host.'\\x1b[2J': unknown key"),
    ("[bogus]\n", "bogus: unknown section"),
    ("host = 5\n", "host: expected a table"),
    ("[tenants]\nname = 1\n", "tenants: expected [[tenants]] tables"),
]  # fmt: skip


def write(tmp_path: Path, content: bytes | str, name: str = "tierd.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(("content", "expected"), MALFORMED)
def test_malformed_file_is_a_config_error_naming_file_key_and_reason(
    tmp_path: Path, content: bytes | str, expected: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(path).resolved()
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message and "\x1b" not in message


def test_check_config_prints_one_line_and_exits_2(tmp_path: Path, capsys) -> None:
    for content, expected in MALFORMED:
        path = write(tmp_path, content)
        assert tierd_main(["check-config", str(path)]) == 2, content
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def test_check_config_as_a_command_has_no_traceback(tmp_path: Path) -> None:
    for content in (b"\xff\xfe", "[host]\ncapacity = 1e400\n", "a = " + "[" * 5000):
        path = write(tmp_path, content)
        run = subprocess.run([sys.executable, "-m", "tierd", "check-config", str(path)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith(f"tierd: configuration error: {path}: ")


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.toml", tmp_path, Path("a\0b.toml")):
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(path)
    big = write(tmp_path, b"#" * (CONFIG_FILE_LIMIT + 1))
    with pytest.raises(ConfigError, match="larger than 16.0 MiB"):
        load_config(big)


def test_override_into_a_non_table_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "host = 5\n")
    with pytest.raises(ConfigError, match="host: expected a table"):
        load_config(path, {"host.capacity": "1GiB"})


@pytest.mark.parametrize(("value", "expected"), [
    (4096, 4096), (4096.0, 4096), ("512MiB", 512 << 20), ("1.5 GiB", 3 << 29), ("0", 0),
    (str(1 << 50), 1 << 50),
])  # fmt: skip
def test_parse_size_reads_sizes(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [
    -1, 1 << 51, 10**400, math.inf, math.nan, -0.5, 0.5, "inf", "nan", "-1", "1e9", "1,5",
    HUGE_DECIMAL, "1" * 100, "1 XiB", "", None, [1], True,
])  # fmt: skip
def test_parse_size_refuses_cleanly(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(value, key="k")


def test_tcp_listener_admitting_anyone_needs_allow_anonymous(tmp_path: Path) -> None:
    listen = '[server]\nlisten = ["0.0.0.0:7000", "unix:/run/t.sock"]\n'
    cfg = load_config(write(tmp_path, f"{listen}{TLS}allow_anonymous = true\n")).resolved()
    assert anonymous_listeners(cfg) == ["0.0.0.0:7000"]
    with_ca = load_config(write(tmp_path, f'{listen}{TLS}tls_client_ca = "/ca.pem"\n')).resolved()
    assert anonymous_listeners(with_ca) == []
    with_tenants = load_config(write(tmp_path, f"{listen}{TLS}{TENANT}")).resolved()
    assert anonymous_listeners(with_tenants) == []
    assert anonymous_listeners(load_config(None).resolved()) == []  # unix only: the default


@pytest.mark.parametrize("listen", ["9464", ":9464", "0.0.0.0:9464", "[::1]:9464", "host:0"])
def test_metrics_listen_forms(tmp_path: Path, listen: str) -> None:
    cfg = load_config(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n')).resolved()
    assert cfg.metrics.listen == listen and cfg.metrics.tenant_labels is False


def test_check_config_accepts_the_shipped_sample(capsys) -> None:
    sample = Path(__file__).resolve().parents[1] / "tools" / "systemd" / "tierd.toml"
    assert tierd_main(["check-config", str(sample)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["server"]["allow_anonymous"] is False and doc["metrics"]["tenant_labels"] is False


# --- property tests: whatever the file holds, a Config or a ConfigError, never a crash ---

_KEYS = ["capacity", "high_watermark", "low_watermark", "workers", "listen", "path", "weight",
         "io_threads", "chunk_bytes", "max_message_bytes", "drain_seconds", "default_ttl_ms",
         "max_ttl_ms", "name", "token_sha256", "cert_cn", "host_quota", "remote",
         "tenant_labels", "allow_anonymous", "backend", "tls_cert", "sequence_idle_ms",
         "max_layers", "max_block_bytes", "stream_reserve_workers"]  # fmt: skip
_SECTIONS = ["server", "host", "nvme", "leases", "metrics", "csd", "limits", "tenants", "other"]

_scalars = st.one_of(
    st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=20), st.sampled_from(["1GiB", "0.5", "9" * 40 + "TiB", "unix:/x", ":1"]),
)  # fmt: skip
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3))


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    assert isinstance(v, list)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


@st.composite
def toml_documents(draw: st.DrawFn) -> bytes:
    """Mostly well-formed TOML with the daemon's own keys and hostile values, sometimes
    with a few bytes spliced in."""
    lines = []
    if draw(st.booleans()):
        lines.append(f"data_dir = {_toml_value(draw(_values))}")
    for section in draw(st.lists(st.sampled_from(_SECTIONS), max_size=4, unique=True)):
        lines.append(f"[[{section}]]" if section == "tenants" else f"[{section}]")
        for key in draw(st.lists(st.sampled_from(_KEYS), max_size=5, unique=True)):
            lines.append(f"{key} = {_toml_value(draw(_values))}")
    data = "\n".join(lines).encode()
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    return data


def _load_or_config_error(data: bytes) -> None:
    fd, name = tempfile.mkstemp(suffix=".toml")
    try:
        os.write(fd, data)
        os.close(fd)
        try:
            assert isinstance(load_config(Path(name)).resolved(), Config)
        except ConfigError as e:
            assert str(e).startswith(f"{name}: "), str(e)
    finally:
        os.unlink(name)


PROPERTY = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@PROPERTY
@given(st.binary(max_size=512))
def test_any_bytes_give_a_config_or_a_config_error(data: bytes) -> None:
    _load_or_config_error(data)


@PROPERTY
@given(toml_documents())
def test_any_toml_with_our_keys_gives_a_config_or_a_config_error(data: bytes) -> None:
    _load_or_config_error(data)
