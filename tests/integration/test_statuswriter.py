"""
L{ksproxy.status_writer.StatusWriter} and L{ksproxy.lease.LeaseElector} through the real C{kubernetes}
client against L{ksproxy.testing.kubeapi.FakeKubeAPI}, on the real reactor with real threads: two replicas
share one Lease and exactly one writes; the other takes over on release and on expiry; nothing is written
when nothing changed, and our own write (which bumps metadata.generation) is not answered with another.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

from kubernetes import client, config
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from ksproxy.model.types import API_VERSION
from ksproxy.status_writer import StatusInput, StatusWriter, makeStatusService
from ksproxy.testing.kubeapi import FakeKubeAPI
from tests.util import eventually

NAMESPACE = "ksproxy-system"
# Short timings (the Lease API counts leaseDurationSeconds in whole seconds, so 1s is the least).
TIMINGS = dict(leaseDuration=1.0, renewDeadline=0.6, retryPeriod=0.1)


def bundle(name: str) -> Dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "JSBundle",
        "metadata": {"name": name},
        "spec": {"raw": "ZXhwb3J0IGRlZmF1bHQge307"},
    }


class StatusWriterIntegrationTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.api = FakeKubeAPI()
        self.api.start()
        self.addCleanup(self.api.stop)
        self.kubeconfig = self.api.kubeconfig(self.mktemp())

    def writer(self, identity: str, *, elect: bool = True) -> StatusWriter:
        configuration = client.Configuration()
        config.load_kube_config(self.kubeconfig, client_configuration=configuration)
        apiClient = client.ApiClient(configuration)
        parent, writer = makeStatusService(
            apiClient, reactor, namespace=NAMESPACE, identity=identity, elect=elect, **TIMINGS
        )
        parent.startService()
        self.addCleanup(lambda: parent.stopService() if parent.running else None)
        writer.parentService = parent  # type: ignore[attr-defined]  # for tests that stop it
        return writer

    def patches(self, name: str) -> List[Any]:
        return [
            r for r in self.api.requests
            if r.method == "PATCH" and r.path.endswith(f"/jsbundles/{name}")
        ]

    def holder(self) -> Any:
        lease = self.api.get("Lease", "ksproxy", NAMESPACE)
        return None if lease is None else lease["spec"].get("holderIdentity")

    def waitFor(self, predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> Any:
        return eventually(predicate, what, timeout)

    def sleep(self, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(reactor, seconds, lambda: None)

    def feed(self, writer: StatusWriter, name: str, **kw: Any) -> None:
        raw = self.api.get("JSBundle", name)
        assert raw is not None
        writer.update([StatusInput(kind="JSBundle", raw=raw, **kw)])

    def conditions(self, name: str) -> Dict[str, Dict[str, Any]]:
        obj = self.api.get("JSBundle", name) or {}
        return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}

    @defer.inlineCallbacks
    def twoWriters(self) -> Any:
        a, b = self.writer("replica-a"), self.writer("replica-b")
        yield self.waitFor(lambda: a.isLeader or b.isLeader, "a leader")
        leader, other = (a, b) if a.isLeader else (b, a)
        return leader, other

    @defer.inlineCallbacks
    def test_exactlyOneWrites(self) -> Any:
        self.api.put(bundle("b"))
        leader, other = yield self.twoWriters()
        self.assertEqual(self.holder(), leader.elector.identity)  # type: ignore[union-attr]
        for w in (leader, other):
            self.feed(w, "b", programmed=True, defaultedLink="/dist/b/index.js")
        yield self.waitFor(lambda: leader.writes == 1, "the leader's write")
        yield self.sleep(0.5)  # several lease periods: the other replica must still not write
        self.assertEqual((leader.writes, other.writes), (1, 0))
        self.assertFalse(other.isLeader)
        self.assertEqual(other.pending, 1)  # it knows what it would write
        self.assertEqual(len(self.patches("b")), 1)
        stored = self.api.get("JSBundle", "b")
        self.assertEqual(stored["status"]["link"], "/dist/b/index.js")
        self.assertEqual(self.conditions("b")["Programmed"]["status"], "True")
        # Both see the object as the leader wrote it: nothing left to do for either.
        for w in (leader, other):
            self.feed(w, "b", programmed=True, defaultedLink=None)
        self.assertEqual((leader.pending, other.pending), (0, 0))

    @defer.inlineCallbacks
    def test_takeOverOnRelease(self) -> Any:
        self.api.put(bundle("b"))
        leader, other = yield self.twoWriters()
        started = time.monotonic()
        yield leader.parentService.stopService()  # type: ignore[attr-defined]
        # Released, not left to expire: nobody holds it, or the other replica already took it over.
        self.assertIn(self.holder(), (None, other.elector.identity))  # type: ignore[union-attr]
        yield self.waitFor(lambda: other.isLeader, "the other replica to take over", timeout=2.0)
        self.assertLess(time.monotonic() - started, 0.9)  # quicker than waiting out leaseDurationSeconds
        self.assertEqual(self.holder(), other.elector.identity)  # type: ignore[union-attr]
        self.feed(other, "b", programmed=False)
        yield self.waitFor(lambda: other.writes == 1, "the new leader's write")
        self.assertEqual(self.conditions("b")["Programmed"]["reason"], "Pending")
        self.assertEqual(leader.writes, 0)

    @defer.inlineCallbacks
    def test_takeOverOnExpiry(self) -> Any:
        self.api.put(bundle("b"))
        leader, other = yield self.twoWriters()
        yield self.sleep(0.3)  # the other replica has watched the lease being renewed
        leader.elector._loop.stop()  # type: ignore[union-attr]  # the leader "dies": no renew, no release
        stopped = time.monotonic()
        yield self.waitFor(lambda: other.isLeader, "takeover after expiry", timeout=4.0)
        waited = time.monotonic() - stopped
        self.assertGreater(waited, 0.7)  # not before leaseDurationSeconds (1s) without a renew
        self.assertEqual(self.holder(), other.elector.identity)  # type: ignore[union-attr]
        lease = self.api.get("Lease", "ksproxy", NAMESPACE)
        self.assertEqual(lease["spec"]["leaseTransitions"], 1)
        self.feed(other, "b", programmed=True)
        yield self.waitFor(lambda: other.writes == 1, "the new leader's write")

    @defer.inlineCallbacks
    def test_noWriteWhenNothingChanged(self) -> Any:
        self.api.put(bundle("b"))
        self.api.put(bundle("c"))
        w = self.writer("solo", elect=False)
        self.feed(w, "b", programmed=True)
        yield self.waitFor(lambda: w.writes == 1, "the first write")
        for _ in range(3):
            self.feed(w, "b", programmed=True)
            self.feed(w, "c", programmed=True)  # a second object, also written once
            yield self.sleep(0.1)
        self.assertEqual(len(self.patches("b")), 1)
        self.assertEqual(len(self.patches("c")), 1)
        self.assertEqual(w.writes, 2)

    @defer.inlineCallbacks
    def test_ownGenerationBumpNotAnswered(self) -> Any:
        """
        Without a status subresource our write bumps metadata.generation; the watch delivers that object
        back, and the writer must recognise it as its own.
        """
        created = self.api.put(bundle("b"))
        self.assertEqual(created["metadata"]["generation"], 1)
        w = self.writer("solo", elect=False)
        self.feed(w, "b", programmed=True)
        yield self.waitFor(lambda: w.writes == 1, "the first write")
        stored = self.api.get("JSBundle", "b")
        self.assertEqual(stored["metadata"]["generation"], 2)
        self.assertEqual({c["observedGeneration"] for c in self.conditions("b").values()}, {1})
        for _ in range(5):
            self.feed(w, "b", programmed=True)  # the echo of our own write
            yield self.sleep(0.05)
        self.assertEqual(len(self.patches("b")), 1)
        self.assertEqual(self.api.get("JSBundle", "b")["metadata"]["generation"], 2)
        # A real spec change is answered, with the generation read before writing.
        edited = self.api.get("JSBundle", "b")
        edited["spec"]["raw"] = "ZXhwb3J0IGRlZmF1bHQgMTs="
        self.api.put(edited)
        self.feed(w, "b", programmed=True)
        yield self.waitFor(lambda: w.writes == 2, "the write after a spec change")
        self.assertEqual({c["observedGeneration"] for c in self.conditions("b").values()}, {3})

    @defer.inlineCallbacks
    def test_conflictRetriedWithFreshRead(self) -> Any:
        """A write computed on a stale resourceVersion gets a 409, reads again and lands."""
        self.api.put(bundle("b"))
        stale = self.api.get("JSBundle", "b")
        current = self.api.get("JSBundle", "b")
        current["status"] = {"state": "Available"}  # someone else's status write in between
        self.api.put(current)
        w = self.writer("solo", elect=False)
        w.update([StatusInput(kind="JSBundle", raw=stale, programmed=True)])
        yield self.waitFor(lambda: w.writes == 1, "the write after the conflict")
        self.assertEqual(len(self.patches("b")), 2)
        stored = self.api.get("JSBundle", "b")
        self.assertEqual(stored["status"]["state"], "Available")  # the other writer's value survived
        self.assertEqual(self.conditions("b")["Accepted"]["status"], "True")


