"""
Tests for L{ksproxy.bundles}: content preparation, link resolution, the HTTP response rules of SPEC 5 and the
fetcher's last-good copies.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from typing import Dict, List, Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.bundles import (
    JS_CONTENT_TYPE,
    BundleFetcher,
    bundleIndex,
    bundleResponse,
    contentTypeFor,
    makeContent,
    resolveBundle,
)
from ksproxy.bundles.content import acceptsGzip
from ksproxy.http.headers import Headers
from ksproxy.model.types import (
    Asset,
    ConfigMapSource,
    Endpoint,
    EndpointSource,
    JSBundle,
    ObjectMeta,
    RawSource,
    SecretSource,
)

SCRIPT = b"console.log('hello from a bundle');\n" * 40  # compresses well
TINY = b"x()"


def bundle(
    source,
    *,
    name: str = "demo",
    link: str = "/dist/demo/index.js",
    assets=(),
    generation: int = 0,
    rv: str = "",
) -> JSBundle:
    return JSBundle(
        meta=ObjectMeta(name=name, generation=generation, resourceVersion=rv),
        source=source,
        link=link,
        linkDefaulted=False,
        assets=tuple(assets),
    )


def headerDict(headers) -> Dict[bytes, bytes]:
    out: Dict[bytes, bytes] = {}
    for name, value in headers:
        assert name.lower() not in out, name
        out[name.lower()] = value
    return out


class ContentTests(SynchronousTestCase):
    def test_etagIsStrongQuotedHash(self) -> None:
        content = makeContent(SCRIPT, JS_CONTENT_TYPE)
        self.assertEqual(content.etag, b'"' + hashlib.sha256(SCRIPT).hexdigest()[:32].encode() + b'"')
        self.assertFalse(content.etag.startswith(b"W/"))
        self.assertEqual(content.gzipEtag, content.etag[:-1] + b'-gzip"')
        self.assertEqual(
            content.integrity, "sha384-" + base64.b64encode(hashlib.sha384(SCRIPT).digest()).decode()
        )

    def test_gzipPrecomputed(self) -> None:
        content = makeContent(SCRIPT, JS_CONTENT_TYPE)
        self.assertEqual(gzip.decompress(content.gzipped), SCRIPT)
        self.assertIsNone(makeContent(TINY, JS_CONTENT_TYPE).gzipped)
        incompressible = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(64))
        self.assertIsNone(makeContent(incompressible, JS_CONTENT_TYPE).gzipped)

    def test_sharedWhileInUse(self) -> None:
        """Building the same bytes again is free: the object in use is returned."""
        first = makeContent(SCRIPT, JS_CONTENT_TYPE)
        self.assertIs(makeContent(bytes(SCRIPT), JS_CONTENT_TYPE), first)
        self.assertIsNot(makeContent(SCRIPT, b"text/plain"), first)

    def test_contentTypes(self) -> None:
        cases = [
            ("/dist/a/index.js", None, True, JS_CONTENT_TYPE),
            ("/dist/a/style.css", None, False, b"text/css; charset=utf-8"),
            ("/dist/a/f.woff2", None, False, b"font/woff2"),
            ("/dist/a/logo.svg", None, False, b"image/svg+xml; charset=utf-8"),
            ("/dist/a/chunk.mjs", None, False, b"application/javascript; charset=utf-8"),
            ("/dist/a/blob", None, False, b"application/octet-stream"),
            ("/dist/a/data.bin", "application/x-thing", False, b"application/x-thing"),
            ("/dist/a/style.css", "text/css", False, b"text/css"),
        ]
        for link, mimeType, main, expected in cases:
            self.assertEqual(contentTypeFor(link, mimeType, main=main), expected, link)


class ResolveTests(SynchronousTestCase):
    refs = {
        ("ConfigMap", "ext", "cm"): {"index.js": SCRIPT, "style.css": b"body{}"},
        ("Secret", "ext", "s"): {"index.js": TINY},
    }

    def test_sources(self) -> None:
        endpoint = Endpoint("http", "frontend.ext.svc", 80, "/dist/index.js")
        b = bundle(
            ConfigMapSource("ext", "cm", "index.js"),
            assets=[
                Asset("/dist/demo/style.css", ConfigMapSource("ext", "cm", "style.css")),
                Asset("/dist/demo/raw.txt", RawSource(b"text")),
                Asset("/dist/demo/secret.js", SecretSource("ext", "s", "index.js"), "text/javascript"),
                Asset("/dist/demo/remote.png", EndpointSource(endpoint)),
            ],
        )
        links = resolveBundle(b, self.refs)
        # The URL-sourced asset is the fetcher's business.
        self.assertEqual(
            list(links),
            ["/dist/demo/index.js", "/dist/demo/style.css", "/dist/demo/raw.txt", "/dist/demo/secret.js"],
        )
        self.assertEqual(
            (links["/dist/demo/index.js"].body, links["/dist/demo/index.js"].contentType),
            (SCRIPT, JS_CONTENT_TYPE),
        )
        self.assertEqual(links["/dist/demo/style.css"].contentType, b"text/css; charset=utf-8")
        self.assertEqual(links["/dist/demo/raw.txt"].body, b"text")
        self.assertEqual(links["/dist/demo/secret.js"].contentType, b"text/javascript")

    def test_missing(self) -> None:
        cases = [
            (ConfigMapSource("ext", "nope", "index.js"), "ConfigMap ext/nope not found"),
            (ConfigMapSource("ext", "cm", "main.js"), "ConfigMap ext/cm has no key 'main.js'"),
            (SecretSource("other", "s", "index.js"), "Secret other/s not found"),
        ]
        for source, message in cases:
            self.assertEqual(resolveBundle(bundle(source), self.refs), {"/dist/demo/index.js": message})

    def test_raw(self) -> None:
        content = resolveBundle(bundle(RawSource(TINY)), {})["/dist/demo/index.js"]
        self.assertEqual((content.body, content.contentType), (TINY, JS_CONTENT_TYPE))


class ResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.content = makeContent(SCRIPT, JS_CONTENT_TYPE)

    def respond(self, method: bytes = b"GET", *headers, content=None, main: bool = True):
        return bundleResponse(content or self.content, method, Headers(headers), main=main)

    def test_get(self) -> None:
        status, headers, body = self.respond()
        h = headerDict(headers)
        self.assertEqual((status, body), (200, SCRIPT))
        self.assertEqual(h[b"content-type"], b"application/javascript; charset=utf-8")
        self.assertEqual(h[b"content-length"], str(len(SCRIPT)).encode())
        self.assertEqual(h[b"etag"], self.content.etag)
        self.assertEqual(h[b"cache-control"], b"no-cache")
        self.assertEqual(h[b"vary"], b"Accept-Encoding")
        self.assertNotIn(b"content-encoding", h)

    def test_head(self) -> None:
        status, headers, body = self.respond(b"HEAD", (b"Accept-Encoding", b"gzip"))
        h = headerDict(headers)
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(h[b"content-length"], str(len(self.content.gzipped)).encode())
        self.assertEqual(h[b"content-encoding"], b"gzip")

    def test_otherMethods(self) -> None:
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get"):
            self.assertEqual(self.respond(method), (405, [(b"Allow", b"GET, HEAD")], b""), method)

    def test_ifNoneMatch(self) -> None:
        etag, gz = self.content.etag, self.content.gzipEtag
        cases = [
            (etag, 304),
            (b"W/" + etag, 304),  # weak comparison
            (b'"other", ' + etag, 304),
            (gz, 304),  # the tag of the other representation is the same content
            (b"*", 304),
            (b'"other"', 200),
            (etag.strip(b'"'), 200),  # unquoted is not an entity tag
        ]
        for value, expected in cases:
            status, headers, body = self.respond(b"GET", (b"If-None-Match", value))
            self.assertEqual(status, expected, value)
            if status == 304:
                h = headerDict(headers)
                self.assertEqual(body, b"")
                self.assertEqual(h[b"etag"], etag)
                self.assertNotIn(b"content-length", h)

    def test_notModifiedKeepsChosenRepresentationTag(self) -> None:
        status, headers, _ = self.respond(
            b"GET", (b"If-None-Match", self.content.gzipEtag), (b"Accept-Encoding", b"gzip")
        )
        self.assertEqual((status, headerDict(headers)[b"etag"]), (304, self.content.gzipEtag))

    def test_gzipNegotiation(self) -> None:
        cases = [
            ([b"gzip"], True),
            ([b"GZIP"], True),
            ([b"x-gzip"], True),
            ([b"deflate, gzip;q=1.0, br"], True),
            ([b"br", b"gzip"], True),  # several header lines
            ([b"*"], True),
            ([b"gzip;q=0"], False),
            ([b"*;q=0"], False),
            ([b"*, gzip;q=0"], False),
            ([b"gzip;q=0.5, identity"], False),  # identity preferred
            ([b"gzip;q=0.5, identity;q=0"], True),
            ([b"identity;q=0"], False),  # gzip was not offered
            ([b"gzip;q=abc"], False),
            ([b"gzip;q=1.5"], False),
            ([b"deflate"], False),
            ([b""], False),
            ([], False),
        ]
        for values, expected in cases:
            self.assertEqual(acceptsGzip(values), expected, values)

    def test_gzipResponse(self) -> None:
        status, headers, body = self.respond(b"GET", (b"Accept-Encoding", b"gzip, deflate"))
        h = headerDict(headers)
        self.assertEqual(status, 200)
        self.assertEqual(gzip.decompress(body), SCRIPT)
        self.assertEqual(
            (h[b"content-encoding"], h[b"vary"], h[b"etag"]),
            (b"gzip", b"Accept-Encoding", self.content.gzipEtag),
        )
        self.assertEqual(h[b"content-length"], str(len(body)).encode())

    def test_tinyNeverGzipped(self) -> None:
        tiny = makeContent(TINY, JS_CONTENT_TYPE)
        status, headers, body = self.respond(b"GET", (b"Accept-Encoding", b"gzip"), content=tiny)
        h = headerDict(headers)
        self.assertEqual((status, body), (200, TINY))
        self.assertNotIn(b"content-encoding", h)
        self.assertNotIn(b"vary", h)

    def test_asset(self) -> None:
        css = makeContent(b"body{}", b"text/css; charset=utf-8")
        status, headers, body = self.respond(content=css, main=False)
        h = headerDict(headers)
        self.assertEqual((status, body, h[b"content-type"]), (200, b"body{}", b"text/css; charset=utf-8"))
        self.assertEqual(h[b"cache-control"], b"no-cache")


class IndexTests(SynchronousTestCase):
    def test_index(self) -> None:
        content = makeContent(SCRIPT, JS_CONTENT_TYPE)
        data = json.loads(
            bundleIndex(
                [
                    (bundle(RawSource(SCRIPT), name="z", link="/dist/z/index.js", rv="42"), content),
                    (bundle(RawSource(SCRIPT), name="a", link="/dist/a/index.js"), content),
                    (
                        bundle(EndpointSource(Endpoint("http", "x", 80)), name="m", link="/dist/m/index.js"),
                        None,
                    ),
                ]
            )
        )
        self.assertEqual(
            data["bundles"],
            [
                {
                    "name": "a",
                    "link": "/dist/a/index.js",
                    "integrity": content.integrity,
                    "version": content.etag.strip(b'"')[:16].decode(),
                },
                {"name": "m", "link": "/dist/m/index.js", "integrity": None, "version": ""},
                {"name": "z", "link": "/dist/z/index.js", "integrity": content.integrity, "version": "42"},
            ],
        )


class FakeFetch:
    """Records fetches and hands out Deferreds the test fires."""

    def __init__(self) -> None:
        self.calls: List[Endpoint] = []
        self.deferreds: List[Deferred[bytes]] = []
        self.cancelled = 0

    def __call__(self, endpoint: Endpoint) -> Deferred[bytes]:
        def cancel(d: Deferred[bytes]) -> None:
            self.cancelled += 1

        d: Deferred[bytes] = Deferred(cancel)
        self.calls.append(endpoint)
        self.deferreds.append(d)
        return d


class FetcherTests(SynchronousTestCase):
    endpoint = Endpoint("http", "frontend.ext.svc", 80, "/dist/index.js")
    assetEndpoint = Endpoint("http", "frontend.ext.svc", 80, "/dist/style.css")

    def setUp(self) -> None:
        self.clock = Clock()
        self.fetch = FakeFetch()
        self.fetcher = BundleFetcher(self.clock, self.fetch)

    def bundle(self, generation: int = 1, endpoint: Optional[Endpoint] = None) -> JSBundle:
        return bundle(
            EndpointSource(endpoint or self.endpoint),
            generation=generation,
            assets=[Asset("/dist/demo/style.css", EndpointSource(self.assetEndpoint))],
        )

    def test_fetchAndKeep(self) -> None:
        self.fetcher.reconcile([self.bundle()])
        self.assertEqual(self.fetch.calls, [self.endpoint, self.assetEndpoint])
        self.assertIsNone(self.fetcher.get(self.endpoint))
        self.fetch.deferreds[0].callback(SCRIPT)
        self.fetch.deferreds[1].callback(b"body{}")
        main, asset = self.fetcher.get(self.endpoint), self.fetcher.get(self.assetEndpoint)
        self.assertEqual((main.body, main.contentType), (SCRIPT, JS_CONTENT_TYPE))
        self.assertEqual((asset.body, asset.contentType), (b"body{}", b"text/css; charset=utf-8"))
        # Unchanged bundle: nothing is fetched again, however often the table is rebuilt.
        self.fetcher.reconcile([self.bundle()])
        self.clock.advance(3600)
        self.assertEqual(len(self.fetch.calls), 2)

    def test_refetchFailureServesLastGood(self) -> None:
        self.fetcher.reconcile([self.bundle(generation=1)])
        self.fetch.deferreds[0].callback(SCRIPT)
        self.fetcher.reconcile([self.bundle(generation=2)])  # changed: refetch both links
        self.assertEqual(len(self.fetch.calls), 4)
        self.fetch.deferreds[2].errback(ConnectionRefusedError("connection refused"))
        self.assertEqual(self.fetcher.get(self.endpoint).body, SCRIPT)
        self.assertIn("connection refused", self.fetcher.error(self.endpoint))
        self.flushLoggedErrors()
        # Retried after retryDelay, not before.
        self.clock.advance(0.99)
        self.assertEqual(len(self.fetch.calls), 4)
        self.clock.advance(0.02)
        self.assertEqual(self.fetch.calls[4], self.endpoint)
        self.fetch.deferreds[4].callback(b"new()")
        self.assertEqual(self.fetcher.get(self.endpoint).body, b"new()")
        self.assertIsNone(self.fetcher.error(self.endpoint))

    def test_retryBackoff(self) -> None:
        self.fetcher.reconcile([bundle(EndpointSource(self.endpoint), generation=1)])
        times = []
        for _attempt in range(4):
            self.fetch.deferreds[-1].errback(RuntimeError("boom"))
            before = len(self.fetch.calls)
            start = self.clock.seconds()
            while len(self.fetch.calls) == before:
                self.clock.advance(0.5)
            times.append(self.clock.seconds() - start)
        self.assertEqual(times, [1.0, 2.0, 4.0, 8.0])
        self.assertIsNone(self.fetcher.get(self.endpoint))

    def test_dropCancels(self) -> None:
        self.fetcher.reconcile([self.bundle()])
        self.fetcher.reconcile([])
        self.assertEqual(self.fetch.cancelled, 2)
        self.assertIsNone(self.fetcher.get(self.endpoint))
        self.assertTrue(all(d.called for d in self.fetch.deferreds))  # failed with CancelledError, handled
        self.assertEqual(self.clock.getDelayedCalls(), [])  # and no retry scheduled

    def test_changedEndpointSupersedesPending(self) -> None:
        """A newer change wins over a fetch still running for an older one."""
        self.fetcher.reconcile([self.bundle(generation=1)])
        self.fetcher.reconcile([self.bundle(generation=2)])
        self.assertEqual(self.fetch.cancelled, 2)
        self.assertTrue(self.fetch.deferreds[0].called)  # cancelled
        self.fetch.deferreds[2].callback(b"v2()")
        self.assertEqual(self.fetcher.get(self.endpoint).body, b"v2()")
        self.assertEqual(self.fetcher.error(self.endpoint), None)

    def test_fileSourceBundlesChangeByContent(self) -> None:
        """Without a generation (file source), any change of the object is a change."""
        b = bundle(EndpointSource(self.endpoint))
        self.fetcher.reconcile([b])
        self.fetch.deferreds[0].callback(SCRIPT)
        self.fetcher.reconcile([attrs.evolve(b)])
        self.assertEqual(len(self.fetch.calls), 1)
        self.fetcher.reconcile([attrs.evolve(b, link="/dist/demo/main.js")])
        self.assertEqual(len(self.fetch.calls), 2)

    def test_refreshInterval(self) -> None:
        fetcher = BundleFetcher(self.clock, self.fetch, refreshInterval=60)
        fetcher.reconcile([bundle(EndpointSource(self.endpoint), generation=1)])
        self.fetch.deferreds[0].callback(SCRIPT)
        self.clock.advance(59)
        self.assertEqual(len(self.fetch.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.fetch.calls), 2)
        fetcher.stop()
        self.assertEqual(self.fetch.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_synchronousFetch(self) -> None:
        """A fetch function that answers at once (a cache, a test double) works too."""
        from twisted.internet.defer import succeed

        fetcher = BundleFetcher(self.clock, lambda endpoint: succeed(SCRIPT))
        fetcher.reconcile([bundle(EndpointSource(self.endpoint), generation=1)])
        self.assertEqual(fetcher.get(self.endpoint).body, SCRIPT)
