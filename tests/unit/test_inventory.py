"""
Tests for L{ksproxy.sources.inventory}: last-good semantics (SPEC 1.5), held objects of files that fail to
load, duplicates, ConfigMap/Secret refs and parse caching.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List

from twisted.trial.unittest import SynchronousTestCase

from ksproxy.model.types import APIService, JSBundle
from ksproxy.sources.inventory import (
    Inventory,
    SourceDocument,
    SourceError,
    originPath,
    originSortKey,
)

API = "extensions.kubesphere.io/v1alpha1"


def apiService(name: str, host: str = "a.example", **meta: Any) -> Dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "APIService",
        "metadata": {"name": name, **meta},
        "spec": {"group": "demo.example.com", "version": "v1", "url": f"http://{host}:8080"},
    }


def badApiService(name: str, **meta: Any) -> Dict[str, Any]:
    raw = apiService(name, **meta)
    raw["spec"]["group"] = 42  # a wrong type is a rejection
    return raw


def jsBundle(name: str, cm: str = "bundle", key: str = "index.js") -> Dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "JSBundle",
        "metadata": {"name": name},
        "spec": {"rawFrom": {"configMapKeyRef": {"namespace": "ext", "name": cm, "key": key}}},
    }


def configMap(name: str, namespace: str = "ext", **sections: Any) -> Dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        **sections,
    }


def secret(name: str, namespace: str = "ext", **sections: Any) -> Dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        **sections,
    }


def docs(*pairs: Any) -> List[SourceDocument]:
    return [SourceDocument(origin, raw) for origin, raw in pairs]


class InventoryTestsMixin:
    def setUp(self) -> None:
        self.changes = 0

        def onChange() -> None:
            self.changes += 1

        self.inventory = Inventory(onChange)


class OriginTests(SynchronousTestCase):
    def test_originPath(self) -> None:
        self.assertEqual(originPath("dir/a.yaml#2"), "dir/a.yaml")
        self.assertEqual(originPath("dir/a#b.yaml#3.items[1]"), "dir/a#b.yaml")
        self.assertEqual(originPath("kubernetes"), "kubernetes")

    def test_sortKeyUsesNumbers(self) -> None:
        """Document 10 comes after document 9, and list items follow their document's order."""
        origins = ["a.yaml#10", "a.yaml#9", "a.yaml#2.items[10]", "a.yaml#2.items[2]", "0.yaml#5"]
        self.assertEqual(
            sorted(origins, key=originSortKey),
            ["0.yaml#5", "a.yaml#2.items[2]", "a.yaml#2.items[10]", "a.yaml#9", "a.yaml#10"],
        )


