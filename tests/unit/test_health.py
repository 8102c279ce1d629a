"""
Health checks (SPEC 4.4) on a task.Clock with a fake probe: sharing, reconciliation, thresholds, timeouts and
passive marks.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from ksproxy.health import Checker, HealthRegistry, checksOf, httpProbe
from ksproxy.model.types import (
    APIService,
    Endpoint,
    HealthCheck,
    JSBundle,
    Matcher,
    ObjectMeta,
    RawSource,
    ReverseProxy,
    TLSSettings,
)

A = Endpoint("http", "a.example", 80)
B = Endpoint("https", "b.example", 443)
B_CA = Endpoint("https", "b.example", 443, tls=TLSSettings(caBundle=b"-----BEGIN CERTIFICATE-----x"))
CHECK = HealthCheck(target="/healthz", interval=10.0, timeout=2.0, status=200, rise=2, fall=3)


class FakeProbe:
    """Each call returns a Deferred the test fires; calls are recorded by upstream."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Endpoint, HealthCheck, defer.Deferred]] = []

    def __call__(self, endpoint: Endpoint, check: HealthCheck) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((endpoint, check, d))
        return d

    def answer(self, result: Optional[str] = None) -> None:
        """Fire the oldest pending check (None = success)."""
        for _, _, d in self.calls:
            if not d.called:
                d.callback(result)
                return
        raise AssertionError("no pending check")

    def pending(self) -> int:
        return sum(1 for _, _, d in self.calls if not d.called)


def rp(name: str, endpoint: Endpoint, check: Optional[HealthCheck]) -> ReverseProxy:
    return ReverseProxy(ObjectMeta(name), (Matcher(f"/{name}/*"),), endpoint, healthCheck=check)


def api(name: str, endpoint: Endpoint, check: Optional[HealthCheck]) -> APIService:
    return APIService(ObjectMeta(name), "g.example", name, endpoint, healthCheck=check)


