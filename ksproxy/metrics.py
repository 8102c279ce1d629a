"""
Prometheus metrics (SPEC 10), in a registry of our own (never the process-global one, so two gateways in one
process, as in the tests, do not share counters).

Per request the cost is one dict lookup for the pre-bound numbers of (route, method, code) and a few integer
additions: no string formatting, no locks (see L{_RequestStats}).  Values that already live somewhere (open
connections, checker states, the pool, source restarts) are read at scrape time by a collector instead of being
kept up to date on every change.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString
from twisted.web import resource, server

from .model.types import APIService, JSBundle, ReverseProxy
from .routing import background

__all__ = ["Metrics", "MetricsResource", "install"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BUCKET_LABELS = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]

# Methods llhttp accepts are a fixed list, but a label per exotic one is not worth it.
_METHODS = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
}
# Routes that are not a resource: kept across rebuilds.
_FIXED_ROUTES = frozenset(["-", "default", "rejected"])
_ROUTE_PREFIX = {ReverseProxy: "proxy/", APIService: "apiservice/", JSBundle: "bundle/"}


class _RouteStats:
    """Per route: the latency histogram, body bytes and aborts, as plain numbers (see L{_RequestStats})."""

    __slots__ = ("buckets", "latencySum", "bytes", "aborted")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.latencySum = 0.0
        self.bytes = 0
        self.aborted = 0


class _Children:
    """What one (route, method, code) updates, bound once: its request count and its route's numbers."""

    __slots__ = ("count", "route")

    def __init__(self, route: _RouteStats) -> None:
        self.count = 0
        self.route = route


class _RequestStats:
    """
    The per-request metrics, kept as plain ints and floats and exported at scrape time.

    prometheus_client's metric children take a lock for every increment (four per request here); every update
    and every scrape of ours runs on the reactor thread, so the numbers need none.  The families, names and
    labels are the ones Counter and Histogram would expose.
    """

    def __init__(self) -> None:
        self.children: Dict[Tuple[str, str, str], _Children] = {}
        self.routes: Dict[str, _RouteStats] = {}

    def bind(self, route: str, method: str, code: str) -> _Children:
        stats = self.routes.get(route)
        if stats is None:
            stats = self.routes[route] = _RouteStats()
        key = (route, method, code)
        children = self.children.get(key)
        if children is None:
            children = self.children[key] = _Children(stats)
        return children

    def forget(self, route: str) -> None:
        self.routes.pop(route, None)
        for key in [k for k in self.children if k[0] == route]:
            del self.children[key]

    def describe(self) -> List[Any]:
        return list(self._families())

    def collect(self) -> Iterable[Any]:
        return self._families()

    def _families(self) -> Iterable[Any]:
        requests = CounterMetricFamily(
            "ksproxy_requests",
            "Requests answered, by route, method and status code.",
            labels=["route", "method", "code"],
        )
        for labels, children in self.children.items():
            requests.add_metric(list(labels), children.count)
        latency = HistogramMetricFamily(
            "ksproxy_request_duration_seconds",
            "Time from request head to the end of the response, by route.",
            labels=["route"],
        )
        sent = CounterMetricFamily(
            "ksproxy_response_body_bytes", "Response body bytes sent to clients, by route.", labels=["route"]
        )
        aborted = CounterMetricFamily(
            "ksproxy_requests_aborted",
            "Requests cut short (client gone, upstream failed mid-response, timeout), by route.",
            labels=["route"],
        )
        for route, stats in self.routes.items():
            cumulative, buckets = 0, []
            for bound, n in zip(_BUCKET_LABELS, stats.buckets):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([route], buckets, stats.latencySum)
            sent.add_metric([route], stats.bytes)
            aborted.add_metric([route], stats.aborted)
        yield requests
        yield latency
        yield sent
        yield aborted