class ReplaceAllTests(InventoryTestsMixin, SynchronousTestCase):
    def test_loads(self) -> None:
        self.inventory.replaceAll(docs(("d/b.yaml#1", apiService("b")), ("d/a.yaml#1", apiService("a"))), [])
        snap = self.inventory.snapshot()
        self.assertEqual(self.changes, 1)
        self.assertEqual([r.meta.name for r in snap.resources], ["a", "b"])
        self.assertIsInstance(snap.resources[0], APIService)
        record = snap.records[("APIService", "a")]
        self.assertEqual((record.origin, record.stale, record.rejection), ("d/a.yaml#1", False, None))

    def test_unchangedInputIsNotAChange(self) -> None:
        """The same input again: no onChange, no parse, the same snapshot object."""
        batch = docs(("d/a.yaml#1", apiService("a")), ("d/a.yaml#2", apiService("b")))
        self.inventory.replaceAll(batch, [])
        first = self.inventory.snapshot()
        parses = self.inventory.parseCount
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a")), ("d/a.yaml#2", apiService("b"))), [])
        self.assertEqual((self.changes, self.inventory.parseCount), (1, parses))
        self.assertIs(self.inventory.snapshot(), first)

    def test_parseCacheOnlyParsesWhatChanged(self) -> None:
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a")), ("d/a.yaml#2", apiService("b"))), [])
        self.assertEqual(self.inventory.parseCount, 2)
        self.inventory.replaceAll(
            docs(("d/a.yaml#1", apiService("a")), ("d/a.yaml#2", apiService("b", host="b.example"))), []
        )
        self.assertEqual(self.inventory.parseCount, 3)
        self.assertEqual(
            self.inventory.snapshot().records[("APIService", "b")].current.endpoint.host, "b.example"
        )

    def test_renameKeepsModelWithoutReparse(self) -> None:
        """A file renamed: same content, new origin, no parse."""
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a"))), [])
        model = self.inventory.snapshot().resources[0]
        self.inventory.replaceAll(docs(("d/renamed.yaml#1", apiService("a"))), [])
        snap = self.inventory.snapshot()
        self.assertEqual(self.inventory.parseCount, 1)
        self.assertIs(snap.resources[0], model)
        self.assertEqual(snap.records[("APIService", "a")].origin, "d/renamed.yaml#1")
        self.assertEqual(self.changes, 2)

    def test_invalidUpdateKeepsLastGood(self) -> None:
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a")), ("d/b.yaml#1", apiService("b"))), [])
        good = self.inventory.snapshot().records[("APIService", "a")].current
        self.inventory.replaceAll(
            docs(("d/a.yaml#1", badApiService("a")), ("d/b.yaml#1", apiService("b"))), []
        )
        snap = self.inventory.snapshot()
        record = snap.records[("APIService", "a")]
        self.assertIs(record.current, good)
        self.assertTrue(record.stale)
        self.assertEqual((record.rejection.kind, record.rejection.name), ("APIService", "a"))
        self.assertIn("spec.group", record.rejection.field)
        self.assertEqual([r.meta.name for r in snap.resources], ["a", "b"])
        self.assertEqual(snap.rejections, (record.rejection,))
        # The other object is untouched.
        self.assertFalse(snap.records[("APIService", "b")].stale)

    def test_fixedAfterInvalidIsServedFresh(self) -> None:
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a"))), [])
        self.inventory.replaceAll(docs(("d/a.yaml#1", badApiService("a"))), [])
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a", host="new.example"))), [])
        record = self.inventory.snapshot().records[("APIService", "a")]
        self.assertEqual((record.stale, record.rejection), (False, None))
        self.assertEqual(record.current.endpoint.host, "new.example")

    def test_warningsAndNotesKept(self) -> None:
        raw = apiService("a")
        raw["metadata"]["namespace"] = "ignored"  # cluster-scoped: a warning
        raw["spec"]["colour"] = "blue"  # unknown field: a debug note
        self.inventory.replaceAll(docs(("d/a.yaml#1", raw)), [])
        record = self.inventory.snapshot().records[("APIService", "a")]
        self.assertTrue(any("namespace" in w for w in record.warnings), record.warnings)
        self.assertTrue(any("colour" in n for n in record.notes), record.notes)

    def test_rejectedWithoutLastGood(self) -> None:
        self.inventory.replaceAll(docs(("d/a.yaml#1", badApiService("a"))), [])
        snap = self.inventory.snapshot()
        record = snap.records[("APIService", "a")]
        self.assertEqual((record.current, record.stale), (None, False))
        self.assertIsNotNone(record.rejection)
        self.assertEqual(snap.resources, ())

    def test_deleteForgetsLastGood(self) -> None:
        """A removed document removes the object; coming back invalid, it has nothing to fall back on."""
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a"))), [])
        self.inventory.replaceAll([], [])
        self.assertEqual(self.inventory.snapshot().records, {})
        self.inventory.replaceAll(docs(("d/a.yaml#1", badApiService("a"))), [])
        self.assertIsNone(self.inventory.snapshot().records[("APIService", "a")].current)

    def test_fileErrorHoldsItsObjects(self) -> None:
        """A file that fails to load keeps every object it held, even those it no longer lists."""
        self.inventory.replaceAll(
            docs(
                ("d/a.yaml#1", apiService("a1")),
                ("d/a.yaml#2", apiService("a2")),
                ("d/a.yaml#3", configMap("cm", data={"k": "v"})),
                ("d/b.yaml#1", apiService("b")),
            ),
            [],
        )
        error = SourceError("d/a.yaml", "d/a.yaml:3: mapping values are not allowed here", 3)
        self.inventory.replaceAll(docs(("d/b.yaml#1", apiService("b"))), [error])
        snap = self.inventory.snapshot()
        self.assertEqual([r.meta.name for r in snap.resources], ["a1", "a2", "b"])
        self.assertTrue(snap.records[("APIService", "a1")].stale)
        self.assertFalse(snap.records[("APIService", "b")].stale)
        self.assertEqual(snap.refs[("ConfigMap", "ext", "cm")], {"k": b"v"})
        self.assertEqual(snap.sourceErrors, (error,))
        # Fixed: the file now holds only a1; a2 goes.
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a1")), ("d/b.yaml#1", apiService("b"))), [])
        snap = self.inventory.snapshot()
        self.assertEqual([r.meta.name for r in snap.resources], ["a1", "b"])
        self.assertFalse(snap.records[("APIService", "a1")].stale)
        self.assertEqual((snap.sourceErrors, dict(snap.refs)), ((), {}))

    def test_fileErrorDoesNotHoldOtherFiles(self) -> None:
        """Only the failing file is held: "d/a.yaml" failing does not hold "d/a.yaml.d/x.yaml" or "d/b.yaml"."""
        self.inventory.replaceAll(
            docs(
                ("d/a.yaml#1", apiService("a")),
                ("d/a.yaml.d/x.yaml#1", apiService("x")),
                ("d/b.yaml#1", apiService("b")),
            ),
            [],
        )
        self.inventory.replaceAll([], [SourceError("d/a.yaml", "d/a.yaml: bad")])
        self.assertEqual([r.meta.name for r in self.inventory.snapshot().resources], ["a"])

    def test_directoryErrorHoldsEverythingUnderIt(self) -> None:
        self.inventory.replaceAll(
            docs(("d/sub/a.yaml#1", apiService("a")), ("d/b.yaml#1", apiService("b"))), []
        )
        self.inventory.replaceAll(
            [], [SourceError("d/sub", "d/sub: cannot read directory: Permission denied")]
        )
        self.assertEqual([r.meta.name for r in self.inventory.snapshot().resources], ["a"])

    def test_movedObjectWinsOverHeldCopy(self) -> None:
        """An object moved out of a file that then fails: the new document is the latest input."""
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a"))), [])
        self.inventory.replaceAll(
            docs(("d/b.yaml#1", apiService("a", host="moved.example"))),
            [SourceError("d/a.yaml", "d/a.yaml: bad")],
        )
        record = self.inventory.snapshot().records[("APIService", "a")]
        self.assertEqual((record.origin, record.stale), ("d/b.yaml#1", False))
        self.assertEqual(record.current.endpoint.host, "moved.example")

    def test_duplicatesFirstByPathWins(self) -> None:
        self.inventory.replaceAll(
            docs(
                ("d/b.yaml#1", apiService("x", host="b.example")),
                ("d/a.yaml#2", apiService("x", host="a2.example")),
                ("d/a.yaml#10", apiService("y", host="a10.example")),
                ("d/a.yaml#9", apiService("y", host="a9.example")),
            ),
            [],
        )
        snap = self.inventory.snapshot()
        self.assertEqual(snap.records[("APIService", "x")].current.endpoint.host, "a2.example")
        self.assertEqual(snap.records[("APIService", "y")].current.endpoint.host, "a9.example")
        self.assertEqual(len(snap.duplicates), 2)
        # Reported in input precedence order: d/a.yaml#10 before d/b.yaml#1.
        self.assertIn("APIService y", snap.duplicates[0])
        self.assertIn("d/a.yaml#10", snap.duplicates[0])
        self.assertIn("APIService x", snap.duplicates[1])
        self.assertIn("defined again in d/b.yaml#1", snap.duplicates[1])
        self.assertIn("first definition in d/a.yaml#2", snap.duplicates[1])

    def test_duplicateFirstWinsEvenWhenInvalid(self) -> None:
        self.inventory.replaceAll(
            docs(("d/a.yaml#1", badApiService("x")), ("d/b.yaml#1", apiService("x"))), []
        )
        snap = self.inventory.snapshot()
        self.assertIsNotNone(snap.records[("APIService", "x")].rejection)
        self.assertEqual(snap.records[("APIService", "x")].origin, "d/a.yaml#1")
        self.assertEqual(len(snap.duplicates), 1)

    def test_skippedAndUnnamed(self) -> None:
        other = apiService("legacy")
        other["apiVersion"] = "kubesphere.io/v1alpha1"
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}
        unnamed = apiService("x")
        del unnamed["metadata"]["name"]
        self.inventory.replaceAll(
            docs(
                ("d/a.yaml#1", other),
                ("d/a.yaml#2", deployment),
                ("d/a.yaml#3", unnamed),
                ("d/a.yaml#4", apiService("ok")),
            ),
            [],
        )
        snap = self.inventory.snapshot()
        self.assertEqual(list(snap.records), [("APIService", "ok")])
        self.assertEqual(len(snap.skipped), 2)
        self.assertTrue(snap.skipped[0].startswith("d/a.yaml#1: "))
        self.assertIn("kubesphere.io/v1alpha1", snap.skipped[0])
        self.assertEqual([e.origin for e in snap.sourceErrors], ["d/a.yaml#3"])
        self.assertIn("metadata", snap.sourceErrors[0].message)

    def test_refs(self) -> None:
        self.inventory.replaceAll(
            docs(
                (
                    "d/a.yaml#1",
                    configMap(
                        "cm",
                        data={"a.js": "x()"},
                        binaryData={"b.bin": base64.b64encode(b"\x00\x01").decode()},
                    ),
                ),
                (
                    "d/a.yaml#2",
                    secret(
                        "s",
                        data={"k": base64.b64encode(b"secret").decode(), "o": "b2xk"},
                        stringData={"o": "new"},
                    ),
                ),
                ("d/a.yaml#3", configMap("plain", namespace=None, data={"k": "v"})),
            ),
            [],
        )
        refs = self.inventory.snapshot().refs
        self.assertEqual(refs[("ConfigMap", "ext", "cm")], {"a.js": b"x()", "b.bin": b"\x00\x01"})
        self.assertEqual(refs[("Secret", "ext", "s")], {"k": b"secret", "o": b"new"})
        self.assertEqual(refs[("ConfigMap", "default", "plain")], {"k": b"v"})
        self.assertEqual(self.inventory.snapshot().refErrors, ())

    def test_refUpdateIsAChange(self) -> None:
        self.inventory.replaceAll(
            docs(("d/a.yaml#1", jsBundle("b")), ("d/a.yaml#2", configMap("bundle", data={"index.js": "1"}))),
            [],
        )
        self.inventory.replaceAll(
            docs(("d/a.yaml#1", jsBundle("b")), ("d/a.yaml#2", configMap("bundle", data={"index.js": "2"}))),
            [],
        )
        snap = self.inventory.snapshot()
        self.assertEqual(self.changes, 2)
        self.assertEqual(snap.refs[("ConfigMap", "ext", "bundle")], {"index.js": b"2"})
        self.assertIsInstance(snap.resources[0], JSBundle)
        self.assertEqual(self.inventory.parseCount, 1)  # the bundle itself did not change

    def test_badRefEntriesReported(self) -> None:
        self.inventory.replaceAll(
            docs(
                ("d/a.yaml#1", secret("s", data={"good": "eA==", "bad": "%%%"})),
                ("d/a.yaml#2", configMap("c", data={"n": 5}, binaryData="nope")),
            ),
            [],
        )
        snap = self.inventory.snapshot()
        self.assertEqual(snap.refs[("Secret", "ext", "s")], {"good": b"x"})
        self.assertEqual(snap.refs[("ConfigMap", "ext", "c")], {})
        self.assertEqual(len(snap.refErrors), 3)
        self.assertTrue(any("Secret ext/s" in e and "data.bad" in e for e in snap.refErrors))

    def test_wrappedBase64Accepted(self) -> None:
        value = base64.b64encode(b"a" * 100).decode()
        wrapped = value[:40] + "\n" + value[40:]
        self.inventory.replaceAll(docs(("d/a.yaml#1", secret("s", data={"k": wrapped}))), [])
        self.assertEqual(self.inventory.snapshot().refs[("Secret", "ext", "s")], {"k": b"a" * 100})

    def test_duplicateRefs(self) -> None:
        self.inventory.replaceAll(
            docs(
                ("d/b.yaml#1", configMap("cm", data={"k": "b"})),
                ("d/a.yaml#1", configMap("cm", data={"k": "a"})),
            ),
            [],
        )
        snap = self.inventory.snapshot()
        self.assertEqual(snap.refs[("ConfigMap", "ext", "cm")], {"k": b"a"})
        self.assertEqual(len(snap.duplicates), 1)
        self.assertIn("ConfigMap ext/cm", snap.duplicates[0])


