"""
L{ksproxy.sources.kube.KubeSource} against L{ksproxy.testing.kubeapi.FakeKubeAPI}, through the real
C{kubernetes} client, with the real reactor; and the conventions of the fake itself.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from kubernetes import client, config
from twisted.internet import defer, reactor
from twisted.trial import unittest

from ksproxy.model.types import API_VERSION
from ksproxy.sources.inventory import Inventory
from ksproxy.sources.kube import KubeSource, ObjectRef, bundleReferences
from ksproxy.testing.kubeapi import FakeKubeAPI
from tests.util import eventually

CR_PATH = "/apis/extensions.kubesphere.io/v1alpha1/"
QUICK = 1.0  # "follows every change within a second"


def apiService(name: str = "v1alpha1.demo.kubesphere.io", url: str = "http://127.0.0.1:9") -> Dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "APIService",
        "metadata": {"name": name},
        "spec": {"group": "demo.kubesphere.io", "version": "v1alpha1", "url": url},
    }


def reverseProxy(name: str, path: str = "/proxy/demo/*") -> Dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ReverseProxy",
        "metadata": {"name": name},
        "spec": {"matcher": {"path": path, "method": "*"}, "upstream": {"url": "http://127.0.0.1:9"}},
    }


def jsBundle(
    name: str, rawFrom: Optional[Dict[str, Any]] = None, raw: Optional[str] = None
) -> Dict[str, Any]:
    spec: Dict[str, Any] = {}
    if rawFrom is not None:
        spec["rawFrom"] = rawFrom
    if raw is not None:
        spec["raw"] = raw
    return {"apiVersion": API_VERSION, "kind": "JSBundle", "metadata": {"name": name}, "spec": spec}


def configMap(name: str, namespace: str, script: str) -> Dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"index.js": script},
    }


def secret(name: str, namespace: str, script: str) -> Dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"index.js": base64.b64encode(script.encode()).decode()},
    }


def cmRef(name: str, namespace: str = "ext") -> Dict[str, Any]:
    return {"configMapKeyRef": {"name": name, "key": "index.js", "namespace": namespace}}


def secretRef(name: str, namespace: str = "ext") -> Dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": "index.js", "namespace": namespace}}


class Conditions:
    """Deferreds that fire when a predicate becomes true; re-checked by L{check} (from inventory calls)."""

    def __init__(self) -> None:
        self._waiting: List[Tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def waitFor(
        self, predicate: Callable[[], bool], timeout: float = QUICK, what: str = ""
    ) -> defer.Deferred[None]:
        if predicate():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        entry = (predicate, d)
        self._waiting.append(entry)

        def expire() -> None:
            if entry in self._waiting:
                self._waiting.remove(entry)
                d.errback(AssertionError(f"not within {timeout}s: {what or predicate}"))

        timer = reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def check(self) -> None:
        for entry in list(self._waiting):
            predicate, d = entry
            if entry in self._waiting and predicate():
                self._waiting.remove(entry)
                d.callback(None)


class RecordingInventory:
    """The inventory API that KubeSource uses; records every call and the thread it came on."""

    def __init__(self) -> None:
        self.objects: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
        self.calls: List[Tuple[Any, ...]] = []
        self.offThread: List[str] = []
        self.conditions = Conditions()

    def _key(self, kind: str, name: str, namespace: str = "") -> Tuple[str, str, str]:
        return (kind, namespace if kind in ("ConfigMap", "Secret") else "", name)

    def _called(self, *call: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.offThread.append(call[0])
        self.calls.append(call)
        self.conditions.check()

    def upsert(self, raw: Dict[str, Any], origin: str = "kubernetes") -> None:
        meta = raw["metadata"]
        self.objects[self._key(raw["kind"], meta["name"], meta.get("namespace", ""))] = raw
        self._called("upsert", raw["kind"], meta["name"])

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        self.objects.pop(self._key(kind, name, namespace), None)
        self._called("delete", kind, name, namespace)

    def replaceKind(self, kind: str, raws: List[Dict[str, Any]]) -> None:
        for key in [k for k in self.objects if k[0] == kind]:
            del self.objects[key]
        for raw in raws:
            self.objects[self._key(kind, raw["metadata"]["name"])] = raw
        self._called("replaceKind", kind, sorted(r["metadata"]["name"] for r in raws))

    def get(self, kind: str, name: str, namespace: str = "") -> Optional[Dict[str, Any]]:
        return self.objects.get(self._key(kind, name, namespace))

    def has(self, kind: str, name: str, namespace: str = "") -> bool:
        return self._key(kind, name, namespace) in self.objects

    def waitFor(
        self, predicate: Callable[[], bool], timeout: float = QUICK, what: str = ""
    ) -> defer.Deferred[None]:
        return self.conditions.waitFor(predicate, timeout, what)


def pollUntil(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "") -> defer.Deferred[None]:
    """For conditions that only the watcher threads change (counters): check every 10ms, bounded."""
    return eventually(predicate, what or repr(predicate), timeout)


def withTimeout(d: defer.Deferred[Any], timeout: float, what: str) -> defer.Deferred[Any]:
    return d.addTimeout(timeout, reactor, onTimeoutCancel=lambda r, t: _timedOut(what, t))


def _timedOut(what: str, timeout: float) -> None:
    raise AssertionError(f"{what}: not within {timeout}s")


class KubeSourceTestsMixin:
    """Start a fake API server and a KubeSource on it (real reactor, real client)."""

    backoff = (0.05, 0.5)

    def setUp(self) -> None:
        self.api = FakeKubeAPI()
        self.api.start()
        self.addCleanup(self.api.stop)
        self.kubeconfig = self.api.kubeconfig(self.mktemp())
        self.inventory = RecordingInventory()

    def startSource(self, inventory: Any = None, **kwargs: Any) -> KubeSource:
        kwargs.setdefault("backoff", self.backoff)
        source = KubeSource(inventory or self.inventory, reactor, kubeconfig=self.kubeconfig, **kwargs)
        source.startService()
        self.addCleanup(lambda: source.stopService() if source.running else None)
        return source

    def synced(self, source: KubeSource, timeout: float = 5.0) -> defer.Deferred[None]:
        return withTimeout(source.synced, timeout, "source synced")

    def crRequests(self, since: int = 0) -> List[Any]:
        return [r for r in self.api.requests[since:] if r.path.startswith(CR_PATH)]


class KubeSourceTests(KubeSourceTestsMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_initialSync(self) -> Any:
        """
        The first complete list of every kind reaches the inventory (as one replaceKind per kind), with the
        ConfigMaps and Secrets that JSBundles use, and then C{synced} fires.
        """
        self.api.put(apiService())
        self.api.put(reverseProxy("rp1"))
        self.api.put(reverseProxy("rp2", "/other/*"))
        self.api.put(jsBundle("b1", cmRef("cm1")))
        self.api.put(jsBundle("b2", secretRef("s1")))
        self.api.put(configMap("cm1", "ext", "console.log(1)"))
        self.api.put(secret("s1", "ext", "console.log(2)"))
        self.api.put(configMap("unrelated", "ext", "x"))

        source = self.startSource()
        yield self.synced(source)

        self.assertEqual(
            sorted(c for c in self.inventory.calls if c[0] == "replaceKind"),
            [
                ("replaceKind", "APIService", ["v1alpha1.demo.kubesphere.io"]),
                ("replaceKind", "JSBundle", ["b1", "b2"]),
                ("replaceKind", "ReverseProxy", ["rp1", "rp2"]),
            ],
        )
        # The referenced objects were tried before synced fired, and are in.
        self.assertEqual(
            self.inventory.get("ConfigMap", "cm1", "ext")["data"], {"index.js": "console.log(1)"}
        )
        self.assertEqual(self.inventory.get("Secret", "s1", "ext")["kind"], "Secret")
        self.assertEqual(self.inventory.get("ConfigMap", "cm1", "ext")["apiVersion"], "v1")
        self.assertFalse(self.inventory.has("ConfigMap", "unrelated", "ext"))
        self.assertEqual(self.inventory.offThread, [])
        # Each kind: a list, then a watch from the list's resourceVersion with bookmarks and a timeout.
        for plural in ("apiservices", "reverseproxies", "jsbundles"):
            requests = [r for r in self.api.requests if r.path == CR_PATH + plural]
            self.assertFalse(requests[0].isWatch)
            yield pollUntil(
                lambda p=plural: any(r.isWatch for r in self.api.requests if r.path == CR_PATH + p)
            )
            watch = next(r for r in self.api.requests if r.path == CR_PATH + plural and r.isWatch)
            self.assertEqual(watch.query["allowWatchBookmarks"], "true")
            self.assertTrue(watch.query["resourceVersion"].isdigit())
            self.assertLessEqual(int(watch.query["timeoutSeconds"]), source.watchTimeout)
            self.assertEqual(requests[0].headers["authorization"], "Bearer fake-token")

    @defer.inlineCallbacks
    def test_addEditDelete(self) -> Any:
        """Adds, edits and deletes reach the inventory within a second each."""
        source = self.startSource()
        yield self.synced(source)
        self.api.put(reverseProxy("rp1"))
        yield self.inventory.waitFor(lambda: self.inventory.has("ReverseProxy", "rp1"), what="add")

        self.api.put(reverseProxy("rp1", "/changed/*"))
        yield self.inventory.waitFor(
            lambda: self.inventory.get("ReverseProxy", "rp1")["spec"]["matcher"]["path"] == "/changed/*",
            what="edit",
        )
        self.assertEqual(self.inventory.get("ReverseProxy", "rp1")["metadata"]["generation"], 2)

        self.api.delete("ReverseProxy", "rp1")
        yield self.inventory.waitFor(lambda: not self.inventory.has("ReverseProxy", "rp1"), what="delete")
        self.assertIn(("delete", "ReverseProxy", "rp1", ""), self.inventory.calls)
        self.assertEqual(self.inventory.offThread, [])

    @defer.inlineCallbacks
    def test_watchCutResumes(self) -> Any:
        """
        A watch connection cut mid-stream is resumed from the last resourceVersion seen, without a list.
        """
        source = self.startSource()
        yield self.synced(source)
        stored = self.api.put(reverseProxy("rp1"))
        yield self.inventory.waitFor(lambda: self.inventory.has("ReverseProxy", "rp1"))
        yield pollUntil(lambda: self.api.openWatches == 3, what="three watches open")

        mark = len(self.api.requests)
        self.assertEqual(self.api.cutWatches(), 3)
        self.api.put(reverseProxy("rp2", "/two/*"))
        yield self.inventory.waitFor(
            lambda: self.inventory.has("ReverseProxy", "rp2"), what="event after cut"
        )

        after = self.crRequests(mark)
        self.assertTrue(after)
        self.assertTrue(all(r.isWatch for r in after), [(r.path, r.query) for r in after])
        resumed = [r for r in after if r.path == CR_PATH + "reverseproxies"]
        self.assertEqual(resumed[0].query["resourceVersion"], stored["metadata"]["resourceVersion"])
        self.assertGreaterEqual(source.restarts["ReverseProxy"], 1)
        self.assertEqual(
            [c for c in self.inventory.calls if c[0] == "replaceKind" and c[1] == "ReverseProxy"],
            [("replaceKind", "ReverseProxy", [])],
        )

    @defer.inlineCallbacks
    def test_bookmarkAdvancesResourceVersion(self) -> Any:
        """A BOOKMARK moves the resume point on, so a resumed watch does not replay old history."""
        source = self.startSource()
        yield self.synced(source)
        yield pollUntil(lambda: self.api.openWatches == 3, what="three watches open")
        self.api.put(apiService())  # moves the store's resourceVersion past the ReverseProxy list's
        yield self.inventory.waitFor(lambda: self.inventory.has("APIService", "v1alpha1.demo.kubesphere.io"))
        current = self.api.resourceVersion
        self.api.sendBookmark()
        mark = len(self.api.requests)
        # Once written, a bookmark reaches the client before the end of the connection that follows it.
        yield pollUntil(lambda: self.api.bookmarksSent == 3, what="bookmarks written")
        self.api.cutWatches()
        self.api.put(reverseProxy("rp1"))
        yield self.inventory.waitFor(lambda: self.inventory.has("ReverseProxy", "rp1"))
        resumed = [r for r in self.crRequests(mark) if r.path == CR_PATH + "reverseproxies"]
        self.assertEqual(resumed[0].query["resourceVersion"], current)

    @defer.inlineCallbacks
    def test_goneRelists(self) -> Any:
        """
        After 410 Gone the kind is listed again, and what was deleted meanwhile leaves the inventory.
        """
        self.api.put(reverseProxy("keep"))
        self.api.put(reverseProxy("doomed", "/doomed/*"))
        source = self.startSource()
        yield self.synced(source)
        yield pollUntil(lambda: self.api.openWatches == 3, what="three watches open")

        self.api.stop()
        self.api.delete("ReverseProxy", "doomed")
        self.api.expireHistory()
        mark = len(self.api.requests)
        self.api.start()
        yield self.inventory.waitFor(
            lambda: not self.inventory.has("ReverseProxy", "doomed"), timeout=3.0, what="relist after 410"
        )
        relists = [r for r in self.crRequests(mark) if r.path == CR_PATH + "reverseproxies" and not r.isWatch]
        self.assertTrue(relists)
        self.assertIn(("replaceKind", "ReverseProxy", ["keep"]), self.inventory.calls)
        self.assertNotIn(("delete", "ReverseProxy", "doomed", ""), self.inventory.calls)
        # The relisted kind watches again from the new list's resourceVersion.
        self.api.put(reverseProxy("later", "/later/*"))
        yield self.inventory.waitFor(lambda: self.inventory.has("ReverseProxy", "later"))

    @defer.inlineCallbacks
    def test_apiServerDownAtStart(self) -> Any:
        """
        With the API server down the source retries with a growing backoff (no busy loop), and syncs once
        the server is up.
        """
        self.api.put(reverseProxy("rp1"))
        self.api.stop()
        started = time.monotonic()
        source = self.startSource()
        yield pollUntil(lambda: source.restarts["ReverseProxy"] >= 4, what="retries while down")
        elapsed = time.monotonic() - started
        # 4 failures wait at least 0.025 + 0.05 + 0.1 seconds between them (half of 0.05 * 2**n).
        self.assertGreater(elapsed, 0.17)
        self.assertFalse(source.synced.called)
        self.api.start()
        yield self.synced(source, timeout=3.0)
        self.assertTrue(self.inventory.has("ReverseProxy", "rp1"))

    @defer.inlineCallbacks
    def test_failedRequestRetried(self) -> Any:
        """An error status from the API server is retried after a backoff, and counted."""
        self.api.failNext(CR_PATH + "apiservices", 500, times=2)
        self.api.put(apiService())
        source = self.startSource()
        yield self.synced(source)
        self.assertTrue(self.inventory.has("APIService", "v1alpha1.demo.kubesphere.io"))
        self.assertEqual(source.restarts["APIService"], 2)

    @defer.inlineCallbacks
    def test_brokenResponsesDoNotEndTheThread(self) -> Any:
        """
        Garbage and unexpected shapes from the API server are logged and retried after a backoff; the
        watcher thread carries on and syncs once the server answers properly.
        """
        self.api.failNext(CR_PATH + "jsbundles", 200, body=b"<html>not JSON</html>")
        self.api.failNext(CR_PATH + "reverseproxies", 200, body={"kind": "ReverseProxyList", "items": []})
        self.api.put(reverseProxy("rp1"))
        source = self.startSource()
        yield self.synced(source)
        self.assertTrue(self.inventory.has("ReverseProxy", "rp1"))
        self.assertEqual((source.restarts["JSBundle"], source.restarts["ReverseProxy"]), (1, 1))
        # The list without metadata is a surprise: logged with its traceback.
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    @defer.inlineCallbacks
    def test_referencedConfigMapChanges(self) -> Any:
        """A referenced ConfigMap's changes, deletion and return reach the inventory within a second."""
        self.api.put(jsBundle("b1", cmRef("cm1")))
        self.api.put(configMap("cm1", "ext", "v1"))
        source = self.startSource()
        yield self.synced(source)
        self.assertEqual(self.inventory.get("ConfigMap", "cm1", "ext")["data"]["index.js"], "v1")
        yield pollUntil(lambda: self.api.openWatches == 4, what="four watches open")

        self.api.put(configMap("cm1", "ext", "v2"))
        yield self.inventory.waitFor(
            lambda: (
                (self.inventory.get("ConfigMap", "cm1", "ext") or {}).get("data", {}).get("index.js") == "v2"
            ),
            what="ConfigMap change",
        )
        self.api.delete("ConfigMap", "cm1", "ext")
        yield self.inventory.waitFor(lambda: not self.inventory.has("ConfigMap", "cm1", "ext"), what="delete")
        self.api.put(configMap("cm1", "ext", "v3"))
        yield self.inventory.waitFor(lambda: self.inventory.has("ConfigMap", "cm1", "ext"), what="re-create")

        # The bundle moves to another ConfigMap: the old one is dropped, the new one followed.
        self.api.put(configMap("cm2", "ext", "other"))
        self.api.put(jsBundle("b1", cmRef("cm2")))
        yield self.inventory.waitFor(
            lambda: (
                self.inventory.has("ConfigMap", "cm2", "ext")
                and not self.inventory.has("ConfigMap", "cm1", "ext")
            ),
            what="reference moved",
        )
        # Once the bundle is gone, so is its ConfigMap.
        self.api.delete("JSBundle", "b1")
        yield self.inventory.waitFor(
            lambda: not self.inventory.has("ConfigMap", "cm2", "ext"), what="bundle gone"
        )
        yield pollUntil(lambda: self.api.openWatches == 3, what="the ConfigMap watch ends")
        self.assertEqual(self.inventory.offThread, [])

    @defer.inlineCallbacks
    def test_onlyReferencedSecretsAreRead(self) -> Any:
        """
        Secrets are read only by name, one namespace at a time, and only when a bundle's source uses
        them: never the whole collection, never a Secret named next to an inline script.
        """
        self.api.put(secret("used", "ext", "a"))
        self.api.put(secret("unused", "ext", "b"))
        self.api.put(secret("shadowed", "ext", "c"))
        self.api.put(jsBundle("b1", secretRef("used")))
        self.api.put(jsBundle("b2", secretRef("shadowed"), raw=base64.b64encode(b"inline").decode()))
        source = self.startSource()
        yield self.synced(source)
        self.api.put(jsBundle("b3", {"url": "http://127.0.0.1:9/index.js"}))
        yield self.inventory.waitFor(lambda: self.inventory.has("JSBundle", "b3"))

        secretRequests = [r for r in self.api.requests if "/secrets" in r.path]
        self.assertTrue(secretRequests)
        for r in secretRequests:
            self.assertEqual(r.path, "/api/v1/namespaces/ext/secrets")
            self.assertEqual(r.query["fieldSelector"], "metadata.name=used")
        self.assertTrue(self.inventory.has("Secret", "used", "ext"))
        self.assertFalse(self.inventory.has("Secret", "unused", "ext"))
        self.assertFalse(self.inventory.has("Secret", "shadowed", "ext"))
        self.assertFalse([r for r in self.api.requests if r.path.endswith("/configmaps")])

    @defer.inlineCallbacks
    def test_stopServiceEndsThreads(self) -> Any:
        """stopService ends every watcher thread within a second, watches and backoffs alike."""
        self.api.put(jsBundle("b1", cmRef("cm1")))
        self.api.put(configMap("cm1", "ext", "v1"))
        source = self.startSource()
        yield self.synced(source)
        yield pollUntil(lambda: self.api.openWatches == 4, what="four watches open")
        threads = [t for t in threading.enumerate() if t.name.startswith("ksproxy-kube")]
        self.assertEqual(len(threads), 4)
        started = time.monotonic()
        yield source.stopService()
        self.assertLess(time.monotonic() - started, 1.0)
        for t in threads:
            t.join(0.5)
            self.assertFalse(t.is_alive(), t.name)
        # Late events are not delivered after the stop.
        calls = len(self.inventory.calls)
        self.api.put(reverseProxy("late"))
        yield pollUntil(lambda: self.api.openWatches == 0, what="server sees the watches go")
        self.assertEqual(len(self.inventory.calls), calls)

    @defer.inlineCallbacks
    def test_stopWhileDown(self) -> Any:
        """A thread waiting in a backoff ends at once when the service stops."""
        self.api.stop()
        source = self.startSource(backoff=(30.0, 30.0))
        yield pollUntil(
            lambda: all(source.restarts[k] >= 1 for k in ("APIService", "JSBundle", "ReverseProxy"))
        )
        threads = [t for t in threading.enumerate() if t.name.startswith("ksproxy-kube")]
        self.assertEqual(len(threads), 3)
        started = time.monotonic()
        yield source.stopService()
        self.assertLess(time.monotonic() - started, 1.0)
        for t in threads:
            t.join(0.5)  # it has handed its last call to the reactor; only its return is left
            self.assertFalse(t.is_alive(), t.name)

    @defer.inlineCallbacks
    def test_realInventory(self) -> Any:
        """The same flow into the real Inventory: objects and referenced ConfigMap contents arrive."""
        conditions = Conditions()
        inventory = Inventory(onChange=conditions.check)
        self.api.put(reverseProxy("rp1"))
        self.api.put(jsBundle("b1", cmRef("cm1")))
        self.api.put(configMap("cm1", "ext", "console.log(1)"))
        source = self.startSource(inventory=inventory)
        yield self.synced(source)
        snapshot = inventory.snapshot()
        self.assertEqual(sorted(snapshot.records), [("JSBundle", "b1"), ("ReverseProxy", "rp1")])
        self.assertEqual(snapshot.refs[("ConfigMap", "ext", "cm1")], {"index.js": b"console.log(1)"})

        self.api.delete("ReverseProxy", "rp1")
        self.api.put(configMap("cm1", "ext", "console.log(2)"))
        yield conditions.waitFor(
            lambda: (
                ("ReverseProxy", "rp1") not in inventory.snapshot().records
                and inventory.snapshot().refs.get(("ConfigMap", "ext", "cm1"))
                == {"index.js": b"console.log(2)"}
            ),
            what="delete and ConfigMap change",
        )