class ChecksOfTests(SynchronousTestCase):
    def test_distinctUpstreamAndCheck(self) -> None:
        other = HealthCheck(target="/other")
        wanted = checksOf(
            [
                rp("one", A, CHECK),
                rp("two", A, CHECK),  # same upstream and check: shared
                api("v1", A, CHECK),  # APIService accepts the same healthCheck, and shares too
                rp("three", A, other),  # same upstream, other check: its own checker
                rp("four", B, CHECK),
                rp("five", B_CA, CHECK),  # other TLS settings: another upstream
                rp("nocheck", B, None),
                JSBundle(ObjectMeta("js"), RawSource(b"x"), "/dist/js/index.js", True),
            ]
        )
        self.assertEqual(
            set(wanted),
            {(A.key, CHECK), (A.key, other), (B.key, CHECK), (B_CA.key, CHECK)},
        )


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.probe = FakeProbe()
        self.registry = HealthRegistry(self.clock, self.probe, passiveThreshold=3)

    def reconcile(self, *resources) -> None:  # type: ignore[no-untyped-def]
        self.registry.reconcile(checksOf(resources))

    def test_oneCheckerSharedByRoutes(self) -> None:
        self.reconcile(rp("one", A, CHECK), rp("two", A, CHECK), api("v1", A, CHECK))
        self.assertEqual(len(self.registry.checkers), 1)
        # The first check runs at once; one probe per interval, not one per route.
        self.assertEqual(len(self.probe.calls), 1)
        self.probe.answer()
        self.clock.advance(CHECK.interval)
        self.assertEqual(len(self.probe.calls), 2)

    def test_unknownCountsAsUp(self) -> None:
        self.reconcile(rp("one", A, CHECK))
        self.assertFalse(self.registry.isDown(A.key))
        self.assertIsNone(self.registry.upstreamHealthy(A.key))
        self.assertEqual(self.registry.describe()[0]["state"], "unknown")
        self.probe.answer()
        self.assertTrue(self.registry.upstreamHealthy(A.key))
        self.assertEqual(self.registry.describe()[0]["state"], "up")

    def test_downAfterFallFailuresUpAfterRiseSuccesses(self) -> None:
        self.reconcile(rp("one", A, CHECK))
        changes: List[bool] = []
        self.registry.listeners.append(lambda c: changes.append(c.healthy))
        for i in range(CHECK.fall):
            self.assertFalse(self.registry.isDown(A.key), f"down after only {i} failures")
            self.probe.answer("answered 500")
            self.clock.advance(CHECK.interval)
        self.assertTrue(self.registry.isDown(A.key))
        self.assertIs(self.registry.upstreamHealthy(A.key), False)
        self.assertEqual(changes, [False])
        self.assertEqual(self.registry.describe()[0]["lastError"], "answered 500")
        for i in range(CHECK.rise):
            self.assertTrue(self.registry.isDown(A.key), f"up after only {i} successes")
            self.probe.answer()
            self.clock.advance(CHECK.interval)
        self.assertFalse(self.registry.isDown(A.key))
        self.assertEqual(changes, [False, True])

    def test_successResetsFailureCount(self) -> None:
        self.reconcile(rp("one", A, CHECK))
        for result in ["bad", "bad", None, "bad", "bad"]:
            self.probe.answer(result)
            self.clock.advance(CHECK.interval)
        self.assertFalse(self.registry.isDown(A.key))

    def test_checkTimeout(self) -> None:
        """A check with no answer fails at check.timeout, not before."""
        check = HealthCheck(interval=10.0, timeout=2.0, fall=1)
        self.reconcile(rp("one", A, check))
        self.clock.advance(check.timeout - 0.01)
        self.assertFalse(self.registry.isDown(A.key))
        self.assertEqual(self.probe.pending(), 1)
        self.clock.advance(0.02)
        self.assertTrue(self.registry.isDown(A.key))
        self.assertEqual(self.probe.pending(), 0)  # the probe's Deferred was cancelled
        self.assertIn("no answer within 2s", self.registry.describe()[0]["lastError"])

    def test_clientTimeoutReadsAsATimeout(self) -> None:
        """treq's timeout ends the probe first, wrapped in ResponseNeverReceived: no list repr in lastError."""
        check = HealthCheck(interval=10.0, timeout=1.0, fall=1)
        self.reconcile(rp("one", A, check))
        _, _, d = self.probe.calls[0]
        d.errback(ResponseNeverReceived([Failure(defer.CancelledError())]))
        self.assertEqual(self.registry.describe()[0]["lastError"], "no answer within 1s")

    def test_probeRaisingIsAFailureNotADeadChecker(self) -> None:
        def raising(endpoint, check):  # type: ignore[no-untyped-def]
            raise ValueError("boom")

        registry = HealthRegistry(self.clock, raising)
        registry.reconcile(checksOf([rp("one", A, HealthCheck(fall=1))]))
        self.assertTrue(registry.isDown(A.key))
        checker = next(iter(registry.checkers.values()))
        self.assertTrue(checker.running)
        self.clock.advance(10)
        self.assertEqual(checker.runs, 2)

    def test_slowCheckIsNotOverlapped(self) -> None:
        check = HealthCheck(interval=1.0, timeout=5.0)  # the parser caps this; the registry copes anyway
        self.reconcile(rp("one", A, check))
        self.clock.advance(1.0)
        self.assertEqual(len(self.probe.calls), 1)

    def test_changedCheckRestartsOnlyThatChecker(self) -> None:
        self.reconcile(rp("one", A, CHECK), rp("two", B, CHECK))
        before = dict(self.registry.checkers)
        changed = HealthCheck(target="/ready", interval=5.0)
        self.reconcile(rp("one", A, changed), rp("two", B, CHECK))
        self.assertIs(self.registry.checkers[(B.key, CHECK)], before[(B.key, CHECK)])
        self.assertNotIn((A.key, CHECK), self.registry.checkers)
        self.assertFalse(before[(A.key, CHECK)].running)
        self.assertTrue(self.registry.checkers[(A.key, changed)].running)

    def test_removedCheckerCancelsItsCheckQuietly(self) -> None:
        self.reconcile(rp("one", A, HealthCheck(fall=1)))
        ((_, _, d),) = self.probe.calls
        self.reconcile()
        self.assertTrue(d.called)  # cancelled
        self.assertEqual(self.registry.checkers, {})
        self.assertFalse(self.registry.isDown(A.key))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_downStateGoesWithTheLastChecker(self) -> None:
        self.reconcile(rp("one", A, HealthCheck(fall=1)))
        self.probe.answer("bad")
        self.assertTrue(self.registry.isDown(A.key))
        self.reconcile()
        self.assertFalse(self.registry.isDown(A.key))

    def test_anyFailingCheckMarksTheUpstreamDown(self) -> None:
        other = HealthCheck(target="/other", fall=1)
        self.reconcile(rp("one", A, HealthCheck(fall=1)), rp("two", A, other))
        self.probe.answer(None)
        self.probe.answer("bad")
        self.assertTrue(self.registry.isDown(A.key))

    def test_thousandsOfRebuildsKeepExactlyTheWantedCheckers(self) -> None:
        upstreams = [Endpoint("http", f"u{i}.example", 80) for i in range(20)]
        for n in range(3000):
            # A sliding window of upstreams, some checks changing, so every rebuild adds and removes some.
            chosen = [upstreams[(n + j) % len(upstreams)] for j in range(7)]
            check = HealthCheck(interval=10.0 + (n % 3))
            resources = [rp(f"r{j}", ep, check) for j, ep in enumerate(chosen)]
            resources += [rp(f"dup{j}", ep, check) for j, ep in enumerate(chosen[:3])]
            self.reconcile(*resources)
            self.assertEqual(set(self.registry.checkers), {(ep.key, check) for ep in chosen})
            if n % 97 == 0:
                self.probe.answer() if self.probe.pending() else None
                self.clock.advance(1.0)
        self.assertEqual(len(self.registry.checkers), 7)
        self.assertTrue(all(c.running for c in self.registry.checkers.values()))
        # Timers: one loop and at most one check timeout per live checker; nothing left over from the others.
        self.assertLessEqual(len(self.clock.getDelayedCalls()), 14)
        self.assertEqual(set(self.registry._byUpstream), {k[0] for k in self.registry.checkers})
        self.registry.stopAll()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.registry._byUpstream, {})


class PassiveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.probe = FakeProbe()
        self.registry = HealthRegistry(self.clock, self.probe, passiveThreshold=3)
        self.registry.reconcile(checksOf([rp("one", A, CHECK)]))
        self.probe.answer()

    def test_consecutiveFailuresMarkDownUntilACheckSucceeds(self) -> None:
        self.registry.passiveFailure(A.key)
        self.registry.passiveFailure(A.key)
        self.assertFalse(self.registry.isDown(A.key))
        self.registry.passiveFailure(A.key)
        self.assertTrue(self.registry.isDown(A.key))
        # Still down at the next check if it fails, and until enough (rise) checks succeed.
        self.clock.advance(CHECK.interval)
        self.probe.answer()
        self.assertTrue(self.registry.isDown(A.key))
        self.clock.advance(CHECK.interval)
        self.probe.answer()
        self.assertFalse(self.registry.isDown(A.key))

    def test_successInBetweenResetsTheCount(self) -> None:
        for _ in range(5):
            self.registry.passiveFailure(A.key)
            self.registry.passiveFailure(A.key)
            self.registry.passiveSuccess(A.key)
        self.assertFalse(self.registry.isDown(A.key))

    def test_upstreamWithoutCheckerIsNeverMarkedDown(self) -> None:
        for _ in range(10):
            self.registry.passiveFailure(B.key)
        self.assertFalse(self.registry.isDown(B.key))
        self.assertEqual(self.registry._passive, {})


class CheckerTests(SynchronousTestCase):
    def test_stoppedCheckerIgnoresLateResults(self) -> None:
        clock = task.Clock()
        probe = FakeProbe()
        changes: List[Checker] = []
        checker = Checker(A, HealthCheck(fall=1), clock, probe, changes.append)
        checker.start()
        checker.stop()
        self.assertFalse(checker.running)
        self.assertEqual(changes, [])
        self.assertTrue(checker.healthy)


class FakeClient:
    def __init__(self, code: int) -> None:
        self.code = code
        self.asked: List[Tuple[str, Dict]] = []

    def get(self, endpoint, target, **kw):  # type: ignore[no-untyped-def]
        self.asked.append((target, kw))
        return defer.succeed((self.code, b""))

    def url(self, endpoint, target):  # type: ignore[no-untyped-def]
        return endpoint.origin + target


class HttpProbeTests(SynchronousTestCase):
    def test_expectedStatus(self) -> None:
        client = FakeClient(200)
        check = HealthCheck(target="/livez", timeout=3.0)
        self.assertIsNone(self.successResultOf(httpProbe(client)(A, check)))
        self.assertEqual(client.asked[0][0], "/livez")
        self.assertEqual(client.asked[0][1]["timeout"], 3.0)

    def test_otherStatusIsAFailure(self) -> None:
        message = self.successResultOf(
            httpProbe(FakeClient(503))(A, HealthCheck(target="/livez", status=204))
        )
        self.assertEqual(message, "http://a.example/livez answered 503, expected 204")


def test_endpointKeyIsTheUpstreamIdentity() -> None:
    """Endpoint.key (a string, hashed once): scheme, host, port and TLS settings by value; not the path."""
    from ksproxy.model.types import Endpoint, TLSSettings

    ca = TLSSettings(caBundle=b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    same = TLSSettings(caBundle=bytes(ca.caBundle))  # equal by value, another object
    assert Endpoint("https", "h", 443, "/a", ca).key == Endpoint("https", "h", 443, "/b", same).key
    keys = {
        Endpoint("https", "h", 443, tls=ca).key,
        Endpoint("https", "h", 443).key,
        Endpoint("https", "h", 443, tls=TLSSettings(insecureSkipVerify=True)).key,
        Endpoint("http", "h", 443).key,
        Endpoint("https", "h", 8443).key,
        Endpoint("https", "h2", 443).key,
    }
    assert len(keys) == 6
    assert all(isinstance(k, str) for k in keys)
