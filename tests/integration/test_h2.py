"""
HTTP/2 clients (ALPN h2 on a C{ksproxy-tls:} listener) through a whole ksproxy: the same answers as HTTP/1.1,
streams multiplexed next to long-lived ones, and flow control both ways (bounded buffers, not timing).  The
client is the C{h2} library over a blocking TLS socket, run in threads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from ksproxy.http.h2 import H2Exchange
from tests.integration.gateway import RunningGateway
from tests.integration.test_protocols import API, MANIFESTS, RP
from tests.integration.testca import TestCA
from tests.integration.wire import listen
from tests.util import CLIENT_TIMEOUT, eventually

Response = Tuple[int, List[Tuple[bytes, bytes]], bytes]


class H2Client:
    """A blocking HTTP/2 client on one TLS connection (use from threads, one call at a time)."""

    def __init__(self, port: int, ca: TestCA, validate: bool = True) -> None:
        ctx = ssl.create_default_context(cadata=ca.certPEM.decode())
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        self.sock = ctx.wrap_socket(raw, server_hostname="a.example.test")
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.conn = h2.connection.H2Connection(
            # Without C{validate}, it sends what a hostile client would (malformed pseudo-headers and fields).
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
            )
        )
        self.conn.initiate_connection()
        self.flush()
        self.streams: Dict[int, dict] = {}
        self.autoAck = True
        self.terminated: Optional[int] = None  # the GOAWAY's error code, once the server ended the connection

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        for event in self.conn.receive_data(data):
            sid = getattr(event, "stream_id", None)
            state = self.streams.get(sid) if sid else None
            if isinstance(event, h2.events.ResponseReceived) and state is not None:
                state["headers"] = event.headers
            elif isinstance(event, h2.events.DataReceived) and state is not None:
                state["body"].append(event.data)
                state["received"] += len(event.data)
                if self.autoAck:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                else:
                    state["unacked"] += event.flow_controlled_length
            elif isinstance(event, h2.events.TrailersReceived) and state is not None:
                state["trailers"] = event.headers
            elif isinstance(event, h2.events.StreamEnded) and state is not None:
                state["ended"] = True
            elif isinstance(event, h2.events.StreamReset) and state is not None:
                state["reset"] = True
                state["resetCode"] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event.error_code
        self.flush()

    def start(
        self,
        method: str,
        path: str,
        headers=(),
        body: Optional[bytes] = None,
        more: bool = False,
        authority: bytes = b"a.example.test",
    ) -> int:  # type: ignore[no-untyped-def]
        """Open a stream; with C{more}, the body follows by L{sendBody}."""
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":path", path.encode()),
            (b":scheme", b"https"),
            (b":authority", authority),
        ]
        fields += [(k.lower(), v) for k, v in headers]
        self.streams[sid] = {
            "headers": None,
            "body": [],
            "received": 0,
            "unacked": 0,
            "ended": False,
            "reset": False,
            "resetCode": None,
            "trailers": None,
        }
        self.conn.send_headers(sid, fields, end_stream=body is None and not more)
        self.flush()
        if body is not None:
            self.sendBody(sid, body)
        return sid

    def sendBody(self, sid: int, body: bytes) -> None:
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self._pump()  # wait for a WINDOW_UPDATE
                continue
            self.conn.send_data(sid, bytes(view[:window]))
            view = view[window:]
            self.flush()
        self.conn.end_stream(sid)
        self.flush()

    def waitFor(self, sid: int, key: str, atLeast: int = 1) -> dict:
        state = self.streams[sid]
        while not (state["ended"] or state["reset"]) and not (
            state[key] if key != "received" else state["received"] >= atLeast
        ):
            self._pump()
        return state

    def finish(self, sid: int) -> Response:
        state = self.waitFor(sid, "ended")
        headers = state["headers"] or []
        status = int(dict(headers)[b":status"])
        return status, [(k, v) for k, v in headers if not k.startswith(b":")], b"".join(state["body"])

    def request(self, method: str, path: str, headers=(), body: Optional[bytes] = None) -> Response:  # type: ignore[no-untyped-def]
        return self.finish(self.start(method, path, headers, body))

    def ackAll(self, sid: int) -> None:
        self.autoAck = True
        state = self.streams[sid]
        if state["unacked"]:
            self.conn.acknowledge_received_data(state["unacked"], sid)
            state["unacked"] = 0
            self.flush()

    def close(self) -> None:
        self.sock.close()


def _http1(
    port: int, ca: TestCA, method: str, path: str, headers=(), body: Optional[bytes] = None
) -> Response:  # type: ignore[no-untyped-def]
    ctx = ssl.create_default_context(cadata=ca.certPEM.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT, context=ctx)
    conn._context.check_hostname = False  # type: ignore[attr-defined]
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", "a.example.test")
    for k, v in headers:
        conn.putheader(k.decode(), v.decode())
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, [(k.lower().encode(), v.encode()) for k, v in resp.getheaders()], data


# Headers whose values must agree between the two protocols (others are per-connection or per-hop).
_COMPARED = (b"content-type", b"set-cookie", b"etag", b"x-down", b"cache-control")


def _comparable(response: Response) -> tuple:
    status, headers, body = response
    picked = sorted((k, v) for k, v in headers if k in _COMPARED)
    if body.startswith(b"{"):
        body = json.loads(body)  # a Status: compare as data
    return status, picked, body


class H2Tests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.ca = TestCA()
        self.dir = tempfile.mkdtemp(prefix="ksproxy-h2-")
        self.addCleanup(shutil.rmtree, self.dir)
        self.ca.writePair(self.dir, "a", ["a.example.test"])
        self.upstream, self.upPort, port = listen(reactor)
        self.gw = RunningGateway(
            {"all.yaml": MANIFESTS.format(port=port)},
            ["--listen", f"ksproxy-tls:port=0:interface=127.0.0.1:certDir={self.dir}"],
        )
        yield self.gw.start()
        self.client = yield threads.deferToThread(H2Client, self.gw.port, self.ca)

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        self.client.close()
        yield self.gw.stop()
        yield self.upPort.stopListening()

    def call(self, f, *args):  # type: ignore[no-untyped-def]
        return threads.deferToThread(f, *args)

    def h2proto(self):  # type: ignore[no-untyped-def]
        [proto] = [p for p in self.gw.service.factory.connections if p._h2 is not None]
        return proto._h2

    def waitFor(self, condition, what: str, steady: int = 1):  # type: ignore[no-untyped-def]
        return eventually(condition, what, steady=steady)

    @defer.inlineCallbacks
    def test_sameAnswersAsHTTP1(self):  # type: ignore[no-untyped-def]
        cases = [
            ("GET", API + "things?x=1&&y", (), None),
            ("GET", RP + "a%2Fb;p?q=%2f", ((b"cookie", b"k=v"),), None),
            ("POST", API + "echo", ((b"content-type", b"application/json"),), b'{"a": 1}' * 1000),
            ("PUT", RP + "echo", (), b"z" * 300000),
            ("HEAD", API + "head", (), None),
            ("GET", API + "nocontent", (), None),
            ("GET", RP + "notmodified", (), None),
            ("GET", RP + "cookies", (), None),
            ("GET", "/no/route", (), None),
            ("GET", "/proxy/app/%2e%2e/%2e%2e/%2e%2e/x", (), None),
        ]
        for method, path, headers, body in cases:
            one = yield self.call(_http1, self.gw.port, self.ca, method, path, headers, body)
            two = yield self.call(self.client.request, method, path, headers, body)
            self.assertEqual(_comparable(two), _comparable(one), f"{method} {path}")
        # The upstream saw HTTP/1.1 requests built the same way (apart from per-hop headers).
        self.assertEqual(self.upstream.last.method, b"GET")

    @defer.inlineCallbacks
    def test_requestShape(self):  # type: ignore[no-untyped-def]
        yield self.call(
            self.client.request,
            "GET",
            RP + "x?a=1",
            (
                (b"cookie", b"a=1"),
                (b"cookie", b"b=2"),
                (b"x-remote-user", b"spoofed"),
                (b"x-multi", b"1"),
                (b"x-multi", b"2"),
            ),
        )
        seen = self.upstream.last
        self.assertEqual(seen.target, b"/x?a=1")
        self.assertIsNone(seen.header(b"cookie"))  # the route's headerUp deletes it
        self.assertEqual(seen.headerAll(b"x-multi"), [b"1", b"2"])
        self.assertEqual(seen.headerAll(b"x-remote-user"), [b"system:anonymous"])
        self.assertEqual(seen.header(b"x-forwarded-host"), b"a.example.test")
        self.assertEqual(seen.header(b"x-forwarded-proto"), b"https")
        yield self.call(self.client.request, "GET", API + "x", ((b"cookie", b"a=1"), (b"cookie", b"b=2")))
        self.assertEqual(self.upstream.last.headerAll(b"cookie"), [b"a=1; b=2"])  # RFC 9113 8.2.3

    @defer.inlineCallbacks
    def test_streamsNextToAWatch(self):  # type: ignore[no-untyped-def]
        """A watch stays open on one stream while other requests come and go on the same connection."""
        sid = yield self.call(self.client.start, "GET", API + "watch?watch=true")
        state = yield self.call(self.client.waitFor, sid, "received", 1)
        self.assertIn(b'"name":"p1"', b"".join(state["body"]))
        self.assertFalse(state["ended"])
        status, _, body = yield self.call(self.client.request, "GET", RP + "other")
        self.assertEqual((status, body), (200, b"GET /other 0"))
        [stream] = self.upstream.streams
        stream.push(self.upstream.firstEvent("watch", 2))
        stream.end()
        status, headers, body = yield self.call(self.client.finish, sid)
        self.assertEqual(status, 200)
        self.assertIn(b'"name":"p2"', body)

    @defer.inlineCallbacks
    def test_resetStreamAbortsUpstream(self):  # type: ignore[no-untyped-def]
        sid = yield self.call(self.client.start, "GET", RP + "sse")
        yield self.call(self.client.waitFor, sid, "received", 1)
        [stream] = self.upstream.streams

        def reset() -> None:
            self.client.conn.reset_stream(sid)
            self.client.flush()

        yield self.call(reset)
        yield self.waitFor(lambda: not stream.transport.connected, "the upstream connection to be dropped")
        status, _, body = yield self.call(self.client.request, "GET", API + "after")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_uploadFlowControl(self):  # type: ignore[no-untyped-def]
        """The upstream stops reading: ksproxy stops opening the stream's window, holding about one window."""
        # More than the kernel holds for the stalled upstream socket (send buffer up to tcp_wmem's 4 MiB here):
        # ksproxy writes through to the socket, so its own buffer only fills once the kernel's is full.
        size = 12 << 20
        sid = yield self.call(
            self.client.start, "PUT", RP + "slowread", ((b"content-length", b"%d" % size),), None, True
        )

        # The body goes in a thread of its own: it blocks when the window is shut.
        sending = self.call(self.client.sendBody, sid, b"u" * size)
        yield self.waitFor(lambda: self.upstream.slowReaders, "the upstream to get the request")
        h2conn = self.h2proto()
        [h2stream] = h2conn.streams.values()

        def held() -> int:
            exchange = h2stream._request.exchange
            return sum(len(c) for c, _ in h2stream._inboundDataBuffer if isinstance(c, bytes)) + sum(
                map(len, exchange._held)
            )

        yield self.waitFor(lambda: not h2stream.producing, "the stream to be paused", steady=5)
        self.assertLess(held(), 256 * 1024)
        self.assertLessEqual(h2conn.conn.inbound_flow_control_window, 65535 * 2)
        [slow] = self.upstream.slowReaders
        slow.resumeReading()
        yield sending
        status, _, body = yield self.call(self.client.finish, sid)
        self.assertEqual((status, body), (200, b"PUT /slowread %d" % size))
        self.assertEqual(slow.seen.bodyBytes, size)

    @defer.inlineCallbacks
    def test_downloadFlowControl(self):  # type: ignore[no-untyped-def]
        """The client stops granting window: ksproxy pauses the upstream instead of queueing the response."""
        size = 8 << 20
        self.client.autoAck = False
        sid = yield self.call(self.client.start, "GET", API + f"big?size={size}")
        yield self.call(self.client.waitFor, sid, "received", 65535)
        yield self.waitFor(lambda: self.upstream.bigWriters, "the upstream to start sending")
        sender = self.upstream.bigWriters[0].transport.producer
        yield self.waitFor(lambda: sender.paused, "the upstream to be paused", steady=5)
        h2conn = self.h2proto()
        exchange = next(iter(h2conn.streams.values()))._request.exchange
        self.assertIsInstance(exchange, H2Exchange)
        self.assertTrue(exchange.congestedByClient)
        queued = sum(len(c) for q in h2conn._outboundStreamQueues.values() for c in q if isinstance(c, bytes))
        self.assertLess(queued, 1 << 20)
        self.assertGreater(sender.left, 0)

        def drain() -> int:
            self.client.ackAll(sid)
            state = self.client.waitFor(sid, "ended")
            return state["received"]

        received = yield self.call(drain)
        self.assertEqual(received, size)

    @defer.inlineCallbacks
    def test_limits(self):  # type: ignore[no-untyped-def]
        many = tuple((b"x-h%d" % i, b"v") for i in range(200))
        status, headers, body = yield self.call(self.client.request, "GET", API + "x", many)
        self.assertEqual((status, json.loads(body)["reason"]), (431, "RequestHeaderFieldsTooLarge"))
        status, headers, body = yield self.call(self.client.request, "GET", API + "x" * 20000)
        self.assertEqual((status, json.loads(body)["code"]), (414, 414))
        status, headers, body = yield self.call(
            self.client.request, "GET", API + "y", ((b"expect", b"nothing"),)
        )
        self.assertEqual(status, 417)
        # Over --max-header-bytes (64 KiB here) in bytes rather than fields: a 431 too, as over HTTP/1.1.
        status, headers, body = yield self.call(self.client.request, "GET", API + "x", ((b"x-big", b"v" * 70000),))
        self.assertEqual(status, 431)
        # The connection survives refusals of single streams.
        status, _, _ = yield self.call(self.client.request, "GET", API + "ok")
        self.assertEqual(status, 200)
        self.assertNotIn(b"x-h1", [k for k, _ in self.upstream.last.headers])

    @defer.inlineCallbacks
    def test_malformedRequestsRefused(self):  # type: ignore[no-untyped-def]
        """
        What HTTP/1.1 refuses in its request line or Host is refused on its stream with a 400 (RFC 9113 8.1.1),
        never forwarded: C{:method} and C{:path} would become the upstream's request line.
        """
        client = yield self.call(H2Client, self.gw.port, self.ca, False)
        self.addCleanup(client.close)

        def ask(method: str, path: str, authority: bytes) -> Response:
            return client.finish(client.start(method, path, (), None, False, authority))

        cases = [
            ("GET /admin HTTP/1.1", RP + "x", b"a.example.test", "invalid request method"),
            ("GET\t/admin", RP + "x", b"a.example.test", "invalid request method"),
            ("get", RP + "x", b"a.example.test", "invalid request method"),
            ("FROB", RP + "x", b"a.example.test", "invalid request method"),
            ("GET", RP + "x HTTP/1.1", b"a.example.test", "invalid request target"),
            ("GET", RP + "x\x01", b"a.example.test", "invalid request target"),
            ("GET", RP + "x", b"a.example.test foo", "invalid :authority"),
            ("GET", RP + "x", b"a.example.test/admin", "invalid :authority"),
        ]
        before = len(self.upstream.requests)
        for method, path, authority, message in cases:
            status, _, body = yield self.call(ask, method, path, authority)
            self.assertEqual((status, json.loads(body)["message"]), (400, message), (method, path, authority))
        self.assertEqual(len(self.upstream.requests), before)
        # Single streams refused: the connection goes on.
        status, _, body = yield self.call(ask, "PATCH", RP + "x", b"a.example.test:443")
        self.assertEqual((status, body), (200, b"PATCH /x 0"))

    @defer.inlineCallbacks
    def test_controlCharactersEndTheConnection(self):  # type: ignore[no-untyped-def]
        """CR, LF or NUL in any field: h2 ends the connection (PROTOCOL_ERROR), nothing is forwarded."""

        def send(path: str, headers, authority: bytes) -> Optional[int]:  # type: ignore[no-untyped-def]
            client = H2Client(self.gw.port, self.ca, validate=False)
            try:
                state = client.streams[client.start("GET", path, headers, None, False, authority)]
                while client.terminated is None and not (state["ended"] or state["reset"]):
                    client._pump()
            except ConnectionError:
                pass
            finally:
                client.close()
            return client.terminated

        cases = [
            (RP + "x\r\nX-Injected: 1", (), b"a.example.test"),
            (RP + "x\x00", (), b"a.example.test"),
            (RP + "x", ((b"x-a", b"1\r\nx-injected: 1"),), b"a.example.test"),
            (RP + "x", ((b"x-a", b"1\nx"),), b"a.example.test"),
            (RP + "x", ((b"x-a", b"1\x00"),), b"a.example.test"),
            (RP + "x", (), b"a.example.test\r\nx-injected: 1"),
        ]
        before = len(self.upstream.requests)
        for path, headers, authority in cases:
            code = yield self.call(send, path, headers, authority)
            self.assertEqual(code, ErrorCodes.PROTOCOL_ERROR, (path, headers, authority))
        self.assertEqual(len(self.upstream.requests), before)

    @defer.inlineCallbacks
    def test_truncatedResponseIsAnError(self):  # type: ignore[no-untyped-def]
        """An upstream gone after the head: RST_STREAM with INTERNAL_ERROR, never NO_ERROR (a complete look)."""
        sid = yield self.call(self.client.start, "GET", RP + "sse")
        yield self.call(self.client.waitFor, sid, "received", 1)
        [stream] = self.upstream.streams
        stream.transport.loseConnection()  # no last chunk: the response is cut short
        state = yield self.call(self.client.waitFor, sid, "ended")
        self.assertEqual((state["ended"], state["reset"]), (False, True))
        self.assertEqual(state["resetCode"], ErrorCodes.INTERNAL_ERROR)
        status, _, _ = yield self.call(self.client.request, "GET", API + "after")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_curl(self):  # type: ignore[no-untyped-def]
        """curl (nghttp2) negotiates h2 and gets the same answer as over HTTP/1.1."""
        curl = shutil.which("curl")
        if curl is None:
            raise self.skipTest("curl is not installed")
        caFile = os.path.join(self.dir, "ca.pem")
        with open(caFile, "wb") as f:
            f.write(self.ca.certPEM)
        url = f"https://a.example.test:{self.gw.port}{RP}echo?x=1"
        outputs = []
        for flag in ("--http2", "--http1.1"):
            out = yield threads.deferToThread(
                subprocess.run,
                [
                    curl,
                    "-s",
                    flag,
                    "--cacert",
                    caFile,
                    "--resolve",
                    f"a.example.test:{self.gw.port}:127.0.0.1",
                    "-X",
                    "POST",
                    "--data-binary",
                    "hello",
                    "-w",
                    "\\n%{http_version} %{http_code}",
                    url,
                ],
                capture_output=True,
                timeout=CLIENT_TIMEOUT,
            )
            outputs.append(out.stdout)
        self.assertEqual(outputs[0], b"POST /echo?x=1 5\n2 200")
        self.assertEqual(outputs[1], b"POST /echo?x=1 5\n1.1 200")