class WatchTests(InventoryTestsMixin, SynchronousTestCase):
    """upsert/delete, as a Kubernetes watch drives them."""

    def test_upsertAndDelete(self) -> None:
        self.inventory.upsert(apiService("a", uid="u1", resourceVersion="1"))
        self.assertEqual([r.meta.name for r in self.inventory.snapshot().resources], ["a"])
        self.assertEqual(self.inventory.snapshot().records[("APIService", "a")].origin, "kubernetes")
        self.inventory.delete("APIService", "a")
        self.assertEqual(self.inventory.snapshot().resources, ())
        self.assertEqual(self.changes, 2)
        self.inventory.delete("APIService", "a")
        self.assertEqual(self.changes, 2)

    def test_sameResourceVersionIsNotReparsed(self) -> None:
        self.inventory.upsert(apiService("a", uid="u1", resourceVersion="7"))
        self.inventory.upsert(apiService("a", uid="u1", resourceVersion="7"))
        self.assertEqual((self.inventory.parseCount, self.changes), (1, 1))
        self.inventory.upsert(apiService("a", host="b.example", uid="u1", resourceVersion="8"))
        self.assertEqual((self.inventory.parseCount, self.changes), (2, 2))

    def test_withoutResourceVersionContentIsTheKey(self) -> None:
        """Objects without uid/resourceVersion are cached by content."""
        self.inventory.upsert(apiService("a"))
        self.inventory.upsert(apiService("a"))
        self.assertEqual((self.inventory.parseCount, self.changes), (1, 1))
        self.inventory.upsert(apiService("a", host="c.example"))
        self.assertEqual((self.inventory.parseCount, self.changes), (2, 2))

    def test_invalidUpdateKeepsLastGood(self) -> None:
        self.inventory.upsert(apiService("a", uid="u", resourceVersion="1"))
        self.inventory.upsert(badApiService("a", uid="u", resourceVersion="2"))
        record = self.inventory.snapshot().records[("APIService", "a")]
        self.assertTrue(record.stale)
        self.assertEqual(record.current.meta.resourceVersion, "1")
        self.assertIsNotNone(record.rejection)
        self.inventory.delete("APIService", "a")
        self.inventory.upsert(badApiService("a", uid="u2", resourceVersion="3"))
        self.assertIsNone(self.inventory.snapshot().records[("APIService", "a")].current)

    def test_becomingNotOursRemoves(self) -> None:
        self.inventory.upsert(apiService("a", uid="u", resourceVersion="1"))
        other = apiService("a", uid="u", resourceVersion="2")
        other["apiVersion"] = "extensions.kubesphere.io/v1alpha2"
        self.inventory.upsert(other)
        snap = self.inventory.snapshot()
        self.assertEqual(snap.records, {})
        self.assertEqual(len(snap.skipped), 1)
        self.assertIn("v1alpha2", snap.skipped[0])
        self.inventory.upsert(apiService("a", uid="u", resourceVersion="3"))
        snap = self.inventory.snapshot()
        self.assertEqual((len(snap.resources), snap.skipped), (1, ()))

    def test_refs(self) -> None:
        self.inventory.upsert(
            configMap(
                "cm",
                data={"k": "1"},
            )
        )
        self.inventory.upsert(secret("s", stringData={"k": "2"}))
        refs = self.inventory.snapshot().refs
        self.assertEqual(
            (refs[("ConfigMap", "ext", "cm")], refs[("Secret", "ext", "s")]), ({"k": b"1"}, {"k": b"2"})
        )
        self.inventory.upsert(configMap("cm", data={"k": "1"}))
        self.assertEqual(self.changes, 2)  # identical content: no change
        self.inventory.delete("ConfigMap", "cm", "ext")
        self.assertNotIn(("ConfigMap", "ext", "cm"), self.inventory.snapshot().refs)
        self.assertEqual(self.changes, 3)

    def test_snapshotIsImmutableView(self) -> None:
        self.inventory.upsert(apiService("a"))
        snap = self.inventory.snapshot()
        self.inventory.upsert(apiService("b"))
        self.assertEqual(list(snap.records), [("APIService", "a")])
        self.assertEqual(len(self.inventory.snapshot().records), 2)
        with self.assertRaises(TypeError):
            snap.records[("APIService", "c")] = None  # type: ignore[index]


