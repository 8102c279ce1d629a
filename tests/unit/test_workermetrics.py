"""
/metrics under --workers: worker 0 merges every worker's registry, each sample labelled by worker, and says
which workers answered.
"""

from __future__ import annotations

from typing import Dict, List

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from ksproxy.workermetrics import UP, AllWorkersMetrics, mergeWorkers


def exposition(requests: int, generation: int = 7) -> bytes:
    """What one worker's registry renders: a labelled counter, a histogram and a gauge."""
    registry = CollectorRegistry()
    counter = Counter("ksproxy_requests", "Requests.", ["route"], registry=registry)
    counter.labels("proxy/app").inc(requests)
    histogram = Histogram("ksproxy_seconds", "Latency.", ["route"], buckets=[0.1, 1.0], registry=registry)
    histogram.labels("proxy/app").observe(0.5)
    Gauge("ksproxy_route_table_generation", "Generation.", registry=registry).set(generation)
    return generate_latest(registry)


def parsed(body: bytes) -> Dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class MergeTests(SynchronousTestCase):
    def test_everySampleIsLabelledByItsWorker(self) -> None:
        got = parsed(mergeWorkers({0: exposition(3), 1: exposition(5)}))
        route = ("route", "proxy/app")
        self.assertEqual(got[("ksproxy_requests_total", (route, ("worker", "0")))], 3)
        self.assertEqual(got[("ksproxy_requests_total", (route, ("worker", "1")))], 5)
        self.assertEqual(got[("ksproxy_seconds_bucket", (("le", "1.0"), route, ("worker", "1")))], 1)
        # A gauge every worker reports alike stays one value per worker, not a sum.
        self.assertEqual(got[("ksproxy_route_table_generation", (("worker", "0"),))], 7)
        self.assertEqual(got[("ksproxy_route_table_generation", (("worker", "1"),))], 7)
        self.assertEqual(got[(UP, (("worker", "0"),))], 1)
        self.assertEqual(got[(UP, (("worker", "1"),))], 1)

    def test_eachFamilyAppearsOnce(self) -> None:
        """Prometheus rejects a family split in two: the workers' samples are joined under one TYPE line."""
        body = mergeWorkers({0: exposition(1), 1: exposition(2), 2: exposition(3)}).decode()
        self.assertEqual(body.count("# TYPE ksproxy_requests_total counter"), 1)
        self.assertEqual(body.count("# TYPE ksproxy_seconds histogram"), 1)

    def test_aWorkerThatDidNotAnswerIsDown(self) -> None:
        got = parsed(mergeWorkers({0: exposition(3), 1: None}))
        self.assertEqual(got[(UP, (("worker", "1"),))], 0)
        self.assertNotIn(("ksproxy_route_table_generation", (("worker", "1"),)), got)
        self.assertEqual(got[("ksproxy_route_table_generation", (("worker", "0"),))], 7)


class _Own:
    def render(self) -> bytes:
        return exposition(3)


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pending: Dict[int, defer.Deferred] = {}

    def fetch(self, index: int) -> defer.Deferred:
        d = self.pending[index] = defer.Deferred()
        return d

    def render(self, count: int) -> DummyRequest:
        request = DummyRequest([b""])
        self.assertEqual(AllWorkersMetrics(_Own(), count, self.fetch).render(request), NOT_DONE_YET)
        return request

    def test_waitsForEveryWorkerThenAnswersOnce(self) -> None:
        request = self.render(3)
        self.pending[1].callback(exposition(5))
        self.assertEqual(request.finished, 0)
        self.pending[2].errback(defer.TimeoutError())
        self.assertEqual(request.finished, 1)
        got = parsed(b"".join(request.written))
        self.assertEqual(got[("ksproxy_requests_total", (("route", "proxy/app"), ("worker", "1")))], 5)
        self.assertEqual(got[(UP, (("worker", "2"),))], 0)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_aScraperThatLeftGetsNothingWritten(self) -> None:
        request = self.render(2)
        request.processingFailed(Exception("gone"))  # the connection to the scraper was lost
        written: List[bytes] = list(request.written)
        self.pending[1].callback(exposition(5))
        self.assertEqual(request.written, written)

    def test_theRealFetcherTimesOut(self) -> None:
        """A worker that never answers is given up on after the timeout, on the reactor's clock."""
        import os
        import tempfile

        from twisted.internet import error
        from twisted.internet.testing import MemoryReactorClock

        from ksproxy.workermetrics import unixFetcher

        reactor = MemoryReactorClock()
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        d = unixFetcher(reactor, directory, timeout=2.0)(1)
        self.assertEqual([c[0] for c in reactor.unixClients], [os.path.join(directory, "metrics-1.sock")])
        reactor.advance(1.9)
        self.assertNoResult(d)
        reactor.advance(0.2)
        # (Cancelled while connecting: Twisted's own cancellation error rather than a TimeoutError.)
        self.failureResultOf(d, defer.TimeoutError, error.ConnectingCancelledError)