class Metrics:
    """
    All ksproxy metrics.  Feed it with L{observeExchange} (every finished request, from the access log) and
    L{observeReport} (every rebuild); point L{watch} at the live parts for the scrape-time values.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.perRequest = _RequestStats()
        r.register(self.perRequest)
        self.httpRejections = Counter(
            "ksproxy_http_rejections",
            "Requests refused before routing (malformed, too large, headers too slow), by status code.",
            ["code"],
            registry=r,
        )
        self.generation = Gauge(
            "ksproxy_route_table_generation", "Generation of the live route table.", registry=r
        )
        self.rebuilds = Counter("ksproxy_route_table_rebuilds", "Route table rebuilds.", registry=r)
        self.rebuildSeconds = Histogram(
            "ksproxy_route_table_rebuild_duration_seconds",
            "Time to compile and swap in a route table.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.resources = Gauge(
            "ksproxy_resources",
            "Objects in the source by kind and outcome (served, unservable, rejected, conflict).",
            ["kind", "outcome"],
            registry=r,
        )
        # (route, method bytes, code) -> the bound numbers: one dict lookup per request.
        self._children: Dict[Tuple[str, bytes, int], _Children] = {}
        self._routeKeys: Dict[str, Set[Tuple[str, bytes, int]]] = {}
        self._resourceLabels: Set[Tuple[str, str]] = set()
        self._live: Optional[_LiveCollector] = None
        self._unsummarized: Any = None  # the last report, until a scrape summarizes it
        self._liveRoutes: Optional[Set[str]] = None  # the routes of the last summarized table

    # -- per request ----------------------------------------------------------------------------------------

    def observeExchange(self, exchange: Any, aborted: bool, duration: float) -> None:
        """One finished (or aborted) exchange; called by L{ksproxy.accesslog.AccessLog}."""
        route = exchange.route
        code = exchange.code
        key = (route, exchange.method, code)
        children = self._children.get(key)
        if children is None:
            children = self._bind(key)
            if children is None:
                return
        children.count += 1
        stats = children.route
        stats.buckets[bisect_left(LATENCY_BUCKETS, duration)] += 1  # "le": a bound counts values equal to it
        stats.latencySum += duration
        sent = exchange.bytesSent
        if sent:
            stats.bytes += sent
        if aborted:
            stats.aborted += 1

    def _bind(self, key: Tuple[str, bytes, int]) -> Optional[_Children]:
        route, method, code = key
        if route.startswith("rejected"):
            # Refused by the protocol layer: the route holds the reason, which is no label.
            self.httpRejections.labels(str(code)).inc()
            return None
        label = "aborted" if code == 0 else str(code)
        children = self.perRequest.bind(route, _METHODS.get(method, "OTHER"), label)
        self._children[key] = children
        self._routeKeys.setdefault(route, set()).add(key)
        return children

    # -- per rebuild ----------------------------------------------------------------------------------------

    def observeReport(self, report: Any) -> None:
        """
        A new table went live: its generation and build time now; the per-resource counts and forgetting the
        label sets of removed routes wait for the next scrape (L{render}).  Those walk every resource, about
        15 ms for 10,000 on the reactor: paid once per scrape, not once per swap (a swap storm is many swaps).
        """
        self.generation.set(report.generation)
        self.rebuilds.inc()
        self.rebuildSeconds.observe(report.seconds)
        self._unsummarized = report

    def _summarize(self) -> None:
        report, self._unsummarized = self._unsummarized, None
        if report is not None:
            self._countResources(report)
            self._liveRoutes = {
                _ROUTE_PREFIX[type(r)] + r.meta.name
                for r in report.snapshot.resources
                if type(r) in _ROUTE_PREFIX
            }
        live = self._liveRoutes
        if live is None:
            return
        # Also at a scrape without a new table: a request that was still running on a removed route when it
        # was forgotten brings its labels back when it finishes.
        for route in [r for r in self._routeKeys if r not in live and r not in _FIXED_ROUTES]:
            self._forgetRoute(route)

    def _forgetRoute(self, route: str) -> None:
        for key in self._routeKeys.pop(route):
            self._children.pop(key, None)
        self.perRequest.forget(route)

    def _countResources(self, report: Any) -> None:
        counts: Dict[Tuple[str, str], int] = {}
        conflicts = {(c.kind, c.name) for c in report.compiled.conflicts}
        for (kind, name), record in report.snapshot.records.items():
            if record.rejection is not None:
                outcome = "rejected"
            elif (kind, name) in conflicts:
                outcome = "conflict"
            elif (kind, name) in report.unservable:
                outcome = "unservable"
            else:
                outcome = "served"
            counts[(kind, outcome)] = counts.get((kind, outcome), 0) + 1
        for labels in self._resourceLabels - set(counts):
            self.resources.labels(*labels).set(0)
        for labels, n in counts.items():
            self.resources.labels(*labels).set(n)
        self._resourceLabels |= set(counts)

    # -- scrape-time values ---------------------------------------------------------------------------------

    def watch(
        self,
        *,
        factory: Any = None,
        pool: Any = None,
        health: Any = None,
        source: Any = None,
        reconciler: Any = None,
    ) -> None:
        """Read these live objects at every scrape (connections, pool, checkers, source restarts, readiness)."""
        if self._live is not None:
            self.registry.unregister(self._live)
        self._live = _LiveCollector(factory, pool, health, source, reconciler)
        self.registry.register(self._live)

    def render(self) -> bytes:
        self._summarize()
        return generate_latest(self.registry)

    def resource(self) -> MetricsResource:
        return MetricsResource(self)


class _LiveCollector:
    def __init__(self, factory: Any, pool: Any, health: Any, source: Any, reconciler: Any) -> None:
        self.factory = factory
        self.pool = pool
        self.health = health
        self.source = source
        self.reconciler = reconciler

    def describe(self) -> List[Any]:
        return []  # values appear and disappear with checkers; nothing to check up front

    def collect(self) -> Iterable[Any]:
        if self.factory is not None:
            open_ = busy = upgraded = 0
            for proto in list(self.factory.connections):
                open_ += 1
                if getattr(proto, "_tunnelled", None) is not None:
                    upgraded += 1
                elif getattr(proto, "_current", None) is not None:
                    busy += 1
            yield GaugeMetricFamily("ksproxy_client_connections", "Open client connections.", value=open_)
            yield GaugeMetricFamily(
                "ksproxy_client_connections_active",
                "Client connections with a request in progress.",
                value=busy,
            )
            yield GaugeMetricFamily(
                "ksproxy_client_connections_upgraded",
                "Client connections relaying an upgraded protocol.",
                value=upgraded,
            )
            yield GaugeMetricFamily(
                "ksproxy_draining",
                "1 while the proxy listeners drain for shutdown.",
                value=1 if getattr(self.factory, "draining", False) else 0,
            )
        if self.pool is not None:
            yield GaugeMetricFamily(
                "ksproxy_upstream_connections",
                "Open upstream connections (busy and idle).",
                value=self.pool.active,
            )
            yield GaugeMetricFamily(
                "ksproxy_upstream_connections_idle",
                "Idle pooled upstream connections.",
                value=self.pool.idleCount(),
            )
        if self.health is not None:
            up = GaugeMetricFamily(
                "ksproxy_upstream_up",
                "Upstream health per checker: 1 up (or not checked yet), 0 down.",
                labels=["upstream", "tls", "check"],
            )
            failures = GaugeMetricFamily(
                "ksproxy_upstream_check_failures",
                "Consecutive failed health checks.",
                labels=["upstream", "tls", "check"],
            )
            checkers = 0
            for c in self.health.checkers.values():
                checkers += 1
                labels = [c.endpoint.origin, c.endpoint.tls.fingerprint, c.check.target]
                up.add_metric(labels, 1 if c.healthy else 0)
                failures.add_metric(labels, c.failures)
            yield up
            yield failures
            yield GaugeMetricFamily("ksproxy_health_checkers", "Running health checkers.", value=checkers)
        if self.source is not None:
            restarts = getattr(self.source, "restarts", None)
            family = CounterMetricFamily(
                "ksproxy_source_restarts",
                "Times the source had to re-list or re-watch, by kind.",
                labels=["kind"],
            )
            if isinstance(restarts, dict):
                for kind, n in sorted(restarts.items()):
                    family.add_metric([kind], n)
            elif isinstance(restarts, int):
                family.add_metric(["all"], restarts)
            yield family
        if self.reconciler is not None:
            yield GaugeMetricFamily(
                "ksproxy_ready",
                "1 once the source is synced and a table is built.",
                value=1 if self.reconciler.ready else 0,
            )
        # The route table is frozen out of the collector's sight after each build; this counts full collections
        # of the frozen heap (routing/background.py), which happen when the heap grew by a quarter.
        yield CounterMetricFamily(
            "ksproxy_gc_frozen_sweeps",
            "Full collections of the frozen heap (it had grown by a quarter).",
            value=background.sweeps,
        )


class MetricsResource(resource.Resource):
    """C{/metrics}: the registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self.metrics.render()

    render_HEAD = render_GET


def install(
    reconciler: Any, gateway: Any, pool: Any, health: Any, factory: Any, source: Any = None
) -> Metrics:
    """
    Wire a L{Metrics} into a built gateway: per-request observation through the factory's access log, table
    rebuilds through the reconciler, live values at scrape time.  Serve C{metrics.resource()} at /metrics.
    """
    metrics = Metrics()
    metrics.watch(
        factory=factory,
        pool=pool,
        health=health if health is not None else gateway.health,
        source=source,
        reconciler=reconciler,
    )
    accessLog = factory.accessLog
    if accessLog is not None and hasattr(accessLog, "addObserver"):
        accessLog.addObserver(metrics.observeExchange)
    reconciler.observers.append(metrics.observeReport)
    if reconciler.report is not None:
        metrics.observeReport(reconciler.report)
    return metrics