class ReplaceKindTests(SynchronousTestCase):
    """A relist replaces one kind in one change, forgetting objects deleted during a watch gap."""

    def _rp(self, name: str) -> dict:
        return {
            "apiVersion": "extensions.kubesphere.io/v1alpha1",
            "kind": "ReverseProxy",
            "metadata": {"name": name},
            "spec": {"matcher": {"path": f"/{name}/*", "method": "*"}, "upstream": {"url": "http://u"}},
        }

    def test_relistForgetsMissingAndNotifiesOnce(self) -> None:
        calls = []
        inv = Inventory(onChange=lambda: calls.append(1))
        inv.upsert(self._rp("a"))
        inv.upsert(self._rp("b"))
        inv.upsert({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "n", "name": "cm"}, "data": {}})
        calls.clear()
        inv.replaceKind("ReverseProxy", [self._rp("b"), self._rp("c")])
        self.assertEqual(calls, [1])
        names = sorted(r.meta.name for r in inv.snapshot().resources)
        self.assertEqual(names, ["b", "c"])
        self.assertIn(("ConfigMap", "n", "cm"), inv.snapshot().refs)

    def test_relistUnchangedIsSilent(self) -> None:
        calls = []
        inv = Inventory(onChange=lambda: calls.append(1))
        inv.replaceKind("ReverseProxy", [self._rp("a")])
        calls.clear()
        inv.replaceKind("ReverseProxy", [self._rp("a")])
        self.assertEqual(calls, [])

    def test_relistRefs(self) -> None:
        inv = Inventory(onChange=lambda: None)
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "n", "name": "cm"}, "data": {"k": "v"}}
        inv.upsert(cm)
        inv.replaceKind("ConfigMap", [])
        self.assertNotIn(("ConfigMap", "n", "cm"), inv.snapshot().refs)


class TruncatedFileTests(SynchronousTestCase):
    """A file cut short mid-save can still be valid YAML; a document left without its name holds the file."""

    def test_namelessDocumentHoldsTheFile(self) -> None:
        inv = Inventory(onChange=lambda: None)
        good = {
            "apiVersion": "extensions.kubesphere.io/v1alpha1",
            "kind": "ReverseProxy",
            "metadata": {"name": "demo"},
            "spec": {"matcher": {"path": "/d/*"}, "upstream": {"url": "http://u"}},
        }
        inv.replaceAll([SourceDocument("/m/rp.yaml#1", good)], [])
        truncated = {"apiVersion": "extensions.kubesphere.io/v1alpha1", "kind": "ReverseProxy"}
        inv.replaceAll([SourceDocument("/m/rp.yaml#1", truncated)], [])
        snap = inv.snapshot()
        self.assertEqual([r.meta.name for r in snap.resources], ["demo"])
        self.assertTrue(snap.records[("ReverseProxy", "demo")].stale)
        self.assertTrue(snap.sourceErrors)
