"""
C{/metrics} under C{--workers N}: every worker's registry in one scrape.

Each worker counts only the requests it accepted, and the admin port is served by worker 0 alone.  So each
other worker serves its own registry on a private UNIX socket (in a directory the supervisor made for this run,
mode 0700), and worker 0's C{/metrics} reads them all and labels every sample C{worker="i"}: the usual shape
for several processes behind one scrape target, summed in queries (C{sum without (worker) (...)}).  Gauges that
every worker reports alike (table generation, resources served) then appear once per worker rather than
wrongly added up.  A worker that does not answer in time (restarting, stuck) is left out of that scrape and
C{ksproxy_worker_metrics_up{worker="i"}} says 0.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, List, Optional

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

__all__ = ["AllWorkersMetrics", "mergeWorkers", "metricsSocket", "unixFetcher", "WORKER_DIR", "WORKER_COUNT"]

# Set by the supervisor for its workers: the private directory of the metrics sockets, and how many workers.
WORKER_DIR = "KSPROXY_WORKER_DIR"
WORKER_COUNT = "KSPROXY_WORKERS"

UP = "ksproxy_worker_metrics_up"

log = Logger()


def metricsSocket(directory: str, index: int) -> str:
    """Where worker C{index} serves its own /metrics."""
    return os.path.join(directory, f"metrics-{index}.sock")


class _Families:
    """What C{generate_latest} needs of a registry: C{collect()}."""

    def __init__(self, families: List[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def mergeWorkers(texts: Dict[int, Optional[bytes]]) -> bytes:
    """
    One exposition from each worker's (None: it did not answer): every sample gets a C{worker} label, the
    families of the same name are joined, and L{UP} says which workers are in.
    """
    families: Dict[str, Metric] = {}
    up = Metric(UP, "Whether this scrape includes the worker's metrics (1) or it did not answer in time (0).", "gauge")
    for index in sorted(texts):
        text = texts[index]
        worker = str(index)
        up.add_sample(UP, {"worker": worker}, 0.0 if text is None else 1.0)
        if text is None:
            continue
        for family in text_string_to_metric_families(text.decode("utf-8")):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, "worker": worker}) for s in family.samples)
    return generate_latest(_Families([*families.values(), up]))


@implementer(IAgentEndpointFactory)
class _OneSocket:
    def __init__(self, reactor, path: str) -> None:  # type: ignore[no-untyped-def]
        self.reactor = reactor
        self.path = path

    def endpointForURI(self, uri):  # type: ignore[no-untyped-def]
        return UNIXClientEndpoint(self.reactor, self.path)


def unixFetcher(reactor, directory: str, timeout: float = 2.0) -> Callable[[int], defer.Deferred]:  # type: ignore[no-untyped-def]
    """Fetch worker i's /metrics from its socket: a Deferred of the body, failing on any error or C{timeout}."""
    # One kept connection per worker: a scrape does not connect anew (nor log a client factory starting).
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1

    def fetch(index: int) -> defer.Deferred:
        agent = Agent.usingEndpointFactory(reactor, _OneSocket(reactor, metricsSocket(directory, index)), pool=pool)
        # The pool keys its connections by host: one name per worker.
        d = agent.request(b"GET", b"http://worker-%d/metrics" % index)

        def body(response):  # type: ignore[no-untyped-def]
            if response.code != 200:
                raise ValueError(f"worker {index} answered {response.code}")
            return readBody(response)

        d.addCallback(body)
        d.addTimeout(timeout, reactor)
        return d

    return fetch


class AllWorkersMetrics(resource.Resource):
    """Worker 0's C{/metrics}: its own registry and every other worker's, each sample labelled by worker."""

    isLeaf = True

    def __init__(self, metrics, count: int, fetch: Callable[[int], defer.Deferred]) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.metrics = metrics
        self.count = count
        self.fetch = fetch

    def render_GET(self, request: server.Request) -> int:
        own = self.metrics.render()
        others = [self.fetch(i) for i in range(1, self.count)]
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(results) -> None:  # type: ignore[no-untyped-def]
            texts: Dict[int, Optional[bytes]] = {0: own}
            for index, (ok, value) in enumerate(results, start=1):
                if not ok:
                    log.debug("worker {index} metrics: {why}", index=index, why=value.getErrorMessage())
                texts[index] = value if ok else None
            body = mergeWorkers(texts)
            if gone:
                return
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        def failed(reason: Failure) -> None:
            log.failure("merging the workers' metrics", reason)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        defer.DeferredList(others, consumeErrors=True).addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET

    render_HEAD = render_GET
