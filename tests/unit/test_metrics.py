"""
The metrics registry and its feeds: per-request observation (cached label children), per-rebuild values,
scrape-time values, and the /metrics resource.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from ksproxy.accesslog import AccessLog
from ksproxy.health import HealthRegistry, checksOf
from ksproxy.metrics import Metrics, install
from ksproxy.reconcile import Reconciler


def exchange(
    route: str = "proxy/app", method: bytes = b"GET", code: int = 200, sent: int = 10, started: float = 0.0
):
    return SimpleNamespace(route=route, method=method, code=code, bytesSent=sent, startedAt=started)


def samples(metrics: Metrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def rp(name: str, port: int = 8080, check: bool = False) -> dict:
    spec = {"matcher": {"path": f"/{name}/*"}, "upstream": {"url": f"http://127.0.0.1:{port}"}}
    if check:
        spec["healthCheck"] = {"url": "/healthz", "interval": "10s"}
    return {
        "apiVersion": "extensions.kubesphere.io/v1alpha1",
        "kind": "ReverseProxy",
        "metadata": {"name": name},
        "spec": spec,
    }


class ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()

    def test_requestsByRouteMethodCode(self) -> None:
        m = self.metrics
        m.observeExchange(exchange(), False, 0.003)
        m.observeExchange(exchange(), False, 0.2)
        m.observeExchange(exchange(code=503, sent=0), False, 0.001)
        m.observeExchange(exchange(method=b"PROPFIND"), False, 0.001)
        got = samples(m)
        labels = (("code", "200"), ("method", "GET"), ("route", "proxy/app"))
        self.assertEqual(got[("ksproxy_requests_total", labels)], 2)
        self.assertEqual(
            got[("ksproxy_requests_total", (("code", "503"), ("method", "GET"), ("route", "proxy/app")))], 1
        )
        self.assertEqual(
            got[("ksproxy_requests_total", (("code", "200"), ("method", "OTHER"), ("route", "proxy/app")))], 1
        )
        self.assertEqual(got[("ksproxy_response_body_bytes_total", (("route", "proxy/app"),))], 30)
        self.assertEqual(got[("ksproxy_request_duration_seconds_count", (("route", "proxy/app"),))], 4)
        self.assertEqual(
            got[("ksproxy_request_duration_seconds_bucket", (("le", "0.005"), ("route", "proxy/app")))], 3
        )

    def test_histogramExposesWhatPrometheusClientWould(self) -> None:
        """Our lock-free histogram against prometheus_client's own, on bucket bounds and between them."""
        from prometheus_client import CollectorRegistry, Histogram

        from ksproxy.metrics import LATENCY_BUCKETS

        registry = CollectorRegistry()
        reference = Histogram(
            "ksproxy_request_duration_seconds", "x", ["route"], buckets=LATENCY_BUCKETS, registry=registry
        )
        durations = [0.0, 0.001, 0.0011, 0.005, 0.0499, 1.0, 59.9, 60.0, 61.0, 1e9]
        for d in durations:
            self.metrics.observeExchange(exchange(), False, d)
            reference.labels("proxy/app").observe(d)
        ours = {k: v for k, v in samples(self.metrics).items() if k[0].startswith("ksproxy_request_duration")}
        theirs = {}
        for family in text_string_to_metric_families(
            __import__("prometheus_client").generate_latest(registry).decode()
        ):
            for s in family.samples:
                if not s.name.endswith("_created"):
                    theirs[(s.name, tuple(sorted(s.labels.items())))] = s.value
        self.assertEqual(ours, theirs)

    def test_labelChildrenAreBoundOnce(self) -> None:
        m = self.metrics
        m.observeExchange(exchange(), False, 0.01)
        children = m._children[("proxy/app", b"GET", 200)]
        # A different str object with the same value (as dispatch builds per request) hits the same entry.
        m.observeExchange(exchange(route="".join(["proxy/", "app"])), False, 0.01)
        self.assertIs(m._children[("proxy/app", b"GET", 200)], children)
        self.assertEqual(len(m._children), 1)

    def test_abortedAndRejected(self) -> None:
        m = self.metrics
        m.observeExchange(exchange(code=0, sent=0), True, 1.0)
        m.observeExchange(exchange(code=200), True, 1.0)
        m.observeExchange(
            exchange(route="rejected: request headers too large", code=431, method=b"-"), False, 0.0
        )
        got = samples(m)
        self.assertEqual(
            got[("ksproxy_requests_total", (("code", "aborted"), ("method", "GET"), ("route", "proxy/app")))],
            1,
        )
        self.assertEqual(got[("ksproxy_requests_aborted_total", (("route", "proxy/app"),))], 2)
        self.assertEqual(got[("ksproxy_http_rejections_total", (("code", "431"),))], 1)
        self.assertFalse(any(k[0] == "ksproxy_requests_total" and ("route", "rejected") in k[1] for k in got))

    def test_accessLogFeedsObserversEvenWhenTheLogIsOff(self) -> None:
        clock = task.Clock()
        clock.advance(5)
        seen: List[tuple] = []
        log = AccessLog(clock, enabled=False)
        log.addObserver(lambda e, aborted, d: seen.append((e.route, aborted, d)))
        log.addObserver(lambda e, aborted, d: 1 / 0)  # a broken observer does not stop the others or the log
        log.addObserver(self.metrics.observeExchange)
        log(SimpleNamespace(**vars(exchange(started=4.5))), False)
        self.assertEqual(seen, [("proxy/app", False, 0.5)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(
            samples(self.metrics)[("ksproxy_request_duration_seconds_sum", (("route", "proxy/app"),))], 0.5
        )


class ReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.gateway = SimpleNamespace(state=None, health=None)
        self.reconciler = Reconciler(self.clock, self.gateway)
        self.metrics = Metrics()
        self.reconciler.observers.append(self.metrics.observeReport)

    def test_generationRebuildsAndResources(self) -> None:
        inv = self.reconciler.inventory
        inv.upsert(rp("app"))
        inv.upsert(
            {
                "apiVersion": "extensions.kubesphere.io/v1alpha1",
                "kind": "ReverseProxy",
                "metadata": {"name": "bad"},
                "spec": {},
            }
        )
        self.reconciler.rebuild()
        self.reconciler.rebuild()
        got = samples(self.metrics)
        self.assertEqual(got[("ksproxy_route_table_generation", ())], 2)
        self.assertEqual(got[("ksproxy_route_table_rebuilds_total", ())], 2)
        self.assertEqual(got[("ksproxy_route_table_rebuild_duration_seconds_count", ())], 2)
        self.assertEqual(got[("ksproxy_resources", (("kind", "ReverseProxy"), ("outcome", "served")))], 1)
        self.assertEqual(got[("ksproxy_resources", (("kind", "ReverseProxy"), ("outcome", "rejected")))], 1)
        inv.delete("ReverseProxy", "bad")
        self.reconciler.rebuild()
        got = samples(self.metrics)
        self.assertEqual(got[("ksproxy_resources", (("kind", "ReverseProxy"), ("outcome", "rejected")))], 0)

    def test_removedRoutesLoseTheirLabels(self) -> None:
        inv = self.reconciler.inventory
        for n in range(200):
            name = f"r{n}"
            inv.upsert(rp(name))
            if n:
                inv.delete("ReverseProxy", f"r{n - 1}")
            self.reconciler.rebuild()
            self.metrics.observeExchange(exchange(route=f"proxy/{name}"), False, 0.01)
            self.metrics.observeExchange(exchange(route="-", code=404), False, 0.01)
        # Forgotten at the next scrape, not at each swap (a swap must not walk every resource on the reactor).
        self.assertEqual(len(self.metrics._routeKeys), 201)
        routes = {dict(k[1]).get("route") for k in samples(self.metrics) if k[0] == "ksproxy_requests_total"}
        self.assertEqual(routes, {"proxy/r199", "-"})
        self.assertEqual(set(self.metrics._routeKeys), {"proxy/r199", "-"})
        # A request on a removed route that finishes after the scrape that forgot it: gone again at the next one,
        # though no table was built in between.
        self.metrics.observeExchange(exchange(route="proxy/r0"), False, 0.01)
        routes = {dict(k[1]).get("route") for k in samples(self.metrics) if k[0] == "ksproxy_requests_total"}
        self.assertEqual(routes, {"proxy/r199", "-"})


class Conn:
    def __init__(self, current: object, tunnelled: object) -> None:
        self._current = current
        self._tunnelled = tunnelled


class LiveTests(SynchronousTestCase):
    def test_scrapeTimeValues(self) -> None:
        clock = task.Clock()
        health = HealthRegistry(clock, lambda ep, check: defer.succeed("down"))
        reconciler = Reconciler(clock, SimpleNamespace(state=None, health=health))
        reconciler.inventory.upsert(rp("app", check=True))
        report = reconciler.rebuild()
        health.reconcile(checksOf(report.snapshot.resources))
        conns = [Conn(None, None), Conn(object(), None), Conn(None, object())]
        factory = SimpleNamespace(
            connections=set(conns), draining=False, accessLog=AccessLog(clock, enabled=False)
        )
        pool = SimpleNamespace(active=4, idleCount=lambda: 3)
        source = SimpleNamespace(restarts={"ReverseProxy": 2, "APIService": 0})
        gateway = SimpleNamespace(health=health)
        metrics = install(reconciler, gateway, pool, None, factory, source)
        factory.accessLog(SimpleNamespace(**vars(exchange())), False)
        got = samples(metrics)
        self.assertEqual(got[("ksproxy_client_connections", ())], 3)
        self.assertEqual(got[("ksproxy_client_connections_active", ())], 1)
        self.assertEqual(got[("ksproxy_client_connections_upgraded", ())], 1)
        self.assertEqual(got[("ksproxy_upstream_connections", ())], 4)
        self.assertEqual(got[("ksproxy_upstream_connections_idle", ())], 3)
        up = (("check", "/healthz"), ("tls", "system"), ("upstream", "http://127.0.0.1:8080"))
        self.assertEqual(got[("ksproxy_upstream_up", up)], 1)  # one failure is not yet down (fall 3)
        self.assertEqual(got[("ksproxy_upstream_check_failures", up)], 1)
        self.assertEqual(got[("ksproxy_health_checkers", ())], 1)
        self.assertEqual(got[("ksproxy_source_restarts_total", (("kind", "ReverseProxy"),))], 2)
        self.assertEqual(got[("ksproxy_route_table_generation", ())], 1)  # the report before install counts
        self.assertEqual(
            got[("ksproxy_requests_total", (("code", "200"), ("method", "GET"), ("route", "proxy/app")))], 1
        )
        clock.advance(10)
        clock.advance(10)
        got = samples(metrics)
        self.assertEqual(got[("ksproxy_upstream_up", up)], 0)

    def test_resource(self) -> None:
        metrics = Metrics()
        metrics.observeExchange(exchange(), False, 0.01)
        request = DummyRequest([b""])
        body = metrics.resource().render_GET(request)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        self.assertIn(b'ksproxy_requests_total{code="200",method="GET",route="proxy/app"} 1.0', body)

    def test_ownRegistry(self) -> None:
        one, two = Metrics(), Metrics()
        one.observeExchange(exchange(), False, 0.01)
        self.assertNotIn(b"proxy/app", two.render())
