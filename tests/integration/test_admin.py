"""
The admin listener of a running gateway: /healthz, /readyz, /metrics (Prometheus text), /debug/routes with
health checker states, /debug/explain.
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from ksproxy.admin import adminSite
from ksproxy.metrics import install
from ksproxy.tap import Options
from tests.integration.faulty import ScriptedUpstream, answerOK
from tests.integration.gateway import RunningGateway
from tests.util import CLIENT_TIMEOUT, eventually, httpRequest

MANIFESTS = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: app}}
spec:
  matcher: {{path: /app/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{port}'}}
  healthCheck: {{url: /healthz, interval: 100ms, timeout: 100ms, fall: 1}}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: gone}}
spec:
  matcher: {{path: /gone/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{dead}'}}
  healthCheck: {{url: /healthz, interval: 100ms, timeout: 100ms, fall: 1}}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: broken}}
spec:
  matcher: {{path: 42}}
"""


def metricSamples(text: bytes) -> dict:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class AdminTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstream = ScriptedUpstream(answerOK)
        port = self.upstream.listen()
        dead = ScriptedUpstream(answerOK)
        deadPort = dead.listen()
        yield dead.kill()
        self.port, self.deadPort = port, deadPort
        self.gw = RunningGateway({"all.yaml": MANIFESTS.format(port=port, dead=deadPort)})
        yield self.gw.start()
        service = self.gw.service
        self.extraPort = None
        if getattr(service, "metrics", None) is not None:
            self.adminPort = self.gw.adminPort
        else:
            # Until makeService wires metrics itself: the same wiring, on an admin site of our own.
            metrics = install(
                service.reconciler,
                service.gateway,
                service.pool,
                service.gateway.health,
                service.factory,
                service.source,
            )
            site = adminSite(service.reconciler, service.gateway, service.pool, metrics)
            self.extraPort = reactor.listenTCP(0, site, interface="127.0.0.1")
            self.adminPort = self.extraPort.getHost().port
        health = service.gateway.health
        # Both checkers have run at least once (the dead one is down); on a loaded machine that can take more
        # than the 2 s this once waited before going on regardless (test_metrics then failed).
        yield eventually(
            lambda: len(health.checkers) == 2 and all(c.checked for c in health.checkers.values()),
            "both health checkers to have run",
            timeout=CLIENT_TIMEOUT,
        )

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        if self.extraPort is not None:
            yield self.extraPort.stopListening()
        yield self.gw.stop()
        yield self.upstream.cleanup()

    def test_adminDefaultsToLoopback(self) -> None:
        options = Options()
        options.parseOptions(["run", "--source", "dir:/nonexistent"])
        self.assertIn("interface=127.0.0.1", options.subOptions["admin-listen"])

    @defer.inlineCallbacks
    def test_healthzReadyz(self):  # type: ignore[no-untyped-def]
        status, _, body = yield httpRequest(self.gw.adminPort, "GET", "/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))
        status, _, _ = yield httpRequest(self.gw.adminPort, "GET", "/readyz")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_metrics(self):  # type: ignore[no-untyped-def]
        for _ in range(3):
            status, _, _ = yield httpRequest(self.gw.port, "GET", "/app/x")
            self.assertEqual(status, 200)
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/gone/x")
        self.assertEqual(status, 503)
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/nothing")
        self.assertEqual(status, 404)
        status, headers, body = yield httpRequest(self.adminPort, "GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(dict((k.lower(), v) for k, v in headers)["content-type"].startswith("text/plain"))
        got = metricSamples(body)
        self.assertEqual(
            got[("ksproxy_requests_total", (("code", "200"), ("method", "GET"), ("route", "proxy/app")))], 3
        )
        self.assertEqual(
            got[("ksproxy_requests_total", (("code", "503"), ("method", "GET"), ("route", "proxy/gone")))], 1
        )
        self.assertEqual(
            got[("ksproxy_requests_total", (("code", "404"), ("method", "GET"), ("route", "-")))], 1
        )
        self.assertEqual(got[("ksproxy_response_body_bytes_total", (("route", "proxy/app"),))], 6)
        self.assertEqual(got[("ksproxy_request_duration_seconds_count", (("route", "proxy/app"),))], 3)
        up = ("check", "/healthz"), ("tls", "system")
        self.assertEqual(
            got[("ksproxy_upstream_up", (*up, ("upstream", f"http://127.0.0.1:{self.port}")))], 1
        )
        self.assertEqual(
            got[("ksproxy_upstream_up", (*up, ("upstream", f"http://127.0.0.1:{self.deadPort}")))], 0
        )
        self.assertEqual(got[("ksproxy_health_checkers", ())], 2)
        self.assertGreaterEqual(got[("ksproxy_route_table_generation", ())], 1)
        self.assertEqual(got[("ksproxy_resources", (("kind", "ReverseProxy"), ("outcome", "rejected")))], 1)
        self.assertEqual(got[("ksproxy_ready", ())], 1)
        self.assertIn(("ksproxy_client_connections", ()), got)
        self.assertIn(("ksproxy_client_connections_upgraded", ()), got)
        self.assertIn(("ksproxy_upstream_connections_idle", ()), got)

    @defer.inlineCallbacks
    def test_debugRoutesShowsHealth(self):  # type: ignore[no-untyped-def]
        status, _, body = yield httpRequest(self.gw.adminPort, "GET", "/debug/routes")
        self.assertEqual(status, 200)
        doc = json.loads(body)
        states = {c["upstream"]: c for c in doc["healthCheckers"]}
        alive = states[f"http://127.0.0.1:{self.port}"]
        dead = states[f"http://127.0.0.1:{self.deadPort}"]
        self.assertEqual((alive["state"], alive["check"]), ("up", "/healthz"))
        self.assertEqual(dead["state"], "down")
        self.assertTrue(dead["lastError"])
        objects = {o["name"]: o for o in doc["objects"]}
        self.assertEqual(objects["app"]["upstreamHealth"], "up")
        self.assertEqual(objects["gone"]["upstreamHealth"], "down")
        self.assertIn("rejected", objects["broken"])

    @defer.inlineCallbacks
    def test_explain(self):  # type: ignore[no-untyped-def]
        status, _, body = yield httpRequest(self.gw.adminPort, "GET", "/debug/explain?method=GET&path=/app/x")
        self.assertEqual(status, 200)
        self.assertIn("app", json.dumps(json.loads(body)))
