"""
ksproxy end to end on real sockets: built by the plugin's makeService over a manifest folder, with a recording
upstream on 127.0.0.1; requests through each kind of resource.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.integration.gateway import RunningGateway
from tests.util import RecordingUpstream, httpRequest, listenUpstream, rawRequest

MANIFESTS = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: APIService
metadata: {{name: v1alpha1.demo.example.io}}
spec:
  group: demo.example.io
  version: v1alpha1
  url: http://127.0.0.1:{port}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: app}}
spec:
  matcher: {{path: /proxy/app/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{port}'}}
  directives:
    stripPathPrefix: /proxy/app
    headerUp: ['X-Up: 1', '-Cookie']
    headerDown: ['X-Down yes', '-X-Secret']
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: ph}}
spec:
  matcher: {{path: /ph/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{port}'}}
  directives:
    rewrite: ['/ph/* /t/{{http.request.header.X-Target}}{{path}}?q=1']
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: disabled}}
spec:
  matcher: {{path: /off/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{port}'}}
status: {{state: Disabled}}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: JSBundle
metadata: {{name: inline}}
spec:
  raw: ZXhwb3J0IGRlZmF1bHQge307Cg==
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: JSBundle
metadata: {{name: fromcm}}
spec:
  rawFrom:
    configMapKeyRef: {{namespace: ns, name: cm, key: index.js}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{namespace: ns, name: cm}}
data:
  index.js: "console.log('cm');"
"""


