"""
Tests for L{ksproxy.sources.inventory.Inventory.plan} and L{Inventory.commit}: the work of a replaceAll done
elsewhere (a source's thread) and installed in constant time, with the same last-good semantics.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.trial.unittest import SynchronousTestCase

from ksproxy.sources.inventory import Inventory, SourceDocument, SourceError, contentKey

API = "extensions.kubesphere.io/v1alpha1"


def apiService(name: str, host: str = "a.example") -> Dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "APIService",
        "metadata": {"name": name},
        "spec": {"group": "demo.example.com", "version": "v1", "url": f"http://{host}:8080"},
    }


def docs(*pairs: Any) -> List[SourceDocument]:
    return [SourceDocument(origin, raw) for origin, raw in pairs]


class PlanCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.changes = 0
        self.inventory = Inventory(onChange=self.changed)

    def changed(self) -> None:
        self.changes += 1

    def names(self) -> List[str]:
        return [r.meta.name for r in self.inventory.snapshot().resources]

    def test_planChangesNothingUntilCommitted(self) -> None:
        plan = self.inventory.plan(docs(("d/a.yaml#1", apiService("a"))), [], withSnapshot=True)
        self.assertEqual((self.names(), self.changes), ([], 0))
        self.assertTrue(plan.changed)
        self.assertTrue(self.inventory.commit(plan))
        self.assertEqual((self.names(), self.changes), (["a"], 1))
        # The snapshot made with the plan is the one handed out.
        self.assertIs(self.inventory.snapshot(), plan.snapshot)

    def test_planWithSnapshotEqualsSnapshot(self) -> None:
        batch = docs(("d/b.yaml#1", apiService("b")), ("d/a.yaml#1", apiService("a")), ("d/a.yaml#2", apiService("a")))
        plan = self.inventory.plan(batch, [SourceError("d/c.yaml", "d/c.yaml: bad")], withSnapshot=True)
        other = Inventory(lambda: None)
        other.replaceAll(batch, [SourceError("d/c.yaml", "d/c.yaml: bad")])
        mine, theirs = plan.snapshot, other.snapshot()
        self.assertEqual(dict(mine.records), dict(theirs.records))
        self.assertEqual(
            (mine.resources, mine.duplicates, mine.sourceErrors),
            (theirs.resources, theirs.duplicates, theirs.sourceErrors),
        )

    def test_unchangedPlanNotifiesNothing(self) -> None:
        batch = docs(("d/a.yaml#1", apiService("a")))
        self.inventory.replaceAll(batch, [])
        plan = self.inventory.plan(batch, [], withSnapshot=True)
        self.assertFalse(plan.changed)
        self.assertIsNone(plan.snapshot)
        self.assertTrue(self.inventory.commit(plan))
        self.assertEqual(self.changes, 1)

    def test_staleRefused(self) -> None:
        """A plan made before another change is refused, and changes nothing."""
        plan = self.inventory.plan(docs(("d/a.yaml#1", apiService("a"))), [])
        self.inventory.upsert(apiService("k"))
        self.assertFalse(self.inventory.commit(plan))
        self.assertEqual(self.names(), ["k"])
        # Planned again from the current state, it goes in (and the object from the other source is replaced,
        # as replaceAll would do).
        self.assertTrue(self.inventory.commit(self.inventory.plan(docs(("d/a.yaml#1", apiService("a"))), [])))
        self.assertEqual(self.names(), ["a"])

    def test_upsertOfSameContentStillBumpsVersion(self) -> None:
        """Even a change that notifies nobody (a new cache key for the same object) makes older plans stale."""
        raw = apiService("k")
        self.inventory.upsert(raw)
        plan = self.inventory.plan([], [])
        reordered = {key: raw[key] for key in reversed(list(raw))}  # another content key, the same object
        self.inventory.upsert(reordered)
        self.assertEqual(self.changes, 1)
        self.assertFalse(self.inventory.commit(plan))

    def test_lastGoodAndHeldThroughPlans(self) -> None:
        """The SPEC 1.5 rules hold when every change goes through plan and commit."""
        def apply(*args: Any) -> None:
            self.assertTrue(self.inventory.commit(self.inventory.plan(*args, withSnapshot=True)))

        apply(docs(("d/a.yaml#1", apiService("a")), ("d/b.yaml#1", apiService("b"))), [])
        bad = apiService("a")
        bad["spec"]["group"] = 42
        apply(docs(("d/a.yaml#1", bad), ("d/b.yaml#1", apiService("b"))), [])
        record = self.inventory.snapshot().records[("APIService", "a")]
        self.assertTrue(record.stale)
        self.assertIsNotNone(record.rejection)
        self.assertEqual(record.current.endpoint.host, "a.example")
        # b's file fails to load: b keeps serving, held.
        apply(docs(("d/a.yaml#1", apiService("a", "new.example"))), [SourceError("d/b.yaml", "d/b.yaml: bad")])
        snap = self.inventory.snapshot()
        self.assertEqual([r.meta.name for r in snap.resources], ["a", "b"])
        self.assertTrue(snap.records[("APIService", "b")].stale)
        self.assertEqual(snap.records[("APIService", "a")].current.endpoint.host, "new.example")

    def test_keysGiven(self) -> None:
        """Content keys handed in are used as they are (the file source computes them while parsing)."""
        batch = docs(("d/a.yaml#1", apiService("a")), ("d/b.yaml#1", apiService("b")))
        keys = [contentKey(d.raw) for d in batch]
        self.inventory.commit(self.inventory.plan(batch, [], keys=keys))
        parses = self.inventory.parseCount
        self.inventory.commit(self.inventory.plan(list(reversed(batch)), [], keys=list(reversed(keys))))
        self.assertEqual(self.inventory.parseCount, parses)  # found in the cache under the same keys
        self.assertEqual(self.names(), ["a", "b"])

    def test_planHoldsWhatItReplaces(self) -> None:
        """So that the thread that drops the plan frees the old state (not the reactor)."""
        self.inventory.replaceAll(docs(("d/a.yaml#1", apiService("a"))), [])
        old = self.inventory.snapshot()
        plan = self.inventory.plan([], [])
        self.assertIs(plan.replaced[2], old)
