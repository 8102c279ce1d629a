"""
Hostile and malformed input (SPEC 2.1, 6, 9): request smuggling shapes, size limits, slow headers, traversal and
encoded-slash tricks, CR/LF injection through header rules.  Each refusal is a Kubernetes Status JSON, the
connection is closed where the byte stream can no longer be trusted, and no upstream ever receives a complete
request that ksproxy refused.
"""

from __future__ import annotations

import json
from typing import List, Optional, Tuple

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ksproxy.http.server import LINGER_IDLE, LINGER_TOTAL, HTTPServerFactory, ServerLimits
from tests.integration.gateway import RunningGateway
from tests.integration.wire import listen, splitResponse
from tests.util import rawRequest

MANIFESTS = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: app}}
spec:
  matcher: {{path: /proxy/app/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{app}'}}
  directives:
    stripPathPrefix: /proxy/app
    headerUp:
      - 'X-Path: {{path}}'
      - 'X-Query: {{query}}'
      - 'X-Echo: {{http.request.header.X-In}}'
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: admin}}
spec:
  matcher: {{path: /admin/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{admin}'}}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: injected}}
spec:
  matcher: {{path: /injected/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{admin}'}}
  directives:
    headerUp: ["X-A: a\\r\\nX-Injected: 1"]
"""

GOOD = b"GET /proxy/app/ok HTTP/1.1\r\nHost: x\r\n\r\n"

# (name, raw request, expected status).  Each is sent on a fresh connection after a good request warmed the
# upstream pool, so a head that passed would be forwarded at once.
SMUGGLING: List[Tuple[str, bytes, int]] = [
    (
        "CL then TE",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE then CL",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "two different CLs",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    (
        "two equal CLs",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    ("CL list", b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    ("CL with sign", b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", 400),
    ("negative CL", b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (
        "chunk size not hex",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk size 0x",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk size overflow",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk size then space",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk without CRLF",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
        400,
    ),
    (
        "chunk with bare LF",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        400,
    ),
    (
        "TE chunked, identity",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("TE gzip only", b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    # A coding before chunked would be dropped on the way upstream (the body goes on decoded from chunked only).
    (
        "TE gzip, chunked",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        501,
    ),
    (
        "TE gzip then TE chunked",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        501,
    ),
    ("TE xchunked", b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\nabc", 400),
    (
        "TE twice",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE in HTTP/1.0",
        b"POST /proxy/app/a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "space before colon",
        b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
        400,
    ),
    ("tab before colon", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nX-A\t: b\r\n\r\n", 400),
    ("obs-fold", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    (
        "obs-fold in trailer",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n 2\r\n\r\n",
        400,
    ),
    ("bare LF request line", b"GET /proxy/app/a HTTP/1.1\nHost: x\n\n", 400),
    ("bare LF header", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    ("bare CR header", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
    ("NUL in value", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    ("leading space first header", b"GET /proxy/app/a HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    ("bad header name", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n", 400),
    ("space in target", b"GET /proxy/app/a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("control in target", b"GET /proxy/app/a\tb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("HTTP/2.0 line", b"GET /proxy/app/a HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /proxy/app/a\r\n\r\n", 400),
    ("missing Host", b"GET /proxy/app/a HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    ("Host unclosed IPv6", b"GET /proxy/app/a HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    ("Host port not digits", b"GET /proxy/app/a HTTP/1.1\r\nHost: x:abc\r\n\r\n", 400),
    ("Host with a path", b"GET /proxy/app/a HTTP/1.1\r\nHost: x/y\r\n\r\n", 400),
    ("Host with userinfo", b"GET /proxy/app/a HTTP/1.1\r\nHost: u@x\r\n\r\n", 400),
    ("Host bare IPv6", b"GET /proxy/app/a HTTP/1.1\r\nHost: ::1\r\n\r\n", 400),
    ("lower-case method", b"get /proxy/app/a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", 405),
    (
        "Expect other",
        b"POST /proxy/app/a HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
        417,
    ),
    (
        "smuggled after a good one",
        GOOD
        + b"POST /admin/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
]


def _lastResponse(data: bytes) -> Tuple[int, dict, bytes]:
    last = data[data.rfind(b"HTTP/1.1 ") :]
    status, headers, body = splitResponse(last)
    return int(status.split()[1]), headers, body


class _GatewayCase(TestCase):
    extraArgs: List[str] = []

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.app, self.appPort, app = listen(reactor)
        self.admin, self.adminPort, admin = listen(reactor)
        self.gw = RunningGateway({"all.yaml": MANIFESTS.format(app=app, admin=admin)}, self.extraArgs)
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        yield self.appPort.stopListening()
        yield self.adminPort.stopListening()

    def assertStatus(self, data: bytes, code: int, closed: bool = True) -> dict:
        got, headers, body = _lastResponse(data)
        self.assertEqual(got, code, data[:300])
        doc = json.loads(body)
        self.assertEqual(
            (doc["kind"], doc["apiVersion"], doc["status"], doc["code"]), ("Status", "v1", "Failure", code)
        )
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        if closed:
            self.assertEqual(headers.get(b"connection"), [b"close"])
        return doc


class SmugglingTests(_GatewayCase):
    @defer.inlineCallbacks
    def test_refusedAndClosed(self):  # type: ignore[no-untyped-def]
        """Every shape: 400 (or 405/417), Status JSON, connection closed, nothing complete upstream."""
        data = yield rawRequest(
            self.gw.port, GOOD + b"GET /proxy/app/ok2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(data.count(b"HTTP/1.1 200"), 2)  # the pool now holds a live connection
        warm = len(self.app.requests)
        for name, raw, code in SMUGGLING:
            # rawRequest reads until the server closes: a refusal that left the connection open would time out.
            data = yield rawRequest(self.gw.port, raw)
            try:
                self.assertStatus(data, code)
            except Exception as e:
                raise AssertionError(f"{name}: {e}") from e
        extra = self.app.requests[warm:]
        # Only the good request in front of the smuggled one may have arrived complete, nothing else.
        # (Whether it did depends on timing: the stream was cut when the smuggled one came, maybe before.)
        self.assertLessEqual({r.target for r in extra if r.complete}, {b"/ok"})
        self.assertEqual([r for r in self.admin.requests if r.complete], [])

    @defer.inlineCallbacks
    def test_badChunkAfterHeadAbortsUpstream(self):  # type: ignore[no-untyped-def]
        """The head was fine and already forwarded: a bad chunk later cuts the upstream request short."""
        yield rawRequest(self.gw.port, GOOD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        data = yield rawRequest(
            self.gw.port,
            b"POST /proxy/app/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        self.assertStatus(data, 400)
        ups = [r for r in self.app.requests if r.target == b"/up"]
        self.assertTrue(all(not r.complete for r in ups), ups)


class LimitTests(_GatewayCase):
    extraArgs = ["--max-url-bytes", "2048", "--max-header-bytes", "8192"]

    @defer.inlineCallbacks
    def test_limits(self):  # type: ignore[no-untyped-def]
        cases = [
            ("long URL", b"GET /proxy/app/" + b"a" * 2100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            ("long query", b"GET /proxy/app/a?" + b"q=1&" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (
                "big header",
                b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n",
                431,
            ),
            (
                "many headers",
                b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * 200 + b"\r\n",
                431,
            ),
            # A header line that never ends: llhttp would hold it all; the head budget stops it.
            ("endless line", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 200000, 431),
            ("endless name", b"GET /proxy/app/a HTTP/1.1\r\nHost: x\r\nX" + b"x" * 200000, 431),
        ]
        for name, raw, code in cases:
            data = yield rawRequest(self.gw.port, raw)
            try:
                self.assertStatus(data, code)
            except Exception as e:
                raise AssertionError(f"{name}: {e}") from e
        self.assertEqual(self.app.requests, [])
        # Just under the limits is fine.
        data = yield rawRequest(
            self.gw.port,
            b"GET /proxy/app/"
            + b"a" * 1900
            + b" HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"v" * 7000
            + b"\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:200])
        # Upstream response heads get the same limit (502 above it).
        self.assertEqual(self.gw.service.pool.maxHeadBytes, 8192)


# (target, expected code, which upstream: "app", "admin" or None, path the upstream sees)
TRAVERSAL: List[Tuple[bytes, int, Optional[str], Optional[bytes]]] = [
    (b"/proxy%2Fapp/x", 404, None, None),
    (b"/proxy%2fapp/x", 404, None, None),
    (b"/admin%2Fx", 404, None, None),
    (b"/%61dmin%2Fsecret", 404, None, None),
    (b"/proxy/app/..%2f..%2fadmin/secret", 200, "app", b"/..%2f..%2fadmin/secret"),
    (b"/proxy/app/%2e%2e%2f%2e%2e%2fadmin", 200, "app", b"/%2e%2e%2f%2e%2e%2fadmin"),
    (b"/proxy/app/..\\..\\admin", 200, "app", b"/..\\..\\admin"),
    (b"/proxy/app/%252e%252e/%252e%252e/admin", 200, "app", b"/%252e%252e/%252e%252e/admin"),
    (b"/proxy/app/../../../admin/x", 400, None, None),
    (b"/proxy/app/%2e%2e/%2e%2e/%2e%2e/admin", 400, None, None),
    (b"/%2e%2e/admin/x", 400, None, None),
    (b"/proxy/app/a/%2e%2e/b", 200, "app", b"/b"),
    # Leaves the app prefix by dot-segments: matched (and authorised) as what it names, and sent as matched.
    (b"/proxy/app/%2e%2e/%2e%2e/admin/x", 200, "admin", b"/admin/x"),
    (b"/proxy/app/x%00", 400, None, None),
    (b"/proxy/app/x%2500", 200, "app", b"/x%2500"),
    (b"//admin/x", 404, None, None),
]


class TraversalTests(_GatewayCase):
    @defer.inlineCallbacks
    def test_cannotReachAnotherRoute(self):  # type: ignore[no-untyped-def]
        for target, code, where, seenPath in TRAVERSAL:
            before = {"app": len(self.app.requests), "admin": len(self.admin.requests)}
            data = yield rawRequest(
                self.gw.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target
            )
            got, _, _ = _lastResponse(data)
            label = target.decode("latin-1")
            self.assertEqual(got, code, f"{label}: {data[:200]!r}")
            if code != 200:
                self.assertStatus(data, code)
            for name, up in (("app", self.app), ("admin", self.admin)):
                new = up.requests[before[name] :]
                if name == where:
                    self.assertEqual([r.target for r in new], [seenPath], label)
                else:
                    self.assertEqual(new, [], f"{label} reached {name}")


class InjectionTests(_GatewayCase):
    @defer.inlineCallbacks
    def test_headerRulesCannotInjectCRLF(self):  # type: ignore[no-untyped-def]
        # A rule with CR/LF in it is rejected when loaded: its route is not served at all.
        data = yield rawRequest(
            self.gw.port, b"GET /injected/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertStatus(data, 404)
        self.assertEqual(self.admin.requests, [])
        # Placeholders carry client bytes into header values: encoded CR/LF stays encoded, nothing is split.
        data = yield rawRequest(
            self.gw.port,
            b"GET /proxy/app/a%0d%0aX-Injected:%201?q=%0d%0aX-Injected:%201 HTTP/1.1\r\nHost: x\r\n"
            b"X-In: v\tw\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:200])
        seen = self.app.last
        self.assertIsNone(seen.header(b"x-injected"))
        self.assertEqual(seen.header(b"x-path"), b"/a%0d%0aX-Injected:%201")
        self.assertEqual(seen.header(b"x-query"), b"q=%0d%0aX-Injected:%201")
        self.assertEqual(seen.header(b"x-echo"), b"v\tw")
        for name, value in seen.headers:
            self.assertNotIn(b"\r", name + value)
            self.assertNotIn(b"\n", name + value)


# -- the engine alone, on a StringTransport and a Clock -------------------------------------------------------


class _Echo:
    def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
        exchange.discardBody()
        exchange.writeHead(200, [(b"Content-Type", b"text/plain")], length=2)
        exchange.write(b"ok")
        exchange.finish()


class _Raises:
    def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


class _Transport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class EngineLimitTests(SynchronousTestCase):
    """Timers on both sides of their limits, and failures inside the handler, without sockets."""

    def connect(self, handler=None, tls: bool = False, **limits):  # type: ignore[no-untyped-def]
        self.clock = Clock()
        values = {"headerTimeout": 10.0, "keepAliveTimeout": 100.0}
        values.update(limits)
        factory = HTTPServerFactory(handler or _Echo(), self.clock, ServerLimits(**values))
        proto = factory.buildProtocol(None)
        transport = _Transport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        transport.TLS = tls
        proto.makeConnection(transport)
        return proto, transport

    def assert408(self, transport: StringTransport) -> None:
        status, headers, body = splitResponse(transport.value())
        self.assertEqual(status, b"HTTP/1.1 408 Request Timeout")
        self.assertEqual(json.loads(body)["reason"], "Timeout")
        self.assertTrue(transport.disconnecting)

    def test_slowHeadersGet408(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHo")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2)
        self.assert408(transport)

    def test_drippingBytesDoesNotExtendTheLimit(self) -> None:
        proto, transport = self.connect()
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 123":
            proto.dataReceived(bytes([byte]))
            self.clock.advance(0.275)
        self.assertAlmostEqual(self.clock.seconds(), 9.9)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"4")
        self.clock.advance(0.2)
        self.assert408(transport)

    def test_partialMethodGets408(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GE")
        self.clock.advance(10.1)
        self.assert408(transport)

    def test_silentNewConnectionHasTheHeaderTimeout(self) -> None:
        """A client that connects and says nothing holds the socket for the header timeout, not the keep-alive."""
        proto, transport = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_idleKeepAliveClosedQuietly(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        transport.clear()
        self.clock.advance(99.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_headersInTimeAreServed(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(9.9)
        proto.dataReceived(b"Host: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        # Idle keep-alive from now on: the header clock does not fire.
        self.clock.advance(50)
        self.assertFalse(transport.disconnecting)

    def test_nextRequestHeadIsTimedFromItsFirstByte(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHo")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        transport.clear()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assert408(transport)

    def test_handlerErrorIsStatus500(self) -> None:
        proto, transport = self.connect(_Raises())
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = splitResponse(transport.value())
        self.assertEqual(status, b"HTTP/1.1 500 Internal Server Error")
        doc = json.loads(body)
        self.assertEqual((doc["kind"], doc["code"], doc["message"]), ("Status", 500, "internal error"))
        self.assertNotIn(b"Traceback", transport.value())
        self.assertNotIn(b"boom", transport.value())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_closeWhileClientCongested(self) -> None:
        """A response finished while the client was not reading still closes the connection."""
        proto, transport = self.connect()
        proto.pauseProducing()  # the transport's buffer is full
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_tlsCloseDoesNotWaitForever(self) -> None:
        """A TLS close waits for the client's close_notify, but not longer than a grace period."""
        proto, transport = self.connect(tls=True)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.clock.advance(4.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)

    def test_tlsCloseGraceCancelledWhenClosed(self) -> None:
        proto, transport = self.connect(tls=True)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _AnswersEarly:
    """Answers at once and leaves the request body unread: an upstream that answered before the body was in."""

    def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
        exchange.writeHead(413, [(b"Content-Type", b"text/plain")], length=2)
        exchange.write(b"no")
        exchange.finish()


class _HalfClosingTransport(_Transport):
    """A TCP-like test transport: it can close its write side alone."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class LingeringCloseTests(SynchronousTestCase):
    """
    Closing while the client may still be sending (RFC 9112 9.6): our side closes, what still arrives is read
    and dropped until the client closes, for at most LINGER_IDLE between reads and LINGER_TOTAL in all.
    """

    def connect(self, handler=None, tls: bool = False):  # type: ignore[no-untyped-def]
        self.clock = Clock()
        factory = HTTPServerFactory(handler or _AnswersEarly(), self.clock, ServerLimits())
        proto = factory.buildProtocol(None)
        # (lenient: the rest of a read is parsed after a close, and pausing a closing transport is harmless)
        transport = _HalfClosingTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555), lenient=True)
        transport.TLS = tls
        proto.makeConnection(transport)
        return proto, transport

    def assertLingering(self, transport: _HalfClosingTransport) -> None:
        self.assertTrue(transport.writeClosed)
        self.assertFalse(transport.disconnecting)
        self.assertFalse(transport.aborted)
        self.assertEqual(transport.producerState, "producing")  # reading, whatever paused it before

    def test_anEarlyAnswerLingersUntilTheClientIsQuiet(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        status, headers, body = splitResponse(transport.value())
        self.assertEqual((status, body), (b"HTTP/1.1 413 Content Too Large", b"no"))
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertLingering(transport)
        transport.clear()
        self.clock.advance(LINGER_IDLE - 0.1)
        proto.dataReceived(b"x" * 50000 + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")  # dropped, not parsed
        self.assertEqual(transport.value(), b"")
        self.clock.advance(LINGER_IDLE - 0.1)
        self.assertLingering(transport)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aClientThatKeepsSendingIsCutOffAfterTheTotal(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(int(LINGER_TOTAL) - 1):
            self.clock.advance(1.0)
            proto.dataReceived(b"x" * 1000)
        self.assertLingering(transport)
        self.clock.advance(1.1)
        self.assertTrue(transport.aborted)

    def test_theClientClosingEndsIt(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nxx")
        self.assertLingering(transport)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aRejectedRequestLingers(self) -> None:
        """A malformed request: the client may be sending more of it, or more requests behind it."""
        proto, transport = self.connect(_Echo())
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        answered = transport.value()
        self.assertTrue(answered.startswith(b"HTTP/1.1 200 "), answered)
        self.assertEqual(answered.count(b"HTTP/1.1 400 Bad Request"), 1, answered)
        self.assertLingering(transport)
        transport.clear()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)  # behind the malformed one: dropped
        self.assertEqual(transport.value(), b"")

    def test_nothingIsAnsweredAfterTheEarlyAnswerInTheSameRead(self) -> None:
        """
        The rest of the read that held the answered request is not parsed: neither a malformed tail (a second,
        400 answer) nor a pipelined request (dispatched on a closing connection) may follow the answer.
        """
        for tail in [b"zz\r\n", b"5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n"]:
            proto, transport = self.connect()
            proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + tail)
            status, headers, body = splitResponse(transport.value())
            self.assertEqual((status, body), (b"HTTP/1.1 413 Content Too Large", b"no"), tail)
            self.assertLingering(transport)

    def test_aConnectionCloseAnswerWithoutABodyClosesAtOnce(self) -> None:
        """Nothing more can come: the plain close, as before."""
        proto, transport = self.connect(_Echo())
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.writeClosed)

    def test_aDiscardedBodyOfAConnectionCloseRequestLingers(self) -> None:
        """The client said it will close, but it is still sending the body the gateway answered without."""
        proto, transport = self.connect(_Echo())
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 9\r\n\r\nxx")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertLingering(transport)

    def test_tlsClosesAsBefore(self) -> None:
        """TLS has its own close (close_notify, then a grace period): no half-close under it."""
        proto, transport = self.connect(tls=True)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nxx")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.writeClosed)


class ArrivalDeadlineTests(SynchronousTestCase):
    """
    A new connection's first deadline (the header timeout) is kept by one factory timer for all new
    connections, not a DelayedCall each: the deadlines are the same as with a timer per connection.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = HTTPServerFactory(_Echo(), self.clock, ServerLimits(headerTimeout=10.0, keepAliveTimeout=100.0))

    def connect(self):  # type: ignore[no-untyped-def]
        proto = self.factory.buildProtocol(None)
        transport = _Transport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        proto.makeConnection(transport)
        return proto, transport

    def test_eachSilentConnectionClosesAtItsOwnDeadlineWithOneTimer(self) -> None:
        transports = []
        for _ in range(5):
            transports.append(self.connect()[1])
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
            self.clock.advance(1.0)
        # Connection i arrived at t=i and must close at t=i+10, not before.
        for i, transport in enumerate(transports):
            self.clock.advance(10.0 + i - self.clock.seconds() - 0.01)
            self.assertFalse(transport.disconnecting, i)
            self.clock.advance(0.02)
            self.assertTrue(transport.disconnecting, i)
            self.assertTrue(all(not t.disconnecting for t in transports[i + 1 :]))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aSlowHeadStillGets408AtItsDeadline(self) -> None:
        _, early = self.connect()
        self.clock.advance(3.0)
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHo")
        self.clock.advance(7.0 + 0.01)  # the first one's deadline: the second is not due yet
        self.assertTrue(early.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(3.0)
        status, _, _ = splitResponse(transport.value())
        self.assertEqual(status, b"HTTP/1.1 408 Request Timeout")

    def test_aRequestAndCloseLeaveNoTimer(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory._arrivals, {})

    def test_aKeepAliveConnectionMovesToItsOwnTimer(self) -> None:
        proto, transport = self.connect()
        quiet, quietTransport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertFalse(transport.disconnecting)
        self.assertNotIn(proto, self.factory._arrivals)
        self.clock.advance(10.01)
        self.assertTrue(quietTransport.disconnecting)  # header timeout
        self.assertFalse(transport.disconnecting)  # keep-alive: 100 s
        self.clock.advance(90.0)
        self.assertTrue(transport.disconnecting)

    def test_stoppingTheListenerKeepsTheDeadlines(self) -> None:
        _, transport = self.connect()
        self.clock.advance(4.0)
        self.factory.doStart()
        self.factory.doStop()
        self.clock.advance(5.99)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.02)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
