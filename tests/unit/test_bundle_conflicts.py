"""
Two JSBundles claiming one link (SPEC 2 conflicts): the bytes, ETag and type served at the link always come
from the object the conflict resolution names, whatever the names' order, across updates and deletes, and
for every kind of source (inline, ConfigMap, URL).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.bundles import JS_CONTENT_TYPE, BundleFetcher
from ksproxy.http.server import HTTPServerFactory
from ksproxy.model.types import Endpoint, JSBundle
from ksproxy.paths import parseTarget
from ksproxy.proxy.dispatch import Gateway, ServedState
from ksproxy.reconcile import Reconciler
from ksproxy.routing import compileTable

LINK = "/dist/demo/index.js"
URL = "http://127.0.0.1:1/bundles/demo.js"
ENDPOINT_BYTES = b"fetched();"


def jsbundle(name: str, spec: Dict[str, Any], *, created: Optional[str] = None, link: str = LINK) -> dict:  # type: ignore[type-arg]
    meta: Dict[str, Any] = {"name": name}
    if created:
        meta["creationTimestamp"] = created
    return {
        "apiVersion": "extensions.kubesphere.io/v1alpha1",
        "kind": "JSBundle",
        "metadata": meta,
        "spec": spec,
        "status": {"link": link},
    }


def raw(body: bytes) -> Dict[str, Any]:
    return {"raw": base64.b64encode(body).decode("ascii")}


def etagOf(body: bytes) -> bytes:
    return b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'


class ConflictServingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fetcher = BundleFetcher(self.clock, lambda endpoint: succeed(ENDPOINT_BYTES))
        state = ServedState(compileTable((), generation=0).table, {}, 0, False)
        self.gateway = Gateway(self.clock, state, None, fetchedBundle=self.fetcher.get)  # type: ignore[arg-type]
        self.reconciler = Reconciler(self.clock, self.gateway)
        self.reconciler.observers.append(
            lambda report: self.fetcher.reconcile([r for r in report.snapshot.resources if isinstance(r, JSBundle)])
        )
        self.reconciler.markReady()
        self.factory = HTTPServerFactory(self.gateway, self.clock)

    def upsert(self, *objs: dict) -> None:  # type: ignore[type-arg]
        for obj in objs:
            self.reconciler.inventory.upsert(obj)
        self.reconciler.rebuild()

    def winner(self, link: str = LINK) -> str:
        route = self.gateway.state.table.lookup(b"GET", parseTarget(link.encode("ascii")))
        return route.name

    def get(self, link: str = LINK) -> Tuple[int, Dict[bytes, bytes], bytes]:
        proto = self.factory.buildProtocol(None)
        wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(wire)
        proto.dataReceived(b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % link.encode("ascii"))
        head, _, body = wire.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(b" ")[1]), headers, body

    def assertServes(self, body: bytes, contentType: bytes = JS_CONTENT_TYPE, link: str = LINK) -> None:
        code, headers, got = self.get(link)
        self.assertEqual((code, got), (200, body))
        self.assertEqual(headers[b"etag"], etagOf(body))
        self.assertEqual(headers[b"content-type"], contentType)

    def test_winnerSortsFirst(self) -> None:
        """The tester's repro: C{aaa} wins by name; its bytes are served, not the later name's."""
        self.upsert(jsbundle("demo-inline", raw(b"demo();")), jsbundle("aaa", raw(b"hello\n")))
        self.assertEqual(self.winner(), "aaa")
        self.assertServes(b"hello\n")

    def test_winnerSortsLast(self) -> None:
        """C{other} loses by name to C{demo-inline} but sorts later: still demo-inline's bytes and ETag."""
        self.upsert(jsbundle("demo-inline", raw(b"demo();")), jsbundle("other", raw(b"other();")))
        self.assertEqual(self.winner(), "demo-inline")
        self.assertServes(b"demo();")

    def test_olderWinsWhateverTheNames(self) -> None:
        self.upsert(
            jsbundle("aaa", raw(b"young();"), created="2026-02-01T00:00:00Z"),
            jsbundle("zzz", raw(b"old();"), created="2026-01-01T00:00:00Z"),
        )
        self.assertEqual(self.winner(), "zzz")
        self.assertServes(b"old();")

    def test_loserChangeChangesNothing(self) -> None:
        self.upsert(jsbundle("demo-inline", raw(b"demo();")), jsbundle("other", raw(b"other();")))
        before = self.get()
        self.upsert(jsbundle("other", raw(b"other-v2();")))
        self.assertEqual(self.get(), before)
        self.assertServes(b"demo();")

    def test_winnerDeletedLoserTakesOverWithItsOwnBytes(self) -> None:
        self.upsert(jsbundle("aaa", raw(b"hello\n")), jsbundle("demo-inline", raw(b"demo();")))
        self.assertServes(b"hello\n")
        self.reconciler.inventory.delete("JSBundle", "aaa")
        self.reconciler.rebuild()
        self.assertEqual(self.winner(), "demo-inline")
        self.assertServes(b"demo();")
        # And back again when the winner returns.
        self.upsert(jsbundle("aaa", raw(b"hello\n")))
        self.assertServes(b"hello\n")

    def test_configMapLoser(self) -> None:
        """A loser whose bytes come from a ConfigMap does not leak them into the winner's link."""
        cm = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"namespace": "ns", "name": "cm"},
            "data": {"index.js": "cm();"},
        }
        ref = {"rawFrom": {"configMapKeyRef": {"namespace": "ns", "name": "cm", "key": "index.js"}}}
        self.upsert(cm, jsbundle("aaa", raw(b"hello\n")), jsbundle("zzz", ref))
        self.assertServes(b"hello\n")
        # The other way round: the ConfigMap bundle wins, the later-named inline one loses.
        self.reconciler.inventory.delete("JSBundle", "aaa")
        self.upsert(jsbundle("zzz-inline", raw(b"inline();")))
        self.assertEqual(self.winner(), "zzz")
        self.assertServes(b"cm();")

    def test_unresolvedLoserErrorIsNotServed(self) -> None:
        """A loser with a missing ConfigMap: its error message is not what the winner's link answers."""
        ref = {"rawFrom": {"configMapKeyRef": {"namespace": "ns", "name": "missing", "key": "index.js"}}}
        self.upsert(
            jsbundle("aaa", raw(b"hello\n"), created="2026-02-01T00:00:00Z"),
            jsbundle("zzz", ref, created="2026-01-01T00:00:00Z"),
        )
        # zzz is older but unservable, so the servable aaa keeps the link (compile's documented choice).
        self.assertEqual(self.winner(), "aaa")
        self.assertServes(b"hello\n")

    def test_urlWinnerOverInlineLoser(self) -> None:
        """The winner's bytes come from its URL even when a loser has inline bytes for the same link."""
        self.upsert(jsbundle("aaa", {"rawFrom": {"url": URL}}), jsbundle("zzz", raw(b"inline();")))
        self.assertEqual(self.winner(), "aaa")
        self.assertServes(ENDPOINT_BYTES)

    def test_inlineWinnerOverUrlLoser(self) -> None:
        self.upsert(jsbundle("aaa", raw(b"inline();")), jsbundle("zzz", {"rawFrom": {"url": URL}}))
        self.assertServes(b"inline();")

    def test_sharedEndpointServedWithTheWinnersType(self) -> None:
        """
        One URL behind a link claimed by the winner's main script and by a loser's asset of another type:
        the link answers with the winner's type (the loser's name sorting first used to decide it).
        """
        asset = {
            "rawFrom": {"url": URL},
            "assets": {"files": [{"link": LINK, "mimeType": "text/css", "url": URL}]},
        }
        self.upsert(
            jsbundle("aaa", asset, created="2026-02-01T00:00:00Z", link="/dist/aaa/index.js"),
            jsbundle("zzz", {"rawFrom": {"url": URL}}, created="2026-01-01T00:00:00Z"),
        )
        self.assertEqual(self.winner(), "zzz")
        self.assertServes(ENDPOINT_BYTES, JS_CONTENT_TYPE)
        # The loser's own (unconflicted) main link still gets JavaScript, and its asset would be CSS.
        self.assertServes(ENDPOINT_BYTES, JS_CONTENT_TYPE, link="/dist/aaa/index.js")
        self.assertEqual(self.fetcher.get(Endpoint("http", "127.0.0.1", 1, "/bundles/demo.js"), b"text/css").contentType, b"text/css")