class BundleReferencesTests(unittest.SynchronousTestCase):
    """Which ConfigMap or Secret a raw JSBundle uses (SPEC 1.4 order: raw, configMapKeyRef, secretKeyRef)."""

    cases = [
        ("configMap", jsBundle("b", cmRef("cm")), {ObjectRef("ConfigMap", "ext", "cm")}),
        ("secret", jsBundle("b", secretRef("s")), {ObjectRef("Secret", "ext", "s")}),
        (
            "configMapWinsOverSecret",
            jsBundle("b", {**cmRef("cm"), **secretRef("s")}),
            {ObjectRef("ConfigMap", "ext", "cm")},
        ),
        ("rawWins", jsBundle("b", cmRef("cm"), raw="eA=="), set()),
        ("url", jsBundle("b", {"url": "http://x/"}), set()),
        ("noNamespace", jsBundle("b", {"configMapKeyRef": {"name": "cm", "key": "k"}}), set()),
        ("notAMapping", jsBundle("b", {"configMapKeyRef": "cm"}), set()),
        ("noSpec", {"kind": "JSBundle", "metadata": {"name": "b"}}, set()),
    ]

    def test_table(self) -> None:
        for label, raw, expected in self.cases:
            self.assertEqual(bundleReferences(raw), frozenset(expected), label)


