"""
Tests for L{ksproxy.status} (pure status lifecycle), L{ksproxy.status_writer} (token bucket, write loop) and
L{ksproxy.lease} (Lease election), all on a L{task.Clock} with in-memory fakes: no threads, no sockets.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.lease import LeaseElector
from ksproxy.model.types import Rejection
from ksproxy.status import (
    Condition,
    desiredStatus,
    needsGenerationRefresh,
    rfc3339,
    specHash,
    statusIsCurrent,
    statusPatch,
)
from ksproxy.status_writer import StatusInput, StatusWriter, TokenBucket

T0 = "2024-01-01T00:00:00Z"
T1 = "2024-01-01T00:05:00Z"


def bundle(generation: int = 1, status: Optional[Dict[str, Any]] = None, **spec: Any) -> Dict[str, Any]:
    raw: Dict[str, Any] = {
        "apiVersion": "extensions.kubesphere.io/v1alpha1",
        "kind": "JSBundle",
        "metadata": {"name": "b", "generation": generation, "resourceVersion": "10"},
        "spec": spec or {"raw": "YQ=="},
    }
    if status is not None:
        raw["status"] = status
    return raw


def inputs(**overrides: Any) -> Dict[str, Any]:
    args: Dict[str, Any] = dict(
        accepted=None, conflict=None, refsError=None, programmed=True, upstreamHealthy=None,
        defaultedLink=None, manageState=False,
    )
    args.update(overrides)
    return args


def byType(status: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


class DesiredStatusTests(SynchronousTestCase):
    def test_happyPath(self) -> None:
        """An accepted, served object: four conditions at the generation read, no link/state of ours."""
        desired = desiredStatus(bundle(generation=7), **inputs(upstreamHealthy=True))
        conds = byType(desired)
        self.assertEqual(list(conds), ["Accepted", "ResolvedRefs", "Programmed", "UpstreamHealthy"])
        self.assertEqual(
            [(c["status"], c["reason"]) for c in conds.values()],
            [("True", "Accepted"), ("True", "ResolvedRefs"), ("True", "Programmed"), ("True", "Healthy")],
        )
        self.assertEqual({c["observedGeneration"] for c in conds.values()}, {7})
        self.assertNotIn("link", desired)
        self.assertNotIn("state", desired)

    def test_table(self) -> None:
        """Reasons for each input combination (condition type -> (status, reason))."""
        rejection = Rejection("JSBundle", "b", "spec.raw", "not base64")
        cases: List[Tuple[Dict[str, Any], Optional[Dict[str, Any]], Dict[str, Tuple[str, str]]]] = [
            (inputs(accepted=rejection, programmed=False), None,
             {"Accepted": ("False", "Invalid"), "ResolvedRefs": ("Unknown", "NotAccepted"),
              "Programmed": ("False", "Invalid")}),
            (inputs(accepted=rejection, programmed=True), None,
             {"Accepted": ("False", "Invalid"), "Programmed": ("True", "LastAcceptedVersion")}),
            (inputs(conflict="ReverseProxy/a", programmed=False), None,
             {"Accepted": ("False", "Conflict"), "Programmed": ("False", "Conflict")}),
            (inputs(conflict="ReverseProxy/a", programmed=True), None,
             {"Accepted": ("False", "Conflict"), "Programmed": ("True", "PartiallyProgrammed")}),
            (inputs(refsError="ConfigMap ns/cm not found", programmed=False), None,
             {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("False", "RefNotResolved"),
              "Programmed": ("False", "RefNotResolved")}),
            (inputs(programmed=False), {"state": "Disabled"}, {"Programmed": ("False", "Disabled")}),
            (inputs(programmed=False), {"enabled": False}, {"Programmed": ("False", "Disabled")}),
            (inputs(programmed=False, stateGate=True), {"state": "Availablea"},
             {"Programmed": ("False", "StateGate")}),
            (inputs(programmed=False), None, {"Programmed": ("False", "Pending")}),
            (inputs(upstreamHealthy=False), None, {"UpstreamHealthy": ("False", "Unhealthy")}),
            (inputs(upstreamHealthy=None), None, {"UpstreamHealthy": ("Unknown", "NotChecked")}),
        ]
        for args, status, expected in cases:
            conds = byType(desiredStatus(bundle(status=status), **args))
            got = {k: (conds[k]["status"], conds[k]["reason"]) for k in expected}
            self.assertEqual(got, expected, (args, status))

    def test_messagesName(self) -> None:
        """The rejection (kind, name, field) and the conflict winner appear in the messages."""
        rejection = Rejection("JSBundle", "b", "spec.raw", "not base64")
        conds = byType(desiredStatus(bundle(), **inputs(accepted=rejection)))
        self.assertEqual(conds["Accepted"]["message"], "JSBundle/b: spec.raw: not base64")
        conds = byType(desiredStatus(bundle(), **inputs(conflict="ReverseProxy/winner")))
        self.assertIn("ReverseProxy/winner", conds["Accepted"]["message"])

    def test_reasonsAreCamelCase(self) -> None:
        """Every reason matches metav1.Condition's pattern (the CRD schema enforces it)."""
        import re

        pattern = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
        rejection = Rejection("JSBundle", "b", "", "bad")
        for args in [inputs(), inputs(accepted=rejection, programmed=False), inputs(conflict="x", programmed=False),
                     inputs(refsError="x", programmed=False), inputs(programmed=False, stateGate=True),
                     inputs(upstreamHealthy=False), inputs(upstreamHealthy=True)]:
            for c in desiredStatus(bundle(), **args)["conditions"]:
                self.assertRegex(c["reason"], pattern)

    def test_link(self) -> None:
        """The defaulted link is wanted only when the manifest has none (missing or empty)."""
        self.assertEqual(desiredStatus(bundle(), **inputs(defaultedLink="/dist/b/index.js"))["link"],
                         "/dist/b/index.js")
        self.assertEqual(
            desiredStatus(bundle(status={"link": ""}), **inputs(defaultedLink="/dist/b/index.js"))["link"],
            "/dist/b/index.js",
        )
        self.assertNotIn("link", desiredStatus(bundle(status={"link": "/mine.js"}),
                                               **inputs(defaultedLink="/dist/b/index.js")))
        self.assertNotIn("link", desiredStatus(bundle(), **inputs(defaultedLink=None)))

    def test_state(self) -> None:
        """State only with manageState; Available when programmed, else Unavailable; never over Disabled."""
        self.assertNotIn("state", desiredStatus(bundle(), **inputs(manageState=False)))
        self.assertEqual(desiredStatus(bundle(), **inputs(manageState=True))["state"], "Available")
        self.assertEqual(desiredStatus(bundle(status={"state": "Available"}),
                                       **inputs(manageState=True, programmed=False))["state"], "Unavailable")
        for status in ({"state": "Disabled"}, {"enabled": False}):
            self.assertNotIn("state", desiredStatus(bundle(status=status), **inputs(manageState=True)))
        # A typo is not Disabled: with manageState we own the field and correct it.
        self.assertEqual(desiredStatus(bundle(status={"state": "Availablea"}), **inputs(manageState=True))["state"],
                         "Available")

    def test_generationMissing(self) -> None:
        """A manifest read from a file has no generation: observedGeneration is 0, never garbage."""
        raw = bundle()
        del raw["metadata"]["generation"]
        self.assertEqual({c["observedGeneration"] for c in desiredStatus(raw, **inputs())["conditions"]}, {0})
        raw["metadata"]["generation"] = "3"
        self.assertEqual({c["observedGeneration"] for c in desiredStatus(raw, **inputs())["conditions"]}, {0})

    def test_messageTruncated(self) -> None:
        self.assertEqual(len(Condition("A", "True", "R", "x" * 40000, 1).toDict()["message"]), 32768)


