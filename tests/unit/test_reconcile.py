"""
The reconciler: a burst of changes causes one rebuild on the next reactor turn; each rebuild swaps the
gateway's state in one assignment and tells the observers; servability follows SPEC 8.
"""

from __future__ import annotations

from typing import List

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.paths import parseTarget
from ksproxy.proxy.dispatch import Gateway, ServedState
from ksproxy.reconcile import MAX_PROBLEM_LINES, Reconciler
from ksproxy.routing import compileTable


def rp(name: str, path: str, state=None) -> dict:  # type: ignore[no-untyped-def]
    obj = {
        "apiVersion": "extensions.kubesphere.io/v1alpha1",
        "kind": "ReverseProxy",
        "metadata": {"name": name},
        "spec": {"matcher": {"path": path, "method": "*"}, "upstream": {"url": "http://127.0.0.1:1"}},
    }
    if state:
        obj["status"] = {"state": state}
    return obj


class ReconcilerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = Gateway(self.clock, ServedState(compileTable((), generation=0).table, {}, 0, False), None)  # type: ignore[arg-type]

    def make(self, stateGate=None) -> Reconciler:  # type: ignore[no-untyped-def]
        reconciler = Reconciler(self.clock, self.gateway, stateGate=stateGate)
        self.reports = []
        reconciler.observers.append(self.reports.append)
        return reconciler

    def test_burstCausesOneRebuild(self) -> None:
        reconciler = self.make()
        for i in range(50):
            reconciler.inventory.upsert(rp(f"r{i}", f"/r{i}/*"))
        self.assertEqual(reconciler.rebuilds, 0)
        self.clock.advance(0)
        self.assertEqual(reconciler.rebuilds, 1)
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(self.gateway.state.generation, 1)
        route = self.gateway.state.table.lookup(b"GET", parseTarget(b"/r7/x"))
        self.assertEqual(route.name, "r7")

    def test_problemsLoggedOnceAndBounded(self) -> None:
        """Each new problem is logged once, at most MAX_PROBLEM_LINES lines per build, the rest summed up."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reconciler = self.make()

        def broken(name: str, path: str) -> dict:  # type: ignore[type-arg]
            obj = rp(name, path)
            obj["spec"]["upstream"]["url"] = 1
            return obj

        for i in range(MAX_PROBLEM_LINES + 7):
            reconciler.inventory.upsert(broken(f"bad{i}", f"/bad{i}/*"))
        reconciler.rebuild()
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "ksproxy.reconcile"]
        rejected = [line for line in lines if line.startswith("rejected ReverseProxy/bad")]
        self.assertEqual(len(rejected), MAX_PROBLEM_LINES)
        self.assertIn("... and 7 more new problems in route table generation 1", lines[-1])

        del events[:]
        reconciler.inventory.upsert(broken("bad-new", "/bad-new/*"))
        reconciler.rebuild()
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "ksproxy.reconcile"]
        self.assertEqual([line for line in lines if line.startswith("rejected")], [lines[-1]])
        self.assertIn("ReverseProxy/bad-new", lines[-1])  # only the new one: the others were seen before

    def test_swapKeepsOldStateObjectIntact(self) -> None:
        """A request holding the old state keeps a consistent view: the swap replaces, never mutates."""
        reconciler = self.make()
        reconciler.inventory.upsert(rp("a", "/a/*"))
        self.clock.advance(0)
        old = self.gateway.state
        reconciler.inventory.delete("ReverseProxy", "a")
        self.clock.advance(0)
        self.assertIsNot(self.gateway.state, old)
        self.assertIsNotNone(old.table.lookup(b"GET", parseTarget(b"/a/x")))
        self.assertIsNone(self.gateway.state.table.lookup(b"GET", parseTarget(b"/a/x")))

    def test_readyOnlyAfterSync(self) -> None:
        reconciler = self.make()
        reconciler.inventory.upsert(rp("a", "/a/*"))
        self.clock.advance(0)
        self.assertFalse(self.gateway.state.ready)
        reconciler.markReady()
        self.assertTrue(self.gateway.state.ready)

    def test_servability(self) -> None:
        reconciler = self.make()
        reconciler.inventory.upsert(rp("off", "/off/*", "Disabled"))
        reconciler.inventory.upsert(rp("on", "/on/*", "Available"))
        reconciler.inventory.upsert(rp("unset", "/unset/*"))
        self.clock.advance(0)
        table = self.gateway.state.table
        self.assertFalse(table.lookup(b"GET", parseTarget(b"/off/x")).servable)
        self.assertTrue(table.lookup(b"GET", parseTarget(b"/unset/x")).servable)
        gated = self.make(stateGate="kubesphere")
        gated.inventory.upsert(rp("on", "/on/*", "Available"))
        gated.inventory.upsert(rp("unset", "/unset/*"))
        self.clock.advance(0)
        table = self.gateway.state.table
        self.assertTrue(table.lookup(b"GET", parseTarget(b"/on/x")).servable)
        route = table.lookup(b"GET", parseTarget(b"/unset/x"))
        self.assertFalse(route.servable)
        self.assertIn("Available", route.reason)

    def test_invalidUpdateKeepsLastGood(self) -> None:
        reconciler = self.make()
        reconciler.inventory.upsert(rp("a", "/a/*"))
        self.clock.advance(0)
        broken = rp("a", "/a/*")
        broken["spec"]["upstream"] = {"url": "ftp://nope"}
        reconciler.inventory.upsert(broken)
        self.clock.advance(0)
        self.assertIsNotNone(self.gateway.state.table.lookup(b"GET", parseTarget(b"/a/x")))
        record = reconciler.report.snapshot.records[("ReverseProxy", "a")]
        self.assertIn("spec.upstream.url", str(record.rejection))


class GatewayStartupAndTimeoutTests(SynchronousTestCase):
    def test_notReadyAnswers503(self) -> None:
        from twisted.internet.testing import StringTransport

        from ksproxy.http.server import HTTPServerFactory

        clock = Clock()
        gateway = Gateway(clock, ServedState(compileTable((), generation=0).table, {}, 0, False), None)  # type: ignore[arg-type]
        proto = HTTPServerFactory(gateway, clock).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "), transport.value()[:40])
        self.assertIn(b"Retry-After: 5", transport.value())
        gateway.state = ServedState(compileTable((), generation=1).table, {}, 1, True)
        transport.clear()
        proto.dataReceived(b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 "), transport.value()[:40])

    def test_perUpstreamTimeoutsMerge(self) -> None:
        from ksproxy.model.types import UpstreamTimeouts
        from ksproxy.proxy.forward import Timeouts

        gateway = Gateway(Clock(), ServedState(None, {}, 0, True), None, timeouts=Timeouts(connect=10.0, idle=900.0))  # type: ignore[arg-type]
        merged = gateway._timeoutsFor(UpstreamTimeouts(idle=5.0))
        self.assertEqual((merged.connect, merged.idle), (10.0, 5.0))
        self.assertIs(gateway._timeoutsFor(UpstreamTimeouts(idle=5.0)), merged)
        self.assertIs(gateway._timeoutsFor(None), gateway.timeouts)
