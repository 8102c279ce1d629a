"""
Every kind of HTTP traffic the console, kubectl and extension back ends use, through a whole ksproxy on
127.0.0.1, by both an APIService and a ReverseProxy route: WebSocket and SPDY upgrades (kubectl exec), SSE and
watch streams relayed as they arrive, 100-continue, HEAD/204/304, trailers, several Set-Cookie headers, and
request and response bodies streamed with backpressure (bounded buffers, not timing).
"""

from __future__ import annotations

import json

import websocket
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from ksproxy.http.upstream import UpstreamConnection
from tests.integration.gateway import RunningGateway
from tests.integration.wire import StreamClient, listen, splitResponse
from tests.util import eventually

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
    headerDown: ['X-Down: yes']
    authProxy: true
"""

API = "/kapis/demo.example.io/v1alpha1/"
RP = "/proxy/app/"
ROUTES = (API, RP)


def _upstreamPath(prefix: str, rest: str) -> bytes:
    return ((prefix if prefix == API else "/") + rest).encode()


def _connectedUpstreams() -> list:
    """
    The open upstream connections, found through the reactor (not C{gc.get_objects}: objects that lived
    through a route-table build are frozen out of the collector's sight, and it does not list them).
    """
    found = []
    for transport in set(reactor.getReaders()) | set(reactor.getWriters()):
        proto = getattr(transport, "protocol", None)
        proto = getattr(proto, "_wrappedProtocol", proto)
        if isinstance(proto, UpstreamConnection) and proto.connected:
            found.append(proto)
    return found


def _buffered(transport) -> int:  # type: ignore[no-untyped-def]
    """Bytes a Twisted TCP transport holds in user space, not yet written to the socket."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class ProtocolTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstream, self.upPort, port = listen(reactor)
        self.gw = RunningGateway({"all.yaml": MANIFESTS.format(port=port)})
        yield self.gw.start()
        self.clients = []

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        for c in self.clients:
            c.close()
        yield self.gw.stop()
        yield self.upPort.stopListening()

    def client(self) -> StreamClient:
        c = StreamClient(self.gw.port)
        self.clients.append(c)
        return c

    def waitFor(self, condition, what: str, steady: int = 1):  # type: ignore[no-untyped-def]
        return eventually(condition, what, steady=steady)

    # -- upgrades ----------------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_websocket(self):  # type: ignore[no-untyped-def]
        """A real WebSocket client through both routes; identity and header rules on the upgrade request."""
        for prefix in ROUTES:

            def talk(prefix=prefix):  # type: ignore[no-untyped-def]
                ws = websocket.create_connection(
                    f"ws://127.0.0.1:{self.gw.port}{prefix}ws?follow=1",
                    header=["X-Remote-User: spoofed", "Cookie: k=v"],
                    timeout=10,
                )
                try:
                    ws.send("hello")
                    first = ws.recv()
                    ws.send_binary(b"\x00\x01" * 40000)
                    second = ws.recv()
                    return ws.getheaders(), first, second
                finally:
                    ws.close()

            headers, first, second = yield threads.deferToThread(talk)
            self.assertEqual(first, "echo:hello")
            self.assertEqual(second, b"echo:" + b"\x00\x01" * 40000)
            seen = self.upstream.last
            self.assertEqual(seen.target, _upstreamPath(prefix, "ws?follow=1"))
            self.assertEqual(seen.header(b"upgrade").lower(), b"websocket")
            self.assertIn(b"upgrade", seen.header(b"connection").lower())
            self.assertEqual(seen.headerAll(b"x-remote-user"), [b"system:anonymous"])
            self.assertEqual(headers.get("x-upstream"), "ws")
            if prefix == RP:
                self.assertEqual(seen.header(b"x-up"), b"1")
                self.assertIsNone(seen.header(b"cookie"))
                self.assertEqual(headers.get("x-down"), "yes")

    @defer.inlineCallbacks
    def test_spdyUpgrade(self):  # type: ignore[no-untyped-def]
        """kubectl exec's shape: Upgrade: SPDY/3.1, a 101, then raw bytes both ways."""
        for prefix in ROUTES:
            c = self.client()
            yield c.send(
                b"POST %sexec?command=sh&stdin=true HTTP/1.1\r\nHost: kube\r\nConnection: Upgrade\r\n"
                b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
                b"X-Remote-Group: system:masters\r\n\r\n" % prefix.encode()
            )
            data = yield c.readUntil(b"\r\n\r\n")
            status, headers, rest = splitResponse(data)
            self.assertEqual(status, b"HTTP/1.1 101 Switching Protocols")
            self.assertEqual(headers[b"upgrade"], [b"SPDY/3.1"])
            self.assertEqual(headers[b"x-stream-protocol-version"], [b"v4.channel.k8s.io"])
            c.data = rest
            frame = b"\x80\x03\x00\x01\x00\x00\x00\x10" + bytes(range(256))
            yield c.send(frame)
            data = yield c.readUntil(b"echo:" + frame)
            self.assertIn(b"echo:" + frame, data)
            yield c.send(b"second")
            data = yield c.readUntil(b"echo:second")
            self.assertIn(b"echo:second", data)
            seen = self.upstream.last
            self.assertEqual(seen.target, _upstreamPath(prefix, "exec?command=sh&stdin=true"))
            self.assertEqual(seen.headerAll(b"x-remote-user"), [b"system:anonymous"])
            self.assertNotIn(b"system:masters", seen.headerAll(b"x-remote-group"))
            self.assertEqual(seen.header(b"upgrade"), b"SPDY/3.1")

    @defer.inlineCallbacks
    def test_refusedUpgradeIsRelayedAndClosed(self):  # type: ignore[no-untyped-def]
        c = self.client()
        yield c.send(
            b"GET %srefuse HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n"
            % API.encode()
        )
        data = yield c.readAll()
        status, headers, body = splitResponse(data)
        self.assertEqual(status, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(body, b"no upgrade here")

    # -- long-lived streams --------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_streamsRelayedAsTheyArrive(self):  # type: ignore[no-untyped-def]
        """SSE and a watch: the client has the first event while the upstream has not finished."""
        for prefix in ROUTES:
            for word, marker in (("sse", b'data: {"n": %d}'), ("watch", b'"name":"p%d"')):
                self.upstream.streams.clear()
                c = self.client()
                yield c.send(
                    b"GET %s%s?watch=true HTTP/1.1\r\nHost: x\r\n\r\n" % (prefix.encode(), word.encode())
                )
                data = yield c.readUntil(marker % 1)
                self.assertIn(marker % 1, data)
                self.assertIn(b"Transfer-Encoding: chunked", data)
                [stream] = self.upstream.streams
                self.assertTrue(stream.transport.connected)  # still open: nothing was waiting for the end
                stream.push(self.upstream.firstEvent(word, 2))
                data = yield c.readUntil(marker % 2)
                self.assertIn(marker % 2, data)
                stream.end()
                data = yield c.readUntil(b"0\r\n\r\n")
                self.assertTrue(data.endswith(b"0\r\n\r\n"), data[-40:])
                c.close()

    # -- framing: 100-continue, HEAD, 204, 304, trailers, cookies ----------------------------------------------

    @defer.inlineCallbacks
    def test_expectContinue(self):  # type: ignore[no-untyped-def]
        for prefix in ROUTES:
            for word in ("continue", "echo"):
                c = self.client()
                yield c.send(
                    b"PUT %s%s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n"
                    b"Connection: close\r\n\r\n" % (prefix.encode(), word.encode())
                )
                data = yield c.readUntil(b"\r\n\r\n")
                self.assertTrue(data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), data)
                yield c.send(b"hello")
                data = yield c.readAll()
                self.assertEqual(data.count(b"100 Continue"), 1, data)
                final = data[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
                status, _, body = splitResponse(final)
                self.assertEqual(status, b"HTTP/1.1 200 OK")
                self.assertTrue(body.endswith(b" 5"), body)
                self.assertEqual(self.upstream.last.bodyBytes, 5)

    @defer.inlineCallbacks
    def test_expectContinueRefusedWithoutContinue(self):  # type: ignore[no-untyped-def]
        c = self.client()
        yield c.send(b"PUT /nowhere HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        data = yield c.readUntil(b"}")
        status, headers, body = splitResponse(data)
        self.assertEqual(status, b"HTTP/1.1 404 Not Found")
        self.assertNotIn(b"100 Continue", data)
        self.assertEqual(json.loads(body)["kind"], "Status")

    @defer.inlineCallbacks
    def test_noBodyResponses(self):  # type: ignore[no-untyped-def]
        """HEAD, 204 and 304 carry no body, and the connection stays usable for the next request."""
        for prefix in ROUTES:
            p = prefix.encode()
            c = self.client()
            yield c.send(
                b"HEAD %shead HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET %snocontent HTTP/1.1\r\nHost: x\r\n\r\n"
                b'GET %snotmodified HTTP/1.1\r\nHost: x\r\nIf-None-Match: "v1"\r\n\r\n'
                b"GET %shead HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (p, p, p, p)
            )
            data = yield c.readAll()
            responses = data.split(b"HTTP/1.1 ")[1:]
            self.assertEqual(len(responses), 4, data)
            head, nocontent, notmodified, get = (b"HTTP/1.1 " + r for r in responses)
            status, headers, body = splitResponse(head)
            self.assertEqual((status, headers[b"content-length"], body), (b"HTTP/1.1 200 OK", [b"11"], b""))
            status, headers, body = splitResponse(nocontent)
            self.assertEqual((status, body), (b"HTTP/1.1 204 No Content", b""))
            self.assertNotIn(b"content-length", headers)
            self.assertNotIn(b"transfer-encoding", headers)
            status, headers, body = splitResponse(notmodified)
            self.assertEqual((status, headers[b"etag"], body), (b"HTTP/1.1 304 Not Modified", [b'"v1"'], b""))
            self.assertNotIn(b"transfer-encoding", headers)
            status, headers, body = splitResponse(get)
            self.assertEqual((status, body), (b"HTTP/1.1 200 OK", b"hello world"))
            c.close()

    @defer.inlineCallbacks
    def test_trailers(self):  # type: ignore[no-untyped-def]
        for prefix in ROUTES:
            c = self.client()
            yield c.send(
                b"GET %strailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n"
                % prefix.encode()
            )
            data = yield c.readAll()
            status, headers, body = splitResponse(data)
            self.assertEqual(headers[b"transfer-encoding"], [b"chunked"])
            self.assertEqual(body, b"6\r\npart1,\r\n5\r\npart2\r\n0\r\nX-Checksum: abc123\r\n\r\n")
            # TE is hop-by-hop: it does not travel on, whatever the client said.
            self.assertIsNone(self.upstream.last.header(b"te"))

    @defer.inlineCallbacks
    def test_multipleSetCookie(self):  # type: ignore[no-untyped-def]
        for prefix in ROUTES:
            c = self.client()
            yield c.send(b"GET %scookies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % prefix.encode())
            data = yield c.readAll()
            _, headers, body = splitResponse(data)
            self.assertEqual(
                headers[b"set-cookie"],
                [b"a=1; Path=/", b"b=2, c=3", b"d=4; Expires=Wed, 21 Oct 2015 07:28:00 GMT"],
            )
            self.assertEqual(body, b"ok")

    # -- backpressure ---------------------------------------------------------------------------------------------

    def _serverProtocol(self):  # type: ignore[no-untyped-def]
        [proto] = list(self.gw.service.factory.connections)
        return proto

    @defer.inlineCallbacks
    def test_uploadBackpressure(self):  # type: ignore[no-untyped-def]
        """The upstream stops reading: ksproxy stops reading the client, holding at most a few buffers."""
        size = 8 << 20
        c = self.client()
        yield c.send(
            b"PUT %sslowread HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (RP.encode(), size)
        )
        sending = c.send(b"u" * size)
        yield self.waitFor(lambda: self.upstream.slowReaders, "the upstream to get the request")
        proto = self._serverProtocol()

        def proxyPaused() -> bool:
            return proto.transport not in reactor.getReaders()

        yield self.waitFor(proxyPaused, "ksproxy to stop reading the client", steady=5)
        conns = _connectedUpstreams()
        self.assertEqual(len(conns), 1)
        self.assertLess(_buffered(conns[0].transport), 256 * 1024)
        self.assertEqual(proto._current._held, [])
        [slow] = self.upstream.slowReaders
        self.assertLess(slow.seen.bodyBytes, size)
        slow.resumeReading()
        yield sending
        data = yield c.readUntil(b"%d" % size)
        self.assertIn(b"HTTP/1.1 200 OK", data)
        self.assertEqual(slow.seen.bodyBytes, size)

    @defer.inlineCallbacks
    def test_downloadBackpressure(self):  # type: ignore[no-untyped-def]
        """The client stops reading: ksproxy stops reading the upstream, which then pauses its producer."""
        size = 16 << 20
        c = self.client()
        yield c.send(
            b"GET %sbig?size=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (API.encode(), size)
        )
        yield self.waitFor(lambda: self.upstream.bigWriters, "the upstream to start sending")
        [writer] = self.upstream.bigWriters
        sender = writer.transport.producer
        yield self.waitFor(lambda: sender.paused, "the upstream to be paused", steady=5)
        proto = self._serverProtocol()
        self.assertTrue(proto.congested)
        self.assertLess(_buffered(proto.transport), 1 << 20)
        self.assertGreater(sender.left, 0)
        total = yield c.readCount(size + 4096)
        head, _, _ = c.data.partition(b"\r\n\r\n")
        self.assertEqual(total - len(head) - 4, size)
        self.assertGreater(sender.pauses, 0)