def written(raw: Dict[str, Any], patch: Optional[Dict[str, Any]], bumps: bool = True) -> Dict[str, Any]:
    """What the API server stores after a merge patch of status (no status subresource: generation + 1)."""
    new = copy.deepcopy(raw)
    if patch:
        new.setdefault("status", {}).update(patch["status"])
        if bumps:
            new["metadata"]["generation"] += 1
    return new


class StatusPatchTests(SynchronousTestCase):
    def test_firstWrite(self) -> None:
        """No status yet: everything is written, each condition with lastTransitionTime = now."""
        raw = bundle()
        patch = statusPatch(raw, desiredStatus(raw, **inputs(defaultedLink="/dist/b/index.js")), T0)
        assert patch is not None
        self.assertEqual(list(patch), ["status"])
        self.assertEqual(patch["status"]["link"], "/dist/b/index.js")
        self.assertEqual(len(patch["status"]["conditions"]), 4)
        self.assertEqual({c["lastTransitionTime"] for c in patch["status"]["conditions"]}, {T0})

    def test_idempotent(self) -> None:
        """Applying the patch and asking again gives None: nothing changed."""
        raw = bundle()
        desired = desiredStatus(raw, **inputs())
        after = written(raw, statusPatch(raw, desired, T0))
        self.assertIsNone(statusPatch(after, desiredStatus(after, **inputs()), T1))

    def test_ownWriteNotAnsweredOnGenerationBump(self) -> None:
        """
        Our write bumped the generation, so the desired observedGeneration differs by one from what we wrote;
        that alone (without refreshGeneration) is no reason to write again.
        """
        raw = bundle(generation=4)
        after = written(raw, statusPatch(raw, desiredStatus(raw, **inputs()), T0))
        self.assertEqual(after["metadata"]["generation"], 5)
        desired = desiredStatus(after, **inputs())
        self.assertEqual(desired["conditions"][0]["observedGeneration"], 5)
        self.assertIsNone(statusPatch(after, desired, T1))
        self.assertIsNotNone(statusPatch(after, desired, T1, refreshGeneration=True))

    def test_transitionTimeKeptWhenStatusSame(self) -> None:
        """A changed message keeps lastTransitionTime; a changed status moves it to now."""
        raw = bundle()
        after = written(raw, statusPatch(raw, desiredStatus(raw, **inputs()), T0))
        patch = statusPatch(after, desiredStatus(after, **inputs(conflict="ReverseProxy/a", programmed=True)), T1)
        assert patch is not None
        conds = byType(patch["status"])
        self.assertEqual(conds["Accepted"]["lastTransitionTime"], T1)  # True -> False
        self.assertEqual(conds["Programmed"]["lastTransitionTime"], T0)  # True (reason changed only)
        self.assertEqual(conds["Programmed"]["reason"], "PartiallyProgrammed")
        self.assertEqual(conds["ResolvedRefs"]["lastTransitionTime"], T0)

    def test_foreignConditionsKept(self) -> None:
        """Other writers' condition types survive the (whole-list) merge patch, in place."""
        foreign = {"type": "Installed", "status": "True", "reason": "Done", "message": "",
                   "lastTransitionTime": T0}
        raw = bundle(status={"conditions": [foreign]})
        patch = statusPatch(raw, desiredStatus(raw, **inputs()), T1)
        assert patch is not None
        self.assertEqual(patch["status"]["conditions"][0], foreign)
        self.assertEqual([c["type"] for c in patch["status"]["conditions"]],
                         ["Installed", "Accepted", "ResolvedRefs", "Programmed", "UpstreamHealthy"])

    def test_duplicatesRemoved(self) -> None:
        raw = bundle()
        after = written(raw, statusPatch(raw, desiredStatus(raw, **inputs()), T0))
        after["status"]["conditions"].append(dict(after["status"]["conditions"][0]))
        patch = statusPatch(after, desiredStatus(after, **inputs()), T1)
        assert patch is not None
        self.assertEqual(len(patch["status"]["conditions"]), 4)

    def test_linkAndStateOnly(self) -> None:
        """When only the state differs, the patch says so and leaves conditions out."""
        raw = bundle()
        after = written(raw, statusPatch(raw, desiredStatus(raw, **inputs()), T0))
        after["status"]["state"] = "Unavailable"
        patch = statusPatch(after, desiredStatus(after, **inputs(manageState=True)), T1)
        self.assertEqual(patch, {"status": {"state": "Available"}})

    def test_manifestStatusUntouched(self) -> None:
        """A manifest's link and state (chart-provided) are never in our patch when we do not own them."""
        raw = bundle(status={"link": "/dist/x/index.js", "state": "Available"})
        patch = statusPatch(raw, desiredStatus(raw, **inputs(defaultedLink=None)), T0)
        assert patch is not None
        self.assertEqual(set(patch["status"]), {"conditions"})

    def test_garbageConditions(self) -> None:
        """Conditions that are not a list (hand-written) are replaced, never crash."""
        raw = bundle(status={"conditions": "oops"})
        patch = statusPatch(raw, desiredStatus(raw, **inputs()), T0)
        assert patch is not None
        self.assertEqual(len(patch["status"]["conditions"]), 4)
        raw = bundle(status={"conditions": [None, 3, {"no": "type"}]})
        patch = statusPatch(raw, desiredStatus(raw, **inputs()), T0)
        assert patch is not None
        self.assertEqual(len(patch["status"]["conditions"]), 7)


