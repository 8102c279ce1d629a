"""
Tests for L{ksproxy.sources.files} on a real temporary directory: loading, the scanner driven scan by scan
(no sleeping), the inventory keeping routes of half-written files, and the watcher thread on the reactor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from typing import Callable, List, Optional

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ksproxy.sources import files
from ksproxy.sources.files import DirectoryScanner, FileSource, loadDirectory
from ksproxy.sources.inventory import Inventory

# ../shared/examples-real beside the checkout (as CI lays it out).
EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
    "shared",
    "examples-real",
)


def manifest(name: str, host: str = "a.example") -> str:
    return f"""\
apiVersion: extensions.kubesphere.io/v1alpha1
kind: APIService
metadata:
  name: {name}
  creationTimestamp: 2024-01-02T03:04:05Z
spec:
  group: demo.example.com
  version: v1
  url: http://{host}:8080
"""


class DirectoryMixin:
    def setUp(self) -> None:
        # Not trial's mktemp: under pytest that would write into the working tree.
        parent = tempfile.mkdtemp(prefix="ksproxy-filesource-")
        self.addCleanup(shutil.rmtree, parent, True)  # type: ignore[attr-defined]
        self.dir = os.path.join(parent, "manifests")
        os.makedirs(self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, text: str) -> str:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class LoadTests(DirectoryMixin, SynchronousTestCase):
    def test_layout(self) -> None:
        """Recursive, multi-document, JSON objects and Lists; ignored names; ordered by path then index."""
        self.write("b.yaml", manifest("b1") + "---\n" + "---\n# only a comment\n---\n" + manifest("b2"))
        self.write("a/c.yml", manifest("c"))
        self.write(
            "d.json", json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}})
        )
        self.write(
            "e.json",
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": [{"kind": "Secret", "metadata": {"name": "s"}}, {"kind": "X"}],
                }
            ),
        )
        self.write("f.yaml", "kind: List\nitems:\n- kind: A\n- kind: B\n")
        for ignored in (
            ".hidden.yaml",
            "b.yaml~",
            "#b.yaml#",
            ".b.yaml.swp",
            "notes.txt",
            ".git/x.yaml",
            "x.yaml.swp",
            "y.tmp",
        ):
            self.write(ignored, manifest("ignored"))
        docs, errors = loadDirectory(self.dir)
        self.assertEqual(errors, [])
        rel = [d.origin[len(self.dir) + 1 :] for d in docs]
        self.assertEqual(
            rel,
            [
                "a/c.yml#1",
                "b.yaml#1",
                "b.yaml#4",
                "d.json#1",
                "e.json#1.items[0]",
                "e.json#1.items[1]",
                "f.yaml#1.items[0]",
                "f.yaml#1.items[1]",
            ],
        )
        self.assertEqual([d.raw["metadata"]["name"] for d in docs[:3]], ["c", "b1", "b2"])

    def test_timestampsStayStrings(self) -> None:
        """As in Kubernetes (YAML read as JSON), a timestamp is a string, never a datetime."""
        self.write("a.yaml", manifest("a"))
        (doc,), _ = loadDirectory(self.dir)
        self.assertEqual(doc.raw["metadata"]["creationTimestamp"], "2024-01-02T03:04:05Z")

    def test_syntaxErrorHasLine(self) -> None:
        self.write("good.yaml", manifest("good"))
        bad = self.write(
            "bad.yaml", manifest("x") + "---\nkind: APIService\nmetadata:\n  name: y\n   spec: 1\n"
        )
        docs, errors = loadDirectory(self.dir)
        self.assertEqual([d.raw["metadata"]["name"] for d in docs], ["good"])  # nothing from the bad file
        (error,) = errors
        self.assertEqual((error.origin, error.line), (bad, 14))
        self.assertTrue(error.message.startswith(f"{bad}:14: "), error.message)
        self.assertIn("mapping values are not allowed", error.message)

    def test_otherErrors(self) -> None:
        cases = [
            ("a.json", '{\n  "kind": "X",\n  oops\n}', ":3: Expecting property name", ""),
            ("b.yaml", "- just\n- a list\n", "b.yaml: document 1: expected a mapping, found list", "#1"),
            ("c.yaml", manifest("c") + "---\nplain string\n", "c.yaml: document 2: expected a mapping, found str", "#2"),
            ("d.yaml", "kind: List\nitems: [1]\n", "d.yaml: document 1: items[0]: expected a mapping, found int", "#1.items[0]"),
            ("e.yaml", "kind: X\nname: \xff\n", None, ""),
        ]
        for name, text, _, _ in cases[:-1]:
            self.write(name, text)
        with open(self.path("e.yaml"), "wb") as f:
            f.write(b"kind: X\nname: \xff\n")
        docs, errors = loadDirectory(self.dir)
        # Only the document that is not a mapping is left out: c.yaml's first document loads.
        self.assertEqual([d.origin for d in docs], [self.path("c.yaml") + "#1"])
        self.assertEqual([e.origin for e in errors], [self.path(name) + at for name, _, _, at in cases])
        for (name, _, expected, _), error in zip(cases, errors):
            if expected:
                self.assertIn(expected, error.message, name)
        self.assertEqual(errors[-1].message, f"{self.path('e.yaml')}:2: not UTF-8 text")

    def test_nonMappingDocumentSkippedAlone(self) -> None:
        """A list among valid documents: the others load, the list is reported by file and document number."""
        path = self.write("t-list.yaml", manifest("a") + "---\n- just a list\n---\n" + manifest("b"))
        docs, errors = loadDirectory(self.dir)
        self.assertEqual([d.raw["metadata"]["name"] for d in docs], ["a", "b"])
        (error,) = errors
        self.assertEqual(error.origin, path + "#2")
        self.assertEqual(error.message, f"{path}: document 2: expected a mapping, found list")

    def test_listWithOneBadItem(self) -> None:
        text = "kind: List\nitems:\n- 7\n" + "- " + manifest("a").replace("\n", "\n  ").rstrip() + "\n"
        self.write("l.yaml", text)
        docs, errors = loadDirectory(self.dir)
        self.assertEqual([d.origin for d in docs], [self.path("l.yaml") + "#1.items[1]"])
        self.assertEqual([e.origin for e in errors], [self.path("l.yaml") + "#1.items[0]"])

    def test_missingDirectory(self) -> None:
        missing = self.path("nope")
        docs, errors = loadDirectory(missing)
        self.assertEqual(docs, [])
        self.assertEqual([e.origin for e in errors], [missing])
        self.assertIn("cannot read directory", errors[0].message)

    def test_examplesReal(self) -> None:
        """The published manifests load; the one unparsable chart file is reported with its line."""
        if not os.path.isdir(EXAMPLES):
            self.skipTest("examples-real not available")
        docs, errors = loadDirectory(EXAMPLES)
        self.assertEqual(len(errors), 1)
        self.assertIn("/invalid/", errors[0].origin)
        self.assertIsNotNone(errors[0].line)
        self.assertGreater(len(docs), 60)
        self.assertFalse(any("/invalid/" in d.origin for d in docs))


class ScannerTests(DirectoryMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.scanner = DirectoryScanner(self.dir)
        self.inventory = Inventory(lambda: None)

    def deliver(self) -> Optional[List[str]]:
        """One scan; hand a result to the inventory; return the served names (None: nothing delivered)."""
        result = self.scanner.scan()
        if result is None:
            return None
        self.inventory.replaceAll(*result)
        return self.names()

    def names(self) -> List[str]:
        return [r.meta.name for r in self.inventory.snapshot().resources]

    def test_firstScanThenNothing(self) -> None:
        self.write("a.yaml", manifest("a"))
        self.assertEqual(self.deliver(), ["a"])
        self.assertIsNone(self.scanner.scan())

    def test_emptyDirectoryFirstScanDelivers(self) -> None:
        self.assertEqual(self.scanner.scan(), ([], []))

    def test_addEditDelete(self) -> None:
        """Each change is delivered once its file has held still for one scan."""
        self.write("a.yaml", manifest("a"))
        self.deliver()
        self.write("b.yaml", manifest("b"))
        self.assertIsNone(self.deliver())
        self.assertEqual(self.deliver(), ["a", "b"])
        self.write("b.yaml", manifest("b", host="a-longer-host.example"))
        self.assertIsNone(self.deliver())
        self.assertEqual(self.deliver(), ["a", "b"])
        self.assertEqual(
            self.inventory.snapshot().records[("APIService", "b")].current.endpoint.host,
            "a-longer-host.example",
        )
        os.remove(self.path("a.yaml"))
        self.assertIsNone(self.deliver())  # a save by rename briefly removes the file: not yet
        self.assertEqual(self.deliver(), ["b"])

    def test_nonMappingDocumentLeavesTheRest(self) -> None:
        """
        A document turned into a list: the file's other documents are served (and updated); the object the
        bad document held keeps its last good version, as for a document without a name.
        """
        self.write("a.yaml", manifest("a1") + "---\n" + manifest("a2"))
        self.deliver()
        self.write("a.yaml", manifest("a1", host="new.example") + "---\n- just a list\n")
        self.deliver()
        self.assertEqual(self.deliver(), ["a1", "a2"])
        snap = self.inventory.snapshot()
        self.assertEqual(snap.records[("APIService", "a1")].current.endpoint.host, "new.example")
        self.assertFalse(snap.records[("APIService", "a1")].stale)
        self.assertTrue(snap.records[("APIService", "a2")].stale)
        (error,) = snap.sourceErrors
        self.assertEqual(error.message, f"{self.path('a.yaml')}: document 2: expected a mapping, found list")
        # A file that never served anything before: its valid document is served from the start.
        self.write("b.yaml", manifest("b") + "---\n- just a list\n")
        self.deliver()
        self.assertEqual(self.deliver(), ["a1", "a2", "b"])

    def test_saveByRenameNeverDropsRoutes(self) -> None:
        """Editor-style save: the file disappears, then a new one appears under the same name."""
        self.write("a.yaml", manifest("a"))
        self.deliver()
        os.rename(self.path("a.yaml"), self.path("a.yaml~"))
        self.assertIsNone(self.deliver())
        self.write("a.yaml", manifest("a", host="new.example"))
        self.assertIsNone(self.deliver())
        self.assertEqual(self.deliver(), ["a"])
        self.assertEqual(
            self.inventory.snapshot().records[("APIService", "a")].current.endpoint.host, "new.example"
        )

    def test_rename(self) -> None:
        self.write("a.yaml", manifest("a"))
        self.deliver()
        os.rename(self.path("a.yaml"), self.path("z.yaml"))
        self.assertIsNone(self.deliver())
        self.assertEqual(self.deliver(), ["a"])
        self.assertEqual(
            self.inventory.snapshot().records[("APIService", "a")].origin, self.path("z.yaml") + "#1"
        )
        self.assertEqual(self.inventory.parseCount, 1)

    def test_halfWrittenKeepsRoutes(self) -> None:
        self.write("a.yaml", manifest("a1") + "---\n" + manifest("a2"))
        self.write("b.yaml", manifest("b"))
        self.deliver()
        full = manifest("a1") + "---\n" + manifest("a2")
        self.write(
            "a.yaml", full[: full.index("  group:") + 9] + "\n  version v1: x: y\n"
        )  # cut mid-document
        self.deliver()
        self.assertEqual(self.deliver(), ["a1", "a2", "b"])
        snap = self.inventory.snapshot()
        self.assertTrue(snap.records[("APIService", "a1")].stale)
        (error,) = snap.sourceErrors
        self.assertEqual(error.origin, self.path("a.yaml"))
        self.assertIsNotNone(error.line)
        # Finished writing: only what the file now holds is served.
        self.write("a.yaml", manifest("a1"))
        self.deliver()
        self.assertEqual(self.deliver(), ["a1", "b"])
        self.assertEqual(self.inventory.snapshot().sourceErrors, ())

    def test_truncatedFileKeepsRoutes(self) -> None:
        self.write("a.yaml", manifest("a"))
        self.deliver()
        self.write("a.yaml", "")
        self.deliver()
        self.assertEqual(self.deliver(), ["a"])
        (error,) = self.inventory.snapshot().sourceErrors
        self.assertIn("file is empty", error.message)
        self.write("a.yaml", "# still nothing\n")
        self.deliver()
        self.assertEqual(self.deliver(), ["a"])  # still held: it has not had content since
        os.remove(self.path("a.yaml"))
        self.deliver()
        self.assertEqual(self.deliver(), [])
        self.assertEqual(self.inventory.snapshot().sourceErrors, ())

    def test_emptyFromTheStartIsNothing(self) -> None:
        self.write("a.yaml", "")
        self.assertEqual(self.scanner.scan(), ([], []))

    def test_rewrittenWhileReading(self) -> None:
        """A file that changes while it is read is read again at the next scan, never half-used."""
        self.deliver()
        self.write("a.yaml", manifest("a"))
        self.scanner.scan()  # seen once
        realRead = files._readBytes
        calls = []

        def readThenAppend(path: str):  # type: ignore[no-untyped-def]
            data = realRead(path)
            if not calls:
                with open(path, "a") as f:
                    f.write("---\n" + manifest("a2"))
            calls.append(path)
            return data

        self.patch(files, "_readBytes", readThenAppend)
        self.assertIsNone(self.deliver())
        self.assertEqual(self.deliver(), ["a", "a2"])

    def test_coarseTimestamps(self) -> None:
        """On a file system with one-second timestamps a same-size rewrite still shows (content check)."""
        self.patch(
            files,
            "_signature",
            lambda st: (
                st.st_mtime_ns // 10**9 * 10**9,
                st.st_ctime_ns // 10**9 * 10**9,
                st.st_size,
                st.st_ino,
                st.st_dev,
            ),
        )
        self.write("a.yaml", manifest("a", host="one.example"))
        self.deliver()
        with open(self.path("a.yaml"), "r+") as f:  # same inode, same size
            f.write(manifest("a", host="two.example"))
        for _ in range(3):
            self.deliver()
        self.assertEqual(
            self.inventory.snapshot().records[("APIService", "a")].current.endpoint.host, "two.example"
        )

    def test_directoryVanishingHoldsEverything(self) -> None:
        self.write("sub/a.yaml", manifest("a"))
        self.deliver()
        shutil.move(self.dir, self.dir + ".away")
        self.assertEqual(self.deliver(), ["a"])
        self.assertIn("cannot read directory", self.inventory.snapshot().sourceErrors[0].message)
        shutil.move(self.dir + ".away", self.dir)
        self.assertEqual(self.deliver(), ["a"])
        self.assertEqual(self.inventory.snapshot().sourceErrors, ())

    def test_configMapVolumeSwap(self) -> None:
        """Kubernetes ConfigMap volumes: files are symlinks through ..data, swapped atomically."""
        self.write("..v1/a.yaml", manifest("a", host="one.example"))
        os.symlink("..v1", self.path("..data"))
        os.symlink("..data/a.yaml", self.path("a.yaml"))
        self.assertEqual(self.deliver(), ["a"])
        self.write("..v2/a.yaml", manifest("a", host="two.example"))
        os.symlink("..v2", self.path("..data.tmp"))
        os.replace(self.path("..data.tmp"), self.path("..data"))
        self.assertIsNone(self.deliver())
        self.assertEqual(self.deliver(), ["a"])
        self.assertEqual(
            self.inventory.snapshot().records[("APIService", "a")].origin, self.path("a.yaml") + "#1"
        )
        self.assertEqual(
            self.inventory.snapshot().records[("APIService", "a")].current.endpoint.host, "two.example"
        )

    def test_symlinkLoop(self) -> None:
        self.write("sub/a.yaml", manifest("a"))
        os.symlink("..", self.path("sub/loop"))
        self.assertEqual(self.deliver(), ["a"])

    def test_stopInterruptsScan(self) -> None:
        self.write("a.yaml", manifest("a"))
        self.assertIsNone(self.scanner.scan(lambda: True))


class FileSourceTests(DirectoryMixin, TestCase):
    """The watcher thread on the real reactor; every wait is bounded."""

    timeout = 15

    def setUp(self) -> None:
        super().setUp()
        self.waiters: List[tuple] = []
        self.inventory = Inventory(self._changed)
        self.source = FileSource(self.dir, self.inventory, reactor, pollInterval=0.02)

    def _changed(self) -> None:
        for waiter in list(self.waiters):
            predicate, d = waiter
            if predicate():
                self.waiters.remove(waiter)
                d.callback(None)

    def waitFor(self, predicate: Callable[[], bool], timeout: float = 5.0) -> defer.Deferred:
        """Fires once C{predicate} holds after an inventory change; fails after C{timeout} seconds."""
        d: defer.Deferred = defer.Deferred()
        if predicate():
            d.callback(None)
            return d
        waiter = (predicate, d)
        self.waiters.append(waiter)

        def expire() -> None:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
                d.errback(AssertionError(f"no matching change within {timeout}s: {self.names()}"))

        call = reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def names(self) -> List[str]:
        return [r.meta.name for r in self.inventory.snapshot().resources]

    @defer.inlineCallbacks
    def test_watch(self):  # type: ignore[no-untyped-def]
        self.write("a.yaml", manifest("a"))
        self.source.startService()
        yield self.source.synced
        self.assertEqual(self.names(), ["a"])

        self.write("b.yaml", manifest("b"))
        yield self.waitFor(lambda: self.names() == ["a", "b"])

        os.rename(self.path("b.yaml"), self.path("c.yaml"))
        yield self.waitFor(
            lambda: self.inventory.snapshot().records[("APIService", "b")].origin.endswith("c.yaml#1")
        )

        self.write(
            "a.yaml",
            "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: APIService\nmetadata:\n  name: a\n  x: : y\n",
        )
        yield self.waitFor(lambda: bool(self.inventory.snapshot().sourceErrors))
        self.assertEqual(self.names(), ["a", "b"])  # a keeps serving
        self.assertEqual(self.inventory.snapshot().sourceErrors[0].line, 5)

        os.remove(self.path("a.yaml"))
        yield self.waitFor(lambda: self.names() == ["b"])

        thread = self.source._thread
        yield self.source.stopService()
        thread.join(1.0)  # the Deferred fires from the thread's last statement; it ends right after
        self.assertFalse(thread.is_alive())

    @defer.inlineCallbacks
    def test_notReadyUntilTheDirectoryCanBeRead(self):  # type: ignore[no-untyped-def]
        """A directory that does not exist (a typo, a volume not mounted yet) is not an empty configuration:
        readiness waits until it can be read."""
        missing = self.path("later")
        self.source = FileSource(missing, self.inventory, reactor, pollInterval=0.02)
        self.source.startService()
        self.addCleanup(self.source.stopService)
        yield self.waitFor(lambda: bool(self.inventory.snapshot().sourceErrors))
        self.assertIn("cannot read directory", self.inventory.snapshot().sourceErrors[0].message)
        self.assertFalse(self.source.synced.called)
        os.mkdir(missing)
        with open(os.path.join(missing, "a.yaml"), "w") as f:
            f.write(manifest("a"))
        yield self.source.synced
        yield self.waitFor(lambda: self.names() == ["a"])

    @defer.inlineCallbacks
    def test_stopBeforeFirstChange(self):  # type: ignore[no-untyped-def]
        before = threading.active_count()
        self.source.startService()
        yield self.source.synced
        self.assertEqual(self.inventory.snapshot().resources, ())
        thread = self.source._thread
        yield self.source.stopService()
        thread.join(1.0)
        self.assertEqual(threading.active_count(), before)
        # Stopped: later changes are not delivered (nothing runs to deliver them).
        self.assertFalse(self.source.running)

    def test_stopNeverStarted(self) -> None:
        self.assertIsNone(self.successResultOf(self.source.stopService()))
