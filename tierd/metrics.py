"""Prometheus metrics: tier occupancy and traffic read at scrape time, RPC latencies live.

Primitives: `Metrics(service, tenant_labels=False)`, `serve(address)`, `interceptor()` (a gRPC server
interceptor timing every call), `close()`.

Counters the core already keeps are exported through a custom collector, so the hot paths
pay nothing for metrics; only the RPC histogram is updated per call. Per-tenant series are
off unless asked for (`metrics.tenant_labels`): they name every tenant to whoever can scrape.
/metrics binds to loopback unless the address names a host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tierd.core.service import CacheService
    from tierd.core.stats import TierSnapshot

RPC_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 5)

# One series per configured tier, labelled by its configured name and its kind (the kind
# groups tiers across daemons whose configs name them differently).
_Family = type[GaugeMetricFamily] | type[CounterMetricFamily]
_TIER_SERIES: tuple[tuple[_Family, str, str, Callable[[TierSnapshot], float]], ...] = (
    (GaugeMetricFamily, "capacity_bytes", "Tier capacity", lambda t: t.capacity_bytes),
    (GaugeMetricFamily, "used_bytes", "Bytes holding blocks", lambda t: t.used_bytes),
    (GaugeMetricFamily, "blocks", "Blocks with a copy in the tier", lambda t: t.blocks),
    (GaugeMetricFamily, "available", "1 while the tier serves (CSD: some worker is up)",
     lambda t: int(t.available)),
    (CounterMetricFamily, "hits", "Blocks (attend: layer reads) served from the tier",
     lambda t: t.counters.hits),
    (CounterMetricFamily, "misses", "Copies held in the tier that could not be served",
     lambda t: t.counters.misses),
    (CounterMetricFamily, "read_bytes", "Bytes served from the tier",
     lambda t: t.counters.bytes_read),
    (CounterMetricFamily, "written_bytes", "Bytes written to the tier",
     lambda t: t.counters.bytes_written),
    (CounterMetricFamily, "evictions", "Blocks evicted from the tier",
     lambda t: t.counters.evictions),
)  # fmt: skip


class _CoreCollector(Collector):
    def __init__(self, service: CacheService, tenant_labels: bool) -> None:
        self.svc = service
        self.tenant_labels = tenant_labels

    def collect(self) -> Iterator[Any]:
        s = self.svc.stats()
        for family, name, doc, read in _TIER_SERIES:
            series = family(f"tierd_tier_{name}", doc, labels=["tier", "kind"])
            for t in s.tiers:
                series.add_metric([t.name, t.kind], read(t))
            yield series
        for name, value, doc in (
            ("lookups", s.lookups, "Lookup calls"),
            ("misses", s.misses, "Lookups or gets that missed a block"),
            ("demotions", s.demotions, "Blocks moved down the tier chain"),
            ("promotions", s.promotions, "Blocks brought up into the memory tier"),
            ("corrupt_reads", s.corrupt_reads, "Block copies that failed their checksum"),
        ):
            yield CounterMetricFamily(f"tierd_{name}", doc, value=value)
        yield GaugeMetricFamily("tierd_active_leases", "Open leases", value=s.active_leases)
        yield from self._directory()
        if not self.tenant_labels:
            return
        tenant = GaugeMetricFamily("tierd_tenant_used_bytes", "Bytes held per tenant and tier "
                                   "(by the tier's configured name)",
                                   labels=["tenant", "tier"])  # fmt: skip
        for (name, tier), nbytes in sorted(self.svc.usage_by_tenant().items()):
            tenant.add_metric([name, tier], nbytes)
        yield tenant

    def _directory(self) -> Iterator[Any]:
        """The prefix directory's counters ([peers] directory), if it keeps one."""
        peers = self.svc.peers
        d = peers.directory() if peers is not None else None
        if d is None:
            return
        yield GaugeMetricFamily("tierd_prefix_directory_available", "1 while the prefix "
                                "directory's cluster answers", value=int(d.available))  # fmt: skip
        for name, value, doc in (
            ("hits", d.hits, "Lookups the prefix directory named a configured peer for"),
            ("misses", d.misses, "Lookups the prefix directory was asked and named none"),
            ("writes", d.writes, "Prefix directory entries written"),
            ("writes_dropped", d.writes_dropped, "Entries dropped (cluster slow or down)"),
            ("errors", d.errors, "Prefix directory calls that failed"),
        ):  # fmt: skip
            yield CounterMetricFamily(f"tierd_prefix_directory_{name}", doc, value=value)


class _Timing(grpc.ServerInterceptor):
    def __init__(self, histogram: Histogram) -> None:
        self._hist = histogram

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streams are timed by their own length, not per message
        method = details.method.rsplit("/", 1)[-1]
        hist, inner = self._hist.labels(method), handler.unary_unary

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(request, context)
            finally:
                hist.observe(time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(
            timed, handler.request_deserializer, handler.response_serializer
        )


class Metrics:
    def __init__(self, service: CacheService, *, tenant_labels: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_CoreCollector(service, tenant_labels))
        self.rpc_seconds = Histogram("tierd_rpc_seconds", "Unary RPC latency", ["method"],
                                     buckets=RPC_BUCKETS, registry=self.registry)  # fmt: skip
        self._server: Any = None

    def interceptor(self) -> grpc.ServerInterceptor:
        return _Timing(self.rpc_seconds)

    def serve(self, address: str) -> int:
        """Expose /metrics on [HOST:]PORT, loopback when no host is named; returns the port
        (0 in the address picks one)."""
        host, _, port = address.rpartition(":")
        self._server, _thread = start_http_server(int(port), host.strip("[]") or "127.0.0.1",
                                                  registry=self.registry)  # fmt: skip
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