class GenerationRefreshTests(SynchronousTestCase):
    def test_statusIsCurrent(self) -> None:
        raw = bundle(generation=3)
        self.assertFalse(statusIsCurrent(raw))
        after = written(raw, statusPatch(raw, desiredStatus(raw, **inputs()), T0))  # generation 4, observed 3
        self.assertTrue(statusIsCurrent(after))
        after["metadata"]["generation"] = 5  # someone edited since
        self.assertFalse(statusIsCurrent(after))

    def test_specHash(self) -> None:
        """Status and metadata do not count; the spec does."""
        raw = bundle()
        same = written(raw, {"status": {"state": "Available"}})
        same["metadata"]["labels"] = {"a": "b"}
        self.assertEqual(specHash(raw), specHash(same))
        self.assertNotEqual(specHash(raw), specHash(bundle(raw="Yg==")))

    def test_needsGenerationRefresh(self) -> None:
        raw = bundle(generation=3)
        after = written(raw, statusPatch(raw, desiredStatus(raw, **inputs()), T0))
        recorded = specHash(raw)
        self.assertFalse(needsGenerationRefresh(after, recorded))
        self.assertFalse(needsGenerationRefresh(after, None))  # unknown, but current
        edited = copy.deepcopy(after)
        edited["spec"] = {"raw": "Yg=="}
        edited["metadata"]["generation"] += 1
        self.assertTrue(needsGenerationRefresh(edited, recorded))
        self.assertTrue(needsGenerationRefresh(edited, None))
        foreign = written(after, {"status": {"state": "Available"}})  # someone else's status write
        self.assertFalse(needsGenerationRefresh(foreign, recorded))

    def test_rfc3339(self) -> None:
        self.assertEqual(rfc3339(0), "1970-01-01T00:00:00Z")
        self.assertEqual(rfc3339(1704067200.75), T0)