class FetcherTypeTests(SynchronousTestCase):
    def test_oneFetchEveryType(self) -> None:
        """An endpoint used under two content types is fetched once and kept as content of each type."""
        calls: List[Endpoint] = []

        def fetch(endpoint: Endpoint):  # type: ignore[no-untyped-def]
            calls.append(endpoint)
            return succeed(b"x")

        from ksproxy.model.parse import parseResource

        fetcher = BundleFetcher(Clock(), fetch)
        one = jsbundle("one", {"rawFrom": {"url": URL}})
        two = jsbundle(
            "two", {"raw": "eA==", "assets": {"files": [{"link": "/dist/two/a.css", "mimeType": "text/css", "url": URL}]}}
        )
        bundles = [parseResource(one).obj, parseResource(two).obj]
        fetcher.reconcile(bundles)  # type: ignore[arg-type]
        endpoint = bundles[0].source.endpoint  # type: ignore[union-attr]
        self.assertEqual(len(calls), 1)
        self.assertEqual(fetcher.get(endpoint, JS_CONTENT_TYPE).contentType, JS_CONTENT_TYPE)
        self.assertEqual(fetcher.get(endpoint, b"text/css").contentType, b"text/css")
        self.assertIsNone(fetcher.get(endpoint, b"image/png"))
