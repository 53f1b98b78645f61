"""The `Peer` service and its client: daemons pulling cached blocks from each other.

Primitives: `PeerNode.build(config, service) -> PeerNode | None` (None: `[peers]` is off),
`start()`, `stop()`; `PeerServicer` (translates `Peer` calls to `tierd.core.peers`);
`GrpcPeerLink` (one peer daemon, a `PeerLink` over gRPC).

The listener is a gRPC server of its own, for daemons only, never a client's: every call
must carry the group's secret (`authorization: Bearer <token>`, compared in constant time)
and, with TLS files configured, a certificate the group's CA signed (mutual TLS). A call
without the secret is refused (UNAUTHENTICATED) and logged with its caller's address.
Only control goes through it; the bytes move through the transfer engine (`PeerEngine`).
With `bulk = true` a second engine serves remote clients (`tierd.core.bulk`, through the
client service's `BulkGet`/`BulkPut`), exposing only the exchange area; a daemon with only
that opens no listener.
"""

from __future__ import annotations

import hmac
import logging
from concurrent import futures
from typing import Any

import grpc

from tierd.config import Config
from tierd.core.bulk import Bulk
from tierd.core.holders import Holders
from tierd.core.peers import Located, Peers, RemoteBlock
from tierd.core.service import CacheService
from tierd.errors import ConfigError, Unauthenticated, Unavailable
from tierd.peer_config import PeersConfig, read_token
from tierd.server.status import translate_errors
from tierd.tiers.redis_holders import RedisHolderBook
from tierd.tiers.remote_redis import RedisTier
from tierd.transfer.exchange import ExchangeArea
from tierd.transfer.p2p import PeerEngine
from tierd_client._proto import peer_pb2 as pb
from tierd_client._proto import peer_pb2_grpc as pb_grpc

log = logging.getLogger("tierd.peers")

PEER_WORKERS = 8  # concurrent calls from peers (each short: a lookup and a pin)


def _bearer(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[7:].strip()
    return ""


class PeerServicer(pb_grpc.PeerServicer):
    def __init__(self, peers: Peers, token: str) -> None:
        self.peers = peers
        self._token = token.encode()

    def _check(self, context: grpc.ServicerContext) -> None:
        if not hmac.compare_digest(_bearer(context).encode(), self._token):
            log.warning("refused a peer call from %s: wrong or missing peer token",
                        context.peer())  # fmt: skip
            raise Unauthenticated("this listener is for tierd daemons of the group only")

    @translate_errors
    def PeerLocate(self, request: pb.PeerLocateRequest, context: grpc.ServicerContext):
        self._check(context)
        got = self.peers.locate(request.tenant, request.namespace_id, list(request.keys),
                                request.lease_ttl_ms)  # fmt: skip
        blocks = [pb.PeerBlock(found=True, remote_address=b.address, length=b.length,
                               checksum=b.checksum, layer_sums=b.layer_sums or ())
                  for b in got.blocks]  # fmt: skip
        blocks += [pb.PeerBlock(found=False)] * (len(request.keys) - len(blocks))
        return pb.PeerLocateResponse(lease_id=got.lease_id, engine_address=got.engine_address,
                                     protocol=got.protocol, blocks=blocks)  # fmt: skip

    @translate_errors
    def PeerRelease(self, request: pb.PeerReleaseRequest, context: grpc.ServicerContext):
        self._check(context)
        return pb.PeerReleaseResponse(released=self.peers.release(request.tenant,
                                                                  request.lease_id))  # fmt: skip


def _channel_credentials(cfg: PeersConfig) -> grpc.ChannelCredentials:
    assert cfg.ca_file and cfg.cert_file and cfg.key_file
    return grpc.ssl_channel_credentials(
        root_certificates=cfg.ca_file.read_bytes(),
        private_key=cfg.key_file.read_bytes(),
        certificate_chain=cfg.cert_file.read_bytes(),
    )


class GrpcPeerLink:
    """One peer daemon; any failure (down, deadline, refused) raises `Unavailable`."""

    def __init__(self, address: str, token: str, cfg: PeersConfig) -> None:
        self.address = address
        self._channel = (grpc.secure_channel(address, _channel_credentials(cfg)) if cfg.tls
                         else grpc.insecure_channel(address))  # fmt: skip
        self._stub = pb_grpc.PeerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = cfg.timeout_ms / 1000.0

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout,
                                               metadata=self._metadata)  # fmt: skip
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise Unavailable(f"{method} to {self.address}: "
                              f"{code.name if code else 'failed'}: {details}") from None  # fmt: skip

    def locate(self, tenant: str, ns_id: bytes, keys: list[bytes], ttl_ms: int) -> Located:
        resp = self._call("PeerLocate", pb.PeerLocateRequest(
            tenant=tenant, namespace_id=ns_id, keys=keys, lease_ttl_ms=ttl_ms))  # fmt: skip
        blocks = []
        for b in resp.blocks[: len(keys)]:
            if not b.found:
                break
            blocks.append(RemoteBlock(b.remote_address, b.length, b.checksum,
                                      tuple(b.layer_sums) or None))  # fmt: skip
        return Located(resp.lease_id, resp.engine_address, resp.protocol, blocks)

    def release(self, tenant: str, lease_id: int) -> None:
        self._call("PeerRelease", pb.PeerReleaseRequest(tenant=tenant, lease_id=lease_id))

    def close(self) -> None:
        self._channel.close()