class TokenBucketTests(SynchronousTestCase):
    def test_burstThenRate(self) -> None:
        clock = task.Clock()
        bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        self.assertAlmostEqual(bucket.delay(), 0.5)
        clock.advance(0.49)
        self.assertFalse(bucket.take())
        clock.advance(0.02)
        self.assertTrue(bucket.take())
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 3)


class FakeApiException(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class FakeObjects:
    """
    The CustomObjectsApi calls the writer and the elector make, on dicts in memory, with the API server's
    rules that matter here: merge patch, 409 on a stale resourceVersion, generation bump on every
    non-metadata change (no status subresource).
    """

    def __init__(self) -> None:
        self.objects: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
        self.version = 100
        self.patches: List[Tuple[str, Dict[str, Any]]] = []
        self.fail: List[int] = []

    def put(self, plural: str, raw: Dict[str, Any], namespace: str = "") -> Dict[str, Any]:
        self.version += 1
        raw = copy.deepcopy(raw)
        raw["metadata"]["resourceVersion"] = str(self.version)
        self.objects[(plural, namespace, raw["metadata"]["name"])] = raw
        return copy.deepcopy(raw)

    def _get(self, plural: str, namespace: str, name: str) -> Dict[str, Any]:
        if self.fail:
            raise FakeApiException(self.fail.pop(0))
        try:
            return self.objects[(plural, namespace, name)]
        except KeyError:
            raise FakeApiException(404) from None

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str, **kw: Any) -> Any:
        return copy.deepcopy(self._get(plural, "", name))

    def patch_cluster_custom_object(self, group: str, version: str, plural: str, name: str, body: Any,
                                    **kw: Any) -> Any:
        current = self._get(plural, "", name)
        self.patches.append((name, copy.deepcopy(body)))
        rv = body.get("metadata", {}).get("resourceVersion")
        if rv is not None and rv != current["metadata"]["resourceVersion"]:
            raise FakeApiException(409)
        new = copy.deepcopy(current)
        new.setdefault("status", {}).update(body["status"])
        if new != current:
            new["metadata"]["generation"] = new["metadata"].get("generation", 1) + 1
            return self.put(plural, new)
        return copy.deepcopy(current)

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                     **kw: Any) -> Any:
        return copy.deepcopy(self._get(plural, namespace, name))

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, body: Any,
                                        **kw: Any) -> Any:
        if self.fail:
            raise FakeApiException(self.fail.pop(0))
        if (plural, namespace, body["metadata"]["name"]) in self.objects:
            raise FakeApiException(409)
        return self.put(plural, body, namespace)

    def replace_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                         body: Any, **kw: Any) -> Any:
        current = self._get(plural, namespace, name)
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise FakeApiException(409)
        return self.put(plural, body, namespace)