class FakeKubeAPIConventionTests(unittest.TestCase):
    """The fake follows the API conventions that the source and the status writer rely on."""

    def setUp(self) -> None:
        self.api = FakeKubeAPI()
        self.api.start()
        self.addCleanup(self.api.stop)
        configuration = client.Configuration()
        config.load_kube_config(self.api.kubeconfig(self.mktemp()), client_configuration=configuration)
        self.client = client.ApiClient(configuration)
        self.addCleanup(self.client.close)
        self.custom = client.CustomObjectsApi(self.client)
        self.core = client.CoreV1Api(self.client)

    def cr(self, name: str) -> Dict[str, Any]:
        return self.custom.get_cluster_custom_object(
            "extensions.kubesphere.io", "v1alpha1", "jsbundles", name
        )

    def patch(self, name: str, body: Any, contentType: Optional[str] = None) -> Dict[str, Any]:
        kwargs = {"_content_type": contentType} if contentType else {}
        return self.custom.patch_cluster_custom_object(
            "extensions.kubesphere.io", "v1alpha1", "jsbundles", name, body, **kwargs
        )

    def assertStatus(self, code: int, reason: str, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        e = self.assertRaises(client.ApiException, f, *args, **kwargs)
        self.assertEqual(e.status, code)
        status = json.loads(e.body)
        self.assertEqual((status["kind"], status["code"], status["reason"]), ("Status", code, reason))

    def test_generationAndResourceVersion(self) -> None:
        """
        Any change outside metadata bumps generation (no status subresource), metadata-only changes do
        not, and a write that changes nothing is no write at all.
        """
        created = self.api.put(jsBundle("b", cmRef("cm")))
        self.assertEqual(created["metadata"]["generation"], 1)
        self.assertTrue(created["metadata"]["uid"])
        self.assertTrue(created["metadata"]["creationTimestamp"].endswith("Z"))
        statusPatched = self.patch("b", {"status": {"link": "/dist/b/index.js"}})
        self.assertEqual(statusPatched["metadata"]["generation"], 2)
        labelled = self.patch("b", {"metadata": {"labels": {"a": "b"}}})
        self.assertEqual(labelled["metadata"]["generation"], 2)
        self.assertGreater(
            int(labelled["metadata"]["resourceVersion"]), int(statusPatched["metadata"]["resourceVersion"])
        )
        same = self.patch("b", {"status": {"link": "/dist/b/index.js"}})
        self.assertEqual(same["metadata"]["resourceVersion"], labelled["metadata"]["resourceVersion"])
        self.assertEqual(same["metadata"]["uid"], created["metadata"]["uid"])

    def test_conflictOnStaleResourceVersion(self) -> None:
        """A merge patch carrying a stale metadata.resourceVersion is refused with 409 Conflict."""
        created = self.api.put(jsBundle("b", cmRef("cm")))
        version = created["metadata"]["resourceVersion"]
        self.patch("b", {"metadata": {"resourceVersion": version}, "status": {"state": "Available"}})
        self.assertStatus(
            409,
            "Conflict",
            self.patch,
            "b",
            {"metadata": {"resourceVersion": version}, "status": {"state": "x"}},
        )
        self.assertEqual(self.cr("b")["status"], {"state": "Available"})

    def test_patchTypes(self) -> None:
        """Strategic merge is refused for custom resources (415); JSON patch works."""
        self.api.put(jsBundle("b", cmRef("cm")))
        self.assertStatus(
            415,
            "UnsupportedMediaType",
            self.patch,
            "b",
            {"status": {}},
            "application/strategic-merge-patch+json",
        )
        patched = self.patch(
            "b", [{"op": "add", "path": "/status", "value": {"link": "/x"}}], "application/json-patch+json"
        )
        self.assertEqual(patched["status"], {"link": "/x"})

    def test_notFoundAndAlreadyExists(self) -> None:
        self.assertStatus(404, "NotFound", self.cr, "nope")
        self.core.create_namespaced_config_map("ext", {"metadata": {"name": "cm"}, "data": {"a": "b"}})
        self.assertStatus(
            409, "AlreadyExists", self.core.create_namespaced_config_map, "ext", {"metadata": {"name": "cm"}}
        )
        self.assertEqual(self.core.read_namespaced_config_map("cm", "ext").data, {"a": "b"})

    def test_leases(self) -> None:
        """Leases: create, then replace with the resourceVersion precondition (what leader election does)."""
        lease = {"metadata": {"name": "ksproxy"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}
        created = self.client.sanitize_for_serialization(
            client.CoordinationV1Api(self.client).create_namespaced_lease("ksproxy-system", lease)
        )
        leases = client.CoordinationV1Api(self.client)
        mine = {**created, "spec": {"holderIdentity": "b", "leaseDurationSeconds": 15}}
        replaced = leases.replace_namespaced_lease("ksproxy", "ksproxy-system", mine)
        self.assertEqual(replaced.spec.holder_identity, "b")
        self.assertStatus(409, "Conflict", leases.replace_namespaced_lease, "ksproxy", "ksproxy-system", mine)

    def test_unauthorized(self) -> None:
        """A request without the token is refused with a 401 Status."""
        anonymous = client.ApiClient(client.Configuration(host=self.api.url))
        self.addCleanup(anonymous.close)
        self.assertStatus(401, "Unauthorized", client.CoreV1Api(anonymous).list_namespaced_secret, "ext")

    def test_watchExpired(self) -> None:
        """A watch from a compacted resourceVersion gets one ERROR event with a 410 Status, then ends."""
        self.api.put(jsBundle("b", cmRef("cm")))
        old = self.api.resourceVersion
        self.api.expireHistory()
        response = self.custom.list_cluster_custom_object(
            "extensions.kubesphere.io",
            "v1alpha1",
            "jsbundles",
            watch=True,
            resource_version=old,
            _preload_content=False,
        )
        lines = [json.loads(line) for line in response.data.splitlines() if line]
        self.assertEqual([e["type"] for e in lines], ["ERROR"])
        self.assertEqual((lines[0]["object"]["code"], lines[0]["object"]["reason"]), (410, "Expired"))

    def test_watchFromVersion(self) -> None:
        """A watch replays the history after its resourceVersion, then ends at timeoutSeconds."""
        first = self.api.put(jsBundle("a", cmRef("cm")))
        self.api.put(jsBundle("b", cmRef("cm")))
        self.api.delete("JSBundle", "a")
        self.api.put(configMap("cm", "ext", "x"))  # another resource: not in this watch
        response = self.custom.list_cluster_custom_object(
            "extensions.kubesphere.io",
            "v1alpha1",
            "jsbundles",
            watch=True,
            resource_version=first["metadata"]["resourceVersion"],
            timeout_seconds=1,
            _preload_content=False,
        )
        events = [json.loads(line) for line in response.data.splitlines() if line]
        self.assertEqual(
            [(e["type"], e["object"]["metadata"]["name"]) for e in events], [("ADDED", "b"), ("DELETED", "a")]
        )
        versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        self.assertEqual(versions, sorted(versions))
