"""TCP listeners: refused without TLS, served over TLS, and over mutual TLS a client
certificate names the tenant."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.ports import free_port
from tierd.tiers.host import segments_of
from tierd_client import KVLayout, TierdClient, TierdError, Unavailable

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate CN=alpha-client."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, subject, ext in (
        ("server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "/CN=alpha-client", "extendedKeyUsage=clientAuth"),
    ):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout",
                f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
                cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tls-") as d:
        make_pki(Path(d))
        yield Path(d)


def start(base: Path, body: str) -> subprocess.Popen[str]:
    cfg = base / "tierd.toml"
    cfg.write_text(f'data_dir = "{base}/data"\n[host]\ncapacity = "16MiB"\n'
                   f'[nvme]\ncapacity = "32MiB"\n{body}')  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "tierd", "serve", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def stop(proc: subprocess.Popen[str], base: Path) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    for seg in segments_of(base / "data"):
        seg.unlink()
    return err


def test_tcp_without_tls_is_refused_at_start(tmp_path: Path) -> None:
    proc = start(tmp_path, f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n')
    assert proc.wait(60) == 2
    assert "server.listen" in proc.stderr.read() if proc.stderr else False


def test_tls_and_mutual_tls_name_the_tenant(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    token_hash = hashlib.sha256(b"beta-token").hexdigest()
    proc = start(tmp_path, (
        f'[server]\nlisten = ["127.0.0.1:{port}"]\ntls_cert = "{pki}/server.pem"\n'
        f'tls_key = "{pki}/server.key"\ntls_client_ca = "{pki}/ca.pem"\n'
        f'[[tenants]]\nname = "alpha"\ncert_cn = "alpha-client"\n'
        f'[[tenants]]\nname = "beta"\ntoken_sha256 = "{token_hash}"\n'
    ))  # fmt: skip
    ca = (pki / "ca.pem").read_bytes()
    with_cert = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(),
                                             (pki / "client.pem").read_bytes())  # fmt: skip
    layout = KVLayout(1, 1, 64, "float16", 16)
    try:
        # The certificate's common name proves the tenant; no token is given.
        with TierdClient(f"127.0.0.1:{port}", tenant="alpha", credentials=with_cert,
                         timeout=30) as alpha:  # fmt: skip
            ns = alpha.open_namespace("m", layout)
            keys = alpha.block_keys(ns, np.arange(32))
            blocks = np.arange(2 * 2 * 16 * 64, dtype=np.float16).reshape(2, *layout.block_shape)
            alpha.put(ns, keys, blocks)
            assert alpha.stats()["tenants"] == [
                {"tenant": "alpha", "tier": "host", "used_bytes": 2 * layout.block_bytes}
            ]
            got = alpha.get(ns, keys)
            assert got.found == [True, True] and np.array_equal(got.blocks, blocks)
        # A certificate without a configured tenant, plus a token: the token names it.
        with TierdClient(f"127.0.0.1:{port}", tenant="beta", credentials=with_cert,
                         token="beta-token", timeout=30) as beta:  # fmt: skip
            assert beta.stats()["tenants"] == []  # beta holds nothing; alpha's is not shown
        # Without a client certificate the handshake itself fails (mutual TLS): the call
        # never reaches the daemon and ends at its deadline.
        plain = grpc.ssl_channel_credentials(ca)
        with TierdClient(f"127.0.0.1:{port}", credentials=plain, timeout=3, max_retries=0) as c:
            with pytest.raises(TierdError) as info:
                c.stats()
            assert "DEADLINE_EXCEEDED" in str(info.value) or isinstance(info.value, Unavailable)
    finally:
        err = stop(proc, tmp_path)
    assert proc.returncode == 0, err[-2000:]


def test_tcp_admitting_anyone_is_refused_unless_allowed_and_then_logged(
    pki: Path, tmp_path: Path
) -> None:
    port = free_port()
    tls = (f'[server]\nlisten = ["127.0.0.1:{port}"]\ntls_cert = "{pki}/server.pem"\n'
           f'tls_key = "{pki}/server.key"\n')  # fmt: skip
    refused = start(tmp_path, tls)
    try:
        assert refused.wait(60) == 2
    finally:
        err = stop(refused, tmp_path)
    assert "would admit any peer" in err and "server.allow_anonymous" in err, err

    proc = start(tmp_path, tls + "allow_anonymous = true\n")
    try:
        # Any peer that trusts the server certificate is served, without a word of who it is.
        anyone = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        with TierdClient(f"127.0.0.1:{port}", credentials=anyone, timeout=30) as c:
            assert c.stats()["tiers"]["host"]["capacity_bytes"] == 16 << 20
    finally:
        err = stop(proc, tmp_path)
    assert proc.returncode == 0, err[-2000:]
    warning = next(ln for ln in err.splitlines() if "allow_anonymous" in ln)
    assert "WARNING" in warning and f"127.0.0.1:{port}" in warning and "any peer" in warning
