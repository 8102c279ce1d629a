"""
ksproxy built by makeService with `--source kubernetes:<kubeconfig>` against the local test API server:
changes followed while a client keeps sending requests, statuses written by exactly one of two replicas.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ksproxy.testing.kubeapi import FakeKubeAPI
from tests.integration.gateway import RunningGateway
from tests.util import RecordingUpstream, eventually, httpRequest, listenUpstream

GROUP_VERSION = "extensions.kubesphere.io/v1alpha1"


def reverseProxy(name: str, path: str, port: int, **spec) -> dict:  # type: ignore[no-untyped-def]
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "ReverseProxy",
        "metadata": {"name": name},
        "spec": {"matcher": {"path": path, "method": "*"}, "upstream": {"url": f"http://127.0.0.1:{port}"}, **spec},
    }


class KubeGatewayTests(TestCase):
    def setUp(self) -> None:
        self.api = FakeKubeAPI()
        self.api.start()
        self.addCleanup(self.api.stop)
        self.kubeconfig = self.api.kubeconfig(os.path.join(tempfile.mkdtemp(), "kubeconfig"))
        self.upstream = RecordingUpstream()
        self.upPort, self.upstreamPort = listenUpstream(reactor, self.upstream)
        self.api.put(reverseProxy("app", "/app/*", self.upstreamPort))
        self.gateways = []

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        for gw in self.gateways:
            if gw.service.running:
                yield gw.stop()
        yield self.upPort.stopListening()

    @defer.inlineCallbacks
    def startGateway(self, *extra: str):  # type: ignore[no-untyped-def]
        gw = RunningGateway({}, list(extra), source="kubernetes:" + self.kubeconfig)
        self.gateways.append(gw)
        yield gw.start()
        return gw

    @defer.inlineCallbacks
    def test_followsChangesWithoutFailedRequests(self):  # type: ignore[no-untyped-def]
        gw = yield self.startGateway()
        status, _, _ = yield httpRequest(gw.port, "GET", "/app/x")
        self.assertEqual(status, 200)
        failures = []
        stop = []

        @defer.inlineCallbacks
        def client():  # type: ignore[no-untyped-def]
            n = 0
            while not stop and n < 500:
                code, _, _ = yield httpRequest(gw.port, "GET", "/app/x")
                n += 1
                if code != 200:
                    failures.append(code)

        running = client()
        self.api.put(reverseProxy("new", "/new/*", self.upstreamPort))
        yield eventually(lambda: any(r.meta.name == "new" for r in gw.reconciler.report.snapshot.resources))
        code, _, _ = yield httpRequest(gw.port, "GET", "/new/y")
        self.assertEqual(code, 200)
        self.api.put(reverseProxy("app", "/app/*", self.upstreamPort, directives={"headerUp": ["X-Edited: yes"]}))
        yield eventually(lambda: self.upstream.last.header(b"x-edited") == b"yes")
        self.api.cutWatches()
        self.api.delete("ReverseProxy", "new")
        yield eventually(lambda: not any(r.meta.name == "new" for r in gw.reconciler.report.snapshot.resources))
        code, _, _ = yield httpRequest(gw.port, "GET", "/new/y")
        self.assertEqual(code, 404)
        stop.append(True)
        yield running
        self.assertEqual(failures, [])

    @defer.inlineCallbacks
    def test_invalidObjectReportedOthersUnaffected(self):  # type: ignore[no-untyped-def]
        gw = yield self.startGateway()
        bad = reverseProxy("bad", "/bad/*", self.upstreamPort)
        bad["spec"]["upstream"]["caBundle"] = "bm90IGEgY2VydA=="
        self.api.put(bad)
        yield eventually(lambda: ("ReverseProxy", "bad") in gw.reconciler.report.snapshot.records)
        record = gw.reconciler.report.snapshot.records[("ReverseProxy", "bad")]
        self.assertIn("caBundle", str(record.rejection))
        code, _, _ = yield httpRequest(gw.port, "GET", "/app/x")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_exactlyOneReplicaWritesStatus(self):  # type: ignore[no-untyped-def]
        first = yield self.startGateway()
        second = yield self.startGateway()

        def conditions():  # type: ignore[no-untyped-def]
            obj = self.api.get("ReverseProxy", "app") or {}
            return {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions", [])}

        yield eventually(lambda: conditions().get("Programmed") == "True", "Programmed", timeout=10)
        self.assertEqual(conditions().get("Accepted"), "True")
        patches = [r for r in self.api.requests if r.method == "PATCH" and "reverseproxies" in r.path]
        agents = {r.headers.get("User-Agent", "") for r in patches}
        self.assertTrue(patches)
        # A quiet cluster sees no further writes once the status is right.
        count = len(patches)
        yield deferLater(reactor, 0.5, lambda: None)
        patches = [r for r in self.api.requests if r.method == "PATCH" and "reverseproxies" in r.path]
        self.assertEqual(len(patches), count)
        del agents
        # The holder stops: the other takes over and reports a new object.
        leader, other = (first, second) if _isLeader(first) else (second, first)
        self.assertTrue(_isLeader(leader))
        self.assertFalse(_isLeader(other))
        yield leader.stop()
        self.api.put(reverseProxy("later", "/later/*", self.upstreamPort))

        def laterProgrammed() -> bool:
            obj = self.api.get("ReverseProxy", "later") or {}
            return any(
                c["type"] == "Programmed" and c["status"] == "True"
                for c in (obj.get("status") or {}).get("conditions", [])
            )

        yield eventually(laterProgrammed, "takeover", timeout=20)


def _isLeader(gw: RunningGateway) -> bool:
    from ksproxy.status_writer import StatusWriter

    for svc in _walk(gw.service):
        if isinstance(svc, StatusWriter):
            return svc.isLeader
    return False


def _walk(svc):  # type: ignore[no-untyped-def]
    yield svc
    for child in getattr(svc, "services", []):
        yield from _walk(child)