class _GatewayCase(TestCase):
    """A gateway over MANIFESTS with a recording upstream."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstream = RecordingUpstream()
        self.upstream.responseHeaders = {b"X-Secret": [b"s"], b"Set-Cookie": [b"a=1", b"b=2"]}
        self.upPort, port = listenUpstream(reactor, self.upstream)
        self.gw = RunningGateway({"all.yaml": MANIFESTS.format(port=port)})
        self.upstreamPort = port
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        yield self.upPort.stopListening()


class GatewayTests(_GatewayCase):
    @defer.inlineCallbacks
    def test_apiServiceForwardsPathUnchangedWithIdentity(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield httpRequest(
            self.gw.port, "GET", "/kapis/demo.example.io/v1alpha1/things/a%2Fb?x=1&x=2&y", {"X-Remote-User": "root"}
        )
        self.assertEqual(status, 200)
        last = self.upstream.last
        self.assertEqual(last.uri, b"/kapis/demo.example.io/v1alpha1/things/a%2Fb?x=1&x=2&y")
        self.assertEqual(last.headerAll(b"x-remote-user"), [b"system:anonymous"])
        self.assertEqual(last.header(b"x-forwarded-for"), b"127.0.0.1")
        self.assertEqual(last.header(b"host"), b"127.0.0.1:%d" % self.upstreamPort)

    @defer.inlineCallbacks
    def test_reverseProxyDirectives(self):  # type: ignore[no-untyped-def]
        status, headers, _ = yield httpRequest(
            self.gw.port, "GET", "/proxy/app/%61b/x%2Fy;p?b=2&a=%2f&&c", {"Cookie": "k=v"}
        )
        self.assertEqual(status, 200)
        last = self.upstream.last
        self.assertEqual(last.uri, b"/%61b/x%2Fy;p?b=2&a=%2f&&c")
        self.assertEqual(last.header(b"x-up"), b"1")
        self.assertIsNone(last.header(b"cookie"))
        names = [k.lower() for k, _ in headers]
        self.assertIn("x-down", names)
        self.assertNotIn("x-secret", names)
        self.assertEqual([v for k, v in headers if k.lower() == "set-cookie"], ["a=1", "b=2"])

    @defer.inlineCallbacks
    def test_disabledIs503(self):  # type: ignore[no-untyped-def]
        status, headers, body = yield httpRequest(self.gw.port, "GET", "/off/x")
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["kind"], "Status")
        self.assertEqual(self.upstream.requests, [])

    @defer.inlineCallbacks
    def test_notFoundIsStatus(self):  # type: ignore[no-untyped-def]
        status, headers, body = yield httpRequest(self.gw.port, "GET", "/nothing/here")
        self.assertEqual(status, 404)
        doc = json.loads(body)
        self.assertEqual((doc["kind"], doc["code"], doc["reason"]), ("Status", 404, "NotFound"))

    @defer.inlineCallbacks
    def test_traversalCannotEscape(self):  # type: ignore[no-untyped-def]
        data = yield rawRequest(self.gw.port, b"GET /proxy/app/../../etc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 400") or data.startswith(b"HTTP/1.1 404"), data[:100])
        self.assertEqual(self.upstream.requests, [])

    @defer.inlineCallbacks
    def test_headerPlaceholderCannotClimbOutOfRewrite(self):  # type: ignore[no-untyped-def]
        """A header's "/" stays inside its segment; a header that is ".." would remove "/t": 400, not sent."""
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/ph/abc", {"X-Target": "../../admin"})
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.last.uri, b"/t/..%2F..%2Fadmin/abc?q=1")
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/ph/abc", {"X-Target": ".."})
        self.assertEqual(status, 400)
        self.assertEqual(len(self.upstream.requests), 1)

    @defer.inlineCallbacks
    def test_bundles(self):  # type: ignore[no-untyped-def]
        status, headers, body = yield httpRequest(self.gw.port, "GET", "/dist/inline/index.js")
        self.assertEqual((status, body), (200, b"export default {};\n"))
        h = {k.lower(): v for k, v in headers}
        self.assertTrue(h["content-type"].startswith("application/javascript"))
        etag = h["etag"]
        status, _, body = yield httpRequest(self.gw.port, "GET", "/dist/inline/index.js", {"If-None-Match": etag})
        self.assertEqual((status, body), (304, b""))
        status, _, body = yield httpRequest(self.gw.port, "GET", "/dist/fromcm/index.js")
        self.assertEqual((status, body), (200, b"console.log('cm');"))
        status, _, body = yield httpRequest(self.gw.port, "POST", "/dist/fromcm/index.js", body=b"x")
        self.assertEqual(status, 405)

    @defer.inlineCallbacks
    def test_editWhileServing(self):  # type: ignore[no-untyped-def]
        """A manifest edited while a client keeps sending requests: none fails, the new route appears."""
        gen = self.gw.reconciler.generation
        failures = []
        stop = []

        @defer.inlineCallbacks
        def client():  # type: ignore[no-untyped-def]
            count = 0
            while not stop and count < 400:
                status, _, _ = yield httpRequest(self.gw.port, "GET", "/proxy/app/x")
                count += 1
                if status != 200:
                    failures.append(status)

        running = client()
        extra = (
            "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: ReverseProxy\nmetadata: {name: new}\n"
            f"spec:\n  matcher: {{path: /new/*, method: GET}}\n  upstream: {{url: 'http://127.0.0.1:{self.upstreamPort}'}}\n"
        )
        self.gw.write("new.yaml", extra)
        yield self.gw.waitForGeneration(gen + 1)
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/new/thing")
        self.assertEqual(status, 200)
        self.gw.write("all.yaml", MANIFESTS.format(port=self.upstreamPort).replace("X-Up: 1", "X-Up: 2"))
        yield self.gw.waitForGeneration(gen + 2)
        stop.append(True)
        yield running
        self.assertEqual(failures, [])
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/proxy/app/x")
        self.assertEqual(self.upstream.last.header(b"x-up"), b"2")

    @defer.inlineCallbacks
    def test_readyAndDebug(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield httpRequest(self.gw.adminPort, "GET", "/readyz")
        self.assertEqual(status, 200)
        status, _, body = yield httpRequest(self.gw.adminPort, "GET", "/debug/routes")
        doc = json.loads(body)
        names = {(o["kind"], o["name"]) for o in doc["objects"]}
        self.assertIn(("ReverseProxy", "app"), names)
        status, _, body = yield httpRequest(self.gw.adminPort, "GET", "/debug/explain?method=GET&path=/proxy/app/x")
        self.assertEqual(status, 200)
        self.assertIn("app", body.decode())


class GatewayEdgeTests(_GatewayCase):
    """Loops and spoofing by header-name tricks."""

    @defer.inlineCallbacks
    def test_routeBackToItselfIsALoop(self):  # type: ignore[no-untyped-def]
        gen = self.gw.reconciler.generation
        self.gw.write(
            "loop.yaml",
            "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: ReverseProxy\nmetadata: {name: loop}\n"
            f"spec:\n  matcher: {{path: /loop/*, method: '*'}}\n  upstream: {{url: 'http://127.0.0.1:{self.gw.port}'}}\n",
        )
        yield self.gw.waitForGeneration(gen + 1)
        status, _, body = yield httpRequest(self.gw.port, "GET", "/loop/x")
        # The second pass through this ksproxy refuses; the first relays that answer.
        self.assertEqual(status, 508)
        self.assertEqual(json.loads(body)["reason"], "LoopDetected")

    @defer.inlineCallbacks
    def test_underscoreAndImpersonationHeadersDropped(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield httpRequest(
            self.gw.port,
            "GET",
            "/kapis/demo.example.io/v1alpha1/x",
            {"X_Remote_User": "admin", "Impersonate-User": "system:admin", "Impersonate-Group": "system:masters"},
        )
        self.assertEqual(status, 200)
        names = [k.lower() for k, _ in self.upstream.last.headers]
        self.assertNotIn(b"x_remote_user", names)
        self.assertNotIn(b"impersonate-user", names)
        self.assertNotIn(b"impersonate-group", names)
        self.assertEqual(self.upstream.last.headerAll(b"x-remote-user"), [b"system:anonymous"])
        self.assertEqual(len(self.upstream.last.headerAll(b"via")), 1)


class PerUpstreamTimeoutTests(TestCase):
    @defer.inlineCallbacks
    def test_overrideApplies(self):  # type: ignore[no-untyped-def]
        """spec.upstream.timeouts.responseHeader: a hanging upstream gets 504 after the override, not the default."""
        from tests.integration.faulty import ScriptedUpstream, hang

        upstream = ScriptedUpstream(hang)
        port = upstream.listen()
        self.addCleanup(upstream.cleanup)
        gw = RunningGateway(
            {
                "slow.yaml": "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: ReverseProxy\nmetadata: {name: slow}\n"
                "spec:\n  matcher: {path: /slow/*}\n"
                f"  upstream: {{url: 'http://127.0.0.1:{port}', timeouts: {{responseHeader: 300ms}}}}\n"
            },
            ["--response-header-timeout", "60s"],
        )
        yield gw.start()
        self.addCleanup(gw.stop)
        started = reactor.seconds()
        status, _, body = yield httpRequest(gw.port, "GET", "/slow/x")
        self.assertEqual(status, 504)
        self.assertLess(reactor.seconds() - started, 30)


def _bundleAt(name: str, body: bytes, link: str = "/dist/demo/index.js") -> str:
    import base64

    raw = base64.b64encode(body).decode("ascii")
    return (
        "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: JSBundle\n"
        f"metadata: {{name: {name}}}\nspec: {{raw: {raw}}}\nstatus: {{link: {link}}}\n"
    )


class BundleConflictTests(TestCase):
    """Two JSBundles on one link: the body and ETag on the wire are the conflict winner's, through changes."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.gw = RunningGateway(
            {"demo.yaml": _bundleAt("demo-inline", b"demo();"), "zconf.yaml": _bundleAt("aaa", b"hello\n")}
        )
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    @defer.inlineCallbacks
    def get(self):  # type: ignore[no-untyped-def]
        status, headers, body = yield httpRequest(self.gw.port, "GET", "/dist/demo/index.js")
        self.assertEqual(status, 200)
        return body, {k.lower(): v for k, v in headers}["etag"]

    @defer.inlineCallbacks
    def test_winnerBytes(self):  # type: ignore[no-untyped-def]
        # aaa takes precedence (same age: by name), though demo-inline sorts later.
        body, etag = yield self.get()
        self.assertEqual(body, b"hello\n")
        # The loser changes: nothing served changes.
        gen = self.gw.reconciler.generation
        self.gw.write("demo.yaml", _bundleAt("demo-inline", b"demo-v2();"))
        yield self.gw.waitForGeneration(gen + 1)
        self.assertEqual((yield self.get()), (body, etag))
        # The winner goes: the loser takes over, with its own bytes and ETag.
        gen = self.gw.reconciler.generation
        self.gw.remove("zconf.yaml")
        yield self.gw.waitForGeneration(gen + 1)
        body2, etag2 = yield self.get()
        self.assertEqual(body2, b"demo-v2();")
        self.assertNotEqual(etag2, etag)
        # A new loser named after the winner: still the winner's bytes.
        gen = self.gw.reconciler.generation
        self.gw.write("zconf.yaml", _bundleAt("other", b"other();"))
        yield self.gw.waitForGeneration(gen + 1)
        self.assertEqual((yield self.get()), (body2, etag2))
