"""
Tests for the file source's fast path (issue 7): work done in the watcher thread and installed by plan, the
shorter settle wait, and the fallback when a plan is refused.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import threading

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ksproxy.routing import background
from ksproxy.sources.files import DirectoryScanner, FileSource
from ksproxy.sources.inventory import Inventory
from tests.util import eventually


def manifest(name: str, host: str = "a.example") -> str:
    return (
        "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: APIService\n"
        f"metadata:\n  name: {name}\nspec:\n  group: demo.example.com\n  version: v1\n  url: http://{host}:8080\n"
    )


class _Directory:
    def setUp(self) -> None:
        parent = tempfile.mkdtemp(prefix="ksproxy-swap-")
        self.addCleanup(shutil.rmtree, parent, True)  # type: ignore[attr-defined]
        self.dir = os.path.join(parent, "manifests")
        os.makedirs(self.dir)

    def write(self, name: str, text: str) -> None:
        """Atomically, as kubectl-style tools and the benchmark do."""
        tmp = os.path.join(os.path.dirname(self.dir), name + ".new")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.dir, name))


class ScheduleTests(_Directory, SynchronousTestCase):
    def test_settling(self) -> None:
        scanner = DirectoryScanner(self.dir)
        self.write("a.yaml", manifest("a"))
        scanner.scan()
        self.assertFalse(scanner.settling)
        self.write("a.yaml", manifest("a", "b.example"))
        self.assertIsNone(scanner.scan())
        self.assertTrue(scanner.settling)
        self.assertIsNotNone(scanner.scan())
        self.assertFalse(scanner.settling)

    def test_nextScan(self) -> None:
        source = FileSource(self.dir, Inventory(lambda: None), reactor, pollInterval=0.1, settleInterval=0.05)
        self.assertEqual(source._nextScanIn(0.001), 0.1)
        self.assertAlmostEqual(source._nextScanIn(0.02), 0.4)  # scanning takes at most 5% of a core...
        self.assertEqual(source._nextScanIn(0.5), 1.0)  # ...but there is a scan every second
        source._scanner._pending["x"] = (None, 1)
        self.assertEqual(source._nextScanIn(0.5), 0.05)  # a change is waiting to be read

    def test_refusedPlanRedoneOnTheReactor(self) -> None:
        inventory = Inventory(lambda: None)
        source = FileSource(self.dir, inventory, reactor)
        source.running = True
        self.write("a.yaml", manifest("a"))
        docs, errors = source._scanner.scan()
        delivery = source._prepare(docs, errors)
        inventory.upsert(
            {
                "apiVersion": "extensions.kubesphere.io/v1alpha1",
                "kind": "APIService",
                "metadata": {"name": "other"},
                "spec": {"group": "o.example.com", "version": "v1", "url": "http://o.example"},
            }
        )
        installed = threading.Event()
        source._deliver(delivery, installed)
        self.assertTrue(installed.is_set())
        self.assertEqual(source.plansRefused, 1)
        self.assertEqual([r.meta.name for r in inventory.snapshot().resources], ["a"])
        self.assertTrue(source.synced.called)

    def test_eventSetWhenStopped(self) -> None:
        source = FileSource(self.dir, Inventory(lambda: None), reactor)
        delivery = source._prepare([], [])
        installed = threading.Event()
        source._deliver(delivery, installed)
        self.assertTrue(installed.is_set())


class WatcherTests(_Directory, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.inventory = Inventory(lambda: None)
        self.source = FileSource(self.dir, self.inventory, reactor, pollInterval=0.02, settleInterval=0.01)
        self.addCleanup(self.source.stopService)
        self.interval = sys.getswitchinterval()

    def names(self):  # type: ignore[no-untyped-def]
        return [r.meta.name for r in self.inventory.snapshot().resources]

    @defer.inlineCallbacks
    def test_changesGoInByPlan(self):  # type: ignore[no-untyped-def]
        self.write("a.yaml", manifest("a"))
        self.source.startService()
        yield self.source.synced
        self.assertEqual(self.names(), ["a"])
        self.write("a.yaml", manifest("a") + "---\n" + manifest("b"))
        yield from eventually(lambda: self.names() == ["a", "b"], "b served")
        bad = manifest("a").replace("  group:", "  group: [")
        self.write("a.yaml", bad)
        yield from eventually(lambda: bool(self.inventory.snapshot().sourceErrors), "the error reported")
        self.assertEqual(self.names(), ["a", "b"])  # a file that does not load keeps serving
        self.assertEqual(self.source.plansRefused, 0)
        yield from eventually(lambda: not background.active(), "the build window closed")
        self.assertEqual(sys.getswitchinterval(), self.interval)
        self.assertTrue(gc.isenabled())