def syncRunner(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """Runs the 'thread' call at once, so tests need no threads."""
    return defer.maybeDeferred(f, *args, **kwargs)


def elector(api: FakeObjects, clock: task.Clock, identity: str) -> LeaseElector:
    return LeaseElector(api, namespace="ksproxy-system", name="ksproxy", identity=identity, clock=clock,
                        runInThread=syncRunner, leaseDuration=15.0, renewDeadline=10.0, retryPeriod=2.0)


class LeaseElectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1704067200)
        self.api = FakeObjects()

    def lease(self) -> Dict[str, Any]:
        return self.api.objects[("leases", "ksproxy-system", "ksproxy")]

    def test_acquireCreatesLease(self) -> None:
        a = elector(self.api, self.clock, "a")
        changes: List[bool] = []
        a.addObserver(changes.append)
        a.startService()
        self.assertTrue(a.isLeader)
        self.assertEqual(changes, [True])
        spec = self.lease()["spec"]
        self.assertEqual(spec["holderIdentity"], "a")
        self.assertEqual(spec["leaseDurationSeconds"], 15)
        self.assertEqual(spec["renewTime"], "2024-01-01T00:00:00.000000Z")
        self.assertEqual(spec["leaseTransitions"], 0)

    def test_renewEveryRetryPeriod(self) -> None:
        a = elector(self.api, self.clock, "a")
        a.startService()
        self.clock.advance(1.9)
        self.assertEqual(self.lease()["spec"]["renewTime"], "2024-01-01T00:00:00.000000Z")
        self.clock.advance(0.2)
        self.assertEqual(self.lease()["spec"]["renewTime"], "2024-01-01T00:00:02.100000Z")

    def test_onlyOneLeader(self) -> None:
        a, b = elector(self.api, self.clock, "a"), elector(self.api, self.clock, "b")
        a.startService()
        b.startService()
        for _ in range(20):
            self.clock.advance(1)
            self.assertEqual((a.isLeader, b.isLeader), (True, False))

    def test_releaseHandsOver(self) -> None:
        """stopService releases the lease; the other replica takes it at its next try, not after expiry."""
        a, b = elector(self.api, self.clock, "a"), elector(self.api, self.clock, "b")
        a.startService()
        b.startService()
        d = a.stopService()
        self.successResultOf(d)
        self.assertFalse(a.isLeader)
        self.assertEqual(self.lease()["spec"].get("holderIdentity"), None)
        self.clock.advance(2.0)
        self.assertTrue(b.isLeader)
        self.assertEqual(self.lease()["spec"]["holderIdentity"], "b")
        self.assertEqual(self.lease()["spec"]["leaseTransitions"], 1)

    def test_expiryTakeover(self) -> None:
        """A holder that stops renewing loses the lease leaseDuration after b last saw it change."""
        a, b = elector(self.api, self.clock, "a"), elector(self.api, self.clock, "b")
        a.startService()
        b.startService()  # b sees a's record at t=0
        a._loop.stop()  # a dies without releasing
        self.clock.advance(14.0)
        self.assertFalse(b.isLeader)
        self.clock.advance(2.0)
        self.assertTrue(b.isLeader)
        self.assertEqual(self.lease()["spec"]["holderIdentity"], "b")

    def test_stepDownWhenRenewFails(self) -> None:
        """A leader that cannot renew for renewDeadline stops acting as leader."""
        a = elector(self.api, self.clock, "a")
        changes: List[bool] = []
        a.addObserver(changes.append)
        a.startService()
        self.api.fail = [500] * 100
        self.clock.advance(8.0)
        self.assertTrue(a.isLeader)
        self.clock.advance(2.1)
        self.assertFalse(a.isLeader)
        self.assertEqual(changes, [True, False])
        self.api.fail = []
        self.clock.advance(2.0)
        self.assertTrue(a.isLeader)
        self.flushLoggedErrors()