class PeerNode:
    """What `[peers]` adds to a daemon: the transfer engine, the links to peers, and the
    daemons-only listener."""

    def __init__(self, service: CacheService, peers: Peers, server: grpc.Server | None) -> None:
        self.service = service
        self.peers = peers
        self.server = server

    @classmethod
    def build(cls, config: Config, service: CacheService) -> PeerNode | None:
        cfg = config.peers
        if not cfg.enabled:
            return None
        token = read_token(cfg) if cfg.group else ""
        book = _directory_book(cfg, service)
        engine = PeerEngine.open(cfg.engine_hostname, cfg.protocol)
        links = [GrpcPeerLink(address, token, cfg) for address in cfg.peers]
        holders = None
        if book is not None:
            local = [t.name for t in service.tiers if not t.shared]
            holders = Holders(book, cfg.advertise or cfg.listen, cfg.directory_ttl_ms, local)
        peers = Peers(service, engine, links, cfg, holders)
        server = None
        try:
            if cfg.listen:
                server = grpc.server(futures.ThreadPoolExecutor(
                    PEER_WORKERS, thread_name_prefix="tierd-peer"))  # fmt: skip
                pb_grpc.add_PeerServicer_to_server(PeerServicer(peers, token), server)
                bound = (server.add_secure_port(cfg.listen, _server_credentials(cfg)) if cfg.tls
                         else server.add_insecure_port(cfg.listen))  # fmt: skip
                if bound == 0:
                    raise OSError(f"cannot listen on {cfg.listen} (peers.listen)")
        except BaseException:
            peers.close()
            raise
        bulk = None
        try:
            if cfg.bulk:
                clients = PeerEngine.open(cfg.engine_hostname, cfg.protocol)
                try:
                    bulk = Bulk(service, ExchangeArea(clients, cfg.bulk_exchange))
                except OSError as e:  # no memory for the area, or the engine refused it
                    clients.close()
                    raise ConfigError(
                        "peers.bulk_exchange",
                        f"cannot set up {cfg.bulk_exchange} bytes of exchange area: {e}",
                    ) from e
        except BaseException:
            peers.close()
            raise
        service.peers = peers
        service.bulk = bulk
        return cls(service, peers, server)

    def start(self) -> None:
        if self.server is not None:
            self.server.start()
        cfg = self.peers.config
        bulk = self.service.bulk
        log.info("peers: engine at %s (%s)%s%s%s", self.peers.engine.address, cfg.protocol,
                 f"; serving peers on {cfg.listen}" if cfg.listen else "",
                 f"; pulling from {', '.join(cfg.peers)}" if cfg.peers else "",
                 f"; remote clients' engine at {bulk.engine.address}, exchange area "
                 f"{bulk.area.capacity >> 20} MiB" if bulk is not None else "")  # fmt: skip

    def stop(self, grace: float = 1.0) -> None:
        """After the client listener stopped: no lookup pulls any more."""
        if self.server is not None:
            self.server.stop(grace).wait()
        self.service.peers = None
        bulk, self.service.bulk = self.service.bulk, None
        self.peers.close()
        if bulk is not None:
            bulk.close()


def _directory_book(cfg: PeersConfig, service: CacheService) -> RedisHolderBook | None:
    """The prefix directory's store: the cluster of the Redis tier `directory` names."""
    if not cfg.directory:
        return None
    tier = service.tiers.get(cfg.directory)
    if not isinstance(tier, RedisTier):
        raise ConfigError("peers.directory", f"{cfg.directory!r} is not the name of a tier "
                          "of kind redis in [[tiers]]")  # fmt: skip
    return RedisHolderBook(tier)


def _server_credentials(cfg: PeersConfig) -> grpc.ServerCredentials:
    assert cfg.ca_file and cfg.cert_file and cfg.key_file
    return grpc.ssl_server_credentials(
        [(cfg.key_file.read_bytes(), cfg.cert_file.read_bytes())],
        root_certificates=cfg.ca_file.read_bytes(),
        require_client_auth=True,
    )