class StaticElector:
    def __init__(self, leader: bool) -> None:
        self.isLeader = leader
        self.observers: List[Any] = []
        self.running = False

    def addObserver(self, f: Any) -> None:
        self.observers.append(f)

    def set(self, leader: bool) -> None:
        self.isLeader = leader
        for f in self.observers:
            f(leader)

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> defer.Deferred[None]:
        self.running = False
        return defer.succeed(None)


class StatusWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1704067200)
        self.api = FakeObjects()
        self.elector = StaticElector(True)

    def writer(self, **kw: Any) -> StatusWriter:
        w = StatusWriter(self.api, self.elector, clock=self.clock, runInThread=syncRunner, **kw)
        w.startService()
        self.addCleanup(w.stopService)
        return w

    def put(self, name: str, **spec: Any) -> Dict[str, Any]:
        raw = bundle(**spec)
        raw["metadata"]["name"] = name
        return self.api.put("jsbundles", raw)

    def server(self, name: str) -> Dict[str, Any]:
        return copy.deepcopy(self.api.objects[("jsbundles", "", name)])

    def inp(self, raw: Dict[str, Any], **kw: Any) -> StatusInput:
        return StatusInput(kind="JSBundle", raw=raw, **kw)

    def test_writesThenQuiet(self) -> None:
        """One write per changed object; feeding back what the server now has causes no second write."""
        w = self.writer()
        raw = self.put("b", raw="YQ==")
        w.update([self.inp(raw, programmed=True, defaultedLink="/dist/b/index.js")])
        self.assertEqual(len(self.api.patches), 1)
        name, body = self.api.patches[0]
        self.assertEqual(body["metadata"], {"resourceVersion": raw["metadata"]["resourceVersion"]})
        self.assertEqual(self.server("b")["status"]["link"], "/dist/b/index.js")
        # The watch delivers our own write (generation bumped): no new write.
        for _ in range(3):
            w.update([self.inp(self.server("b"), programmed=True, defaultedLink=None)])
            self.clock.advance(10)
        self.assertEqual(len(self.api.patches), 1)
        self.assertEqual(w.writes, 1)

    def test_noWriteWhenNothingChanged(self) -> None:
        w = self.writer()
        raw = self.put("b")
        w.update([self.inp(raw, programmed=True)])
        w.update([self.inp(self.server("b"), programmed=True)])
        self.assertEqual(len(self.api.patches), 1)
        # A restarted writer (no memory) sees the same object: still no write.
        w2 = self.writer()
        w2.update([self.inp(self.server("b"), programmed=True)])
        self.assertEqual(len(self.api.patches), 1)

    def test_specEditRefreshesObservedGeneration(self) -> None:
        """A spec change with the same verdicts still gets observedGeneration updated, once."""
        w = self.writer()
        w.update([self.inp(self.put("b"), programmed=True)])
        edited = self.server("b")
        edited["spec"] = {"raw": "Yg=="}
        edited["metadata"]["generation"] += 1
        edited = self.api.put("jsbundles", edited)
        w.update([self.inp(edited, programmed=True)])
        self.assertEqual(len(self.api.patches), 2)
        observed = {c["observedGeneration"] for c in self.server("b")["status"]["conditions"]}
        self.assertEqual(observed, {edited["metadata"]["generation"]})
        w.update([self.inp(self.server("b"), programmed=True)])
        self.assertEqual(len(self.api.patches), 2)

    def test_notLeaderNoWrites(self) -> None:
        self.elector.isLeader = False
        w = self.writer()
        w.update([self.inp(self.put("b"), programmed=True)])
        self.assertEqual(self.api.patches, [])
        self.assertEqual(w.pending, 1)
        self.elector.set(True)
        self.assertEqual(len(self.api.patches), 1)
        self.assertEqual(w.pending, 0)

    def test_conflictRetriedWithFreshRead(self) -> None:
        """A 409 (someone changed the object) leads to a fresh read and a new patch on the new version."""
        w = self.writer()
        raw = self.put("b")
        other = self.server("b")
        other["status"] = {"state": "Available"}
        self.api.put("jsbundles", other)  # resourceVersion moves on behind the writer's back
        w.update([self.inp(raw, programmed=True)])
        self.assertEqual(len(self.api.patches), 2)
        final = self.server("b")["status"]
        self.assertEqual(final["state"], "Available")
        self.assertEqual(len(final["conditions"]), 4)

    def test_conflictWithSpecChangeDropped(self) -> None:
        """When the fresh read shows a new spec, our verdict is stale: wait for the next update instead."""
        w = self.writer()
        raw = self.put("b")
        other = self.server("b")
        other["spec"] = {"raw": "Yg=="}
        self.api.put("jsbundles", other)
        w.update([self.inp(raw, programmed=True)])
        self.assertEqual(len(self.api.patches), 1)
        self.assertNotIn("status", self.server("b"))
        self.assertEqual(w.pending, 0)

    def test_rateLimited(self) -> None:
        """burst writes at once, then `rate` per second."""
        w = self.writer(rate=2.0, burst=2)
        w.update([self.inp(self.put(f"b{i}"), programmed=True) for i in range(6)])
        self.assertEqual(len(self.api.patches), 2)
        self.clock.advance(0.5)
        self.assertEqual(len(self.api.patches), 3)
        self.clock.advance(0.49)
        self.assertEqual(len(self.api.patches), 3)
        for _ in range(3):
            self.clock.advance(0.51)
        self.assertEqual(len(self.api.patches), 6)

    def test_deletedObjectForgotten(self) -> None:
        """An object gone from the inputs (complete update) or from the server (404) is dropped."""
        self.elector.isLeader = False
        w = self.writer()
        w.update([self.inp(self.put("a"), programmed=True), self.inp(self.put("b"), programmed=True)])
        self.assertEqual(w.pending, 2)
        w.update([self.inp(self.server("a"), programmed=True)])
        self.assertEqual(w.pending, 1)
        del self.api.objects[("jsbundles", "", "a")]
        self.elector.set(True)
        self.assertEqual(w.pending, 0)
        self.assertEqual(w.writes, 0)

    def test_errorRetriedLater(self) -> None:
        w = self.writer(retryDelay=5.0)
        raw = self.put("b")
        self.api.fail = [500]
        w.update([self.inp(raw, programmed=True)])
        self.assertEqual(w.writes, 0)
        self.assertEqual(w.pending, 1)
        self.clock.advance(5.0)
        self.assertEqual(w.writes, 1)
        self.flushLoggedErrors()

    def test_failureWhileStoppingIsNotRetried(self) -> None:
        """A write still in flight when the writer stops, and then failing, leaves no retry timer behind."""
        calls: List[Any] = []

        def runner(f: Any, *a: Any, **kw: Any) -> Any:
            d: Any = defer.Deferred()
            calls.append(d)
            return d

        w = StatusWriter(self.api, self.elector, clock=self.clock, runInThread=runner, retryDelay=5.0)
        w.startService()
        w.update([self.inp(self.put("b"), programmed=True)])
        self.assertEqual(len(calls), 1)
        stopping = w.stopService()
        calls[0].errback(FakeApiException(500))
        self.successResultOf(stopping)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.flushLoggedErrors()

    def test_manageStateWritesState(self) -> None:
        w = self.writer(manageState=True)
        w.update([self.inp(self.put("b"), programmed=False)])
        self.assertEqual(self.server("b")["status"]["state"], "Unavailable")
        w.update([self.inp(self.server("b"), programmed=True)])
        self.assertEqual(self.server("b")["status"]["state"], "Available")
        self.assertEqual(w.writes, 2)
