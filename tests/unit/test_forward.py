"""
L{ProxyCall} in memory: a real client-side protocol and real upstream connections over StringTransports, a
pool whose connection attempts the test completes by hand, and every timer on a task.Clock, checked just before
and just after its limit.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.http.server import HTTPServerFactory
from ksproxy.http.upstream import UpstreamConnection, UpstreamPool
from ksproxy.model.types import Endpoint
from ksproxy.proxy.forward import ProxyCall, Timeouts, UpstreamRequest, stripHopByHop
from tests.util import capturedLog

UP = Endpoint("http", "10.0.0.1", 8080)
T = Timeouts(connect=5.0, responseHeader=30.0, idle=60.0, tunnelIdle=300.0)
EPS = 0.01


class Wire(StringTransport):
    """A StringTransport that remembers how it was closed; the test delivers connectionLost with L{lose}."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.aborted = False
        self.protocol = None
        self.lost = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def lose(self, reason: Optional[Failure] = None) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(reason or Failure(ConnectionDone()))  # type: ignore[union-attr]

    @property
    def closed(self) -> bool:
        return self.disconnecting


class FakePool(UpstreamPool):
    """Connection attempts wait for the test: L{accept} opens one over a L{Wire}, L{refuse} fails it."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__(clock)
        self.attempts: List[defer.Deferred] = []
        self.cancelled = 0

    def connect(self, endpoint: Endpoint) -> defer.Deferred:
        def cancel(d: defer.Deferred) -> None:
            self.cancelled += 1

        d: defer.Deferred = defer.Deferred(cancel)
        d.key = endpoint.key  # type: ignore[attr-defined]
        self.attempts.append(d)
        self.active += 1

        def failed(f: Failure) -> Failure:
            self.active -= 1
            return f

        d.addErrback(failed)
        return d

    def accept(self) -> Tuple[UpstreamConnection, Wire]:
        d = next(a for a in self.attempts if not a.called)
        conn = UpstreamConnection(self, d.key)  # type: ignore[attr-defined]
        wire = Wire()
        wire.protocol = conn
        conn.makeConnection(wire)
        d.callback(conn)
        return conn, wire

    def refuse(self) -> None:
        d = next(a for a in self.attempts if not a.called)
        d.errback(ConnectionRefusedError("refused"))


class Health:
    def __init__(self) -> None:
        self.events: List[str] = []

    def passiveFailure(self, key: tuple) -> None:
        self.events.append("fail")

    def passiveSuccess(self, key: tuple) -> None:
        self.events.append("ok")


class Forward:
    """The handler: forward everything to UP."""

    def __init__(self, pool: UpstreamPool, clock: task.Clock, timeouts: Timeouts, health: Health) -> None:
        self.pool, self.clock, self.timeouts, self.health = pool, clock, timeouts, health
        self.calls: List[ProxyCall] = []

    def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
        headers = exchange.headers
        upgrade = headers.get(b"upgrade") if exchange.upgrade else None
        stripHopByHop(headers)
        if upgrade is not None:
            headers.add(b"Connection", b"Upgrade")
            headers.add(b"Upgrade", upgrade)
        headers.set(b"Host", UP.hostport.encode())
        call = ProxyCall(
            exchange,
            UpstreamRequest(UP, exchange.method, exchange.target, headers, None, upgrade),
            self.pool,
            self.clock,
            self.timeouts,
            self.health,
        )
        self.calls.append(call)
        call.start()


class ForwardTestCase(SynchronousTestCase):
    timeouts = T

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = FakePool(self.clock)
        self.health = Health()
        self.handler = Forward(self.pool, self.clock, self.timeouts, self.health)
        self.factory = HTTPServerFactory(self.handler, self.clock)
        self.client = self.connectClient()

    def connectClient(self) -> Wire:
        proto = self.factory.buildProtocol(None)
        wire = Wire()
        wire.protocol = proto
        proto.makeConnection(wire)
        return wire

    def send(self, data: bytes, client: Optional[Wire] = None) -> None:
        (client or self.client).protocol.dataReceived(data)  # type: ignore[union-attr]

    def get(self, path: bytes = b"/x", client: Optional[Wire] = None, method: bytes = b"GET") -> None:
        self.send(b"%s %s HTTP/1.1\r\nHost: gw\r\n\r\n" % (method, path), client)

    def answered(self, client: Optional[Wire] = None) -> bytes:
        return (client or self.client).value()

    def assertStatus(self, code: int, client: Optional[Wire] = None) -> None:
        head = self.answered(client).split(b"\r\n", 1)[0]
        self.assertEqual(head, b"HTTP/1.1 %d %s" % (code, head.split(b" ", 2)[2]), self.answered(client))


class ConnectTests(ForwardTestCase):
    def test_connectTimeoutBothSides(self) -> None:
        self.get()
        self.clock.advance(T.connect - EPS)
        self.assertEqual(self.answered(), b"")
        self.clock.advance(2 * EPS)
        self.assertStatus(504)
        self.assertIn(b"did not accept the connection in time", self.answered())
        self.assertEqual(self.pool.cancelled, 1)
        self.assertEqual(self.pool.active, 0)
        self.assertEqual(self.health.events, ["fail"])

    def test_refusedIs502(self) -> None:
        self.get()
        self.pool.refuse()
        self.assertStatus(502)
        self.assertIn(b"refused the connection", self.answered())
        # Only the client's keep-alive timer is left (the connect timer is gone), and it keeps its limit.
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.func, self.client.protocol._timedOut)
        self.clock.advance(self.factory.limits.keepAliveTimeout - EPS)
        self.assertFalse(self.client.closed)
        self.clock.advance(2 * EPS)
        self.assertTrue(self.client.closed)

    def test_clientGoneWhileConnectingCancelsTheAttempt(self) -> None:
        self.get()
        self.client.lose()
        self.assertEqual(self.pool.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ResponseHeaderTimeoutTests(ForwardTestCase):
    def test_bothSides(self) -> None:
        self.get()
        _, up = self.pool.accept()
        self.assertTrue(up.value().startswith(b"GET /x HTTP/1.1\r\n"))
        self.clock.advance(T.responseHeader - EPS)
        self.assertEqual(self.answered(), b"")
        self.clock.advance(2 * EPS)
        self.assertStatus(504)
        self.assertTrue(up.aborted)
        self.assertEqual(self.health.events, ["fail"])

    def test_slowHeadersWithinTheLimit(self) -> None:
        self.get()
        conn, _ = self.pool.accept()
        self.clock.advance(T.responseHeader / 2)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Le")
        self.clock.advance(T.responseHeader / 2 - EPS)
        conn.dataReceived(b"ngth: 2\r\n\r\nok")
        self.assertStatus(200)
        self.assertTrue(self.answered().endswith(b"\r\n\r\nok"))
        self.assertEqual(self.pool.idleCount(), 1)
        self.assertEqual(self.health.events, ["ok"])

    def test_uploadKeepsTheHeaderTimerFresh(self) -> None:
        """A slow upload is activity: the header timer counts from the last body byte sent."""
        self.send(b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\n")
        conn, up = self.pool.accept()
        for chunk in (b"a", b"b", b"c"):
            self.clock.advance(T.responseHeader - EPS)
            self.send(chunk)
        self.assertEqual(self.answered(), b"")
        self.send(b"d")
        self.assertTrue(up.value().endswith(b"\r\n\r\nabcd"))
        self.clock.advance(T.responseHeader + EPS)
        self.assertStatus(504)


class ResponseHeadLimitTests(ForwardTestCase):
    """An upstream's response head (and trailers) are bounded: a head that never ends is cut, not buffered."""

    def test_endlessHeadInManyReads(self) -> None:
        from ksproxy.http.upstream import MAX_RESPONSE_HEAD

        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        sent = 0
        while not up.aborted and sent < 4 * MAX_RESPONSE_HEAD:
            conn.dataReceived(line * 8)
            sent += len(line) * 8
        self.assertTrue(up.aborted)
        self.assertLess(sent, MAX_RESPONSE_HEAD + 3 * len(line) * 8)
        self.assertStatus(502)
        self.assertIn(b"malformed response", self.answered())

    def test_oneHugeHeaderLine(self) -> None:
        """llhttp holds an unfinished line: no on_header call ever comes, the read count still cuts it."""
        from ksproxy.http.upstream import MAX_RESPONSE_HEAD

        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        for _ in range(2 * MAX_RESPONSE_HEAD // 16384 + 2):
            if up.aborted:
                break
            conn.dataReceived(b"b" * 16384)
        self.assertTrue(up.aborted)
        self.assertStatus(502)

    def test_bigButBoundedHeadAndBodyInOneRead(self) -> None:
        """Body bytes in the same read as the head do not count against the head."""
        self.get()
        conn, up = self.pool.accept()
        body = b"z" * 600_000
        conn.dataReceived(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * 60_000 + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertFalse(up.aborted)
        self.assertStatus(200)
        self.assertTrue(self.answered().endswith(body))

    def test_headOverTheLimitInOneReadIs502(self) -> None:
        """A whole oversized head in one read: never relayed, and the connection is not pooled."""
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(up.aborted)
        self.assertStatus(502)
        self.assertIn(b"response headers larger than 65536 bytes", self.answered())
        self.assertNotIn(b"X-Big", self.answered())
        self.assertEqual(self.pool.idleCount(), 0)

    def test_headOverTheLimitInSocketSizedReadsIs502(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        data = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 2\r\n\r\nok"
        for i in range(0, len(data), 65536):
            if up.aborted:
                break
            conn.dataReceived(data[i : i + 65536])
        self.assertTrue(up.aborted)
        self.assertStatus(502)
        self.assertEqual(self.pool.idleCount(), 0)

    def test_manyHeadersOverTheLimitAre502(self) -> None:
        """Counted as names plus values, not only per line: many small headers add up."""
        self.get()
        conn, up = self.pool.accept()
        lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(1000))
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 0\r\n\r\n")
        self.assertTrue(up.aborted)
        self.assertStatus(502)

    def test_thePoolsLimitIsTheOneApplied(self) -> None:
        """ksproxy run passes --max-header-bytes to the pool; its connections use it."""
        self.pool.maxHeadBytes = 8192
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 6000 + b"\r\nContent-Length: 2\r\n\r\nok")
        self.assertStatus(200)
        self.assertEqual(self.pool.idleCount(), 1)
        self.client.clear()
        self.get()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(up.aborted)
        self.assertStatus(502)
        self.assertIn(b"larger than 8192 bytes", self.answered())
        self.assertEqual(len(self.pool.attempts), 1)  # a malformed answer is not retried

    def test_endlessTrailers(self) -> None:
        from ksproxy.http.upstream import MAX_RESPONSE_HEAD

        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        line = b"X-Trailer: " + b"t" * 1000 + b"\r\n"
        for _ in range(MAX_RESPONSE_HEAD // len(line) + 2):
            if up.aborted:
                break
            conn.dataReceived(line)
        self.assertTrue(up.aborted)
        self.assertTrue(self.client.disconnecting)  # mid-response: the client sees it incomplete


class RequestBodyOverheadTests(ForwardTestCase):
    """Chunk extensions and trailers carry no body: a client cannot stream them without end."""

    def streamUntilClosed(self, prefix: bytes, filler: bytes) -> int:
        self.send(b"POST /up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.pool.accept()
        self.send(prefix)
        sent = 0
        while not self.client.disconnecting and sent < 8 * 1024 * 1024:
            self.send(filler)
            sent += len(filler)
        return sent

    def test_endlessTrailerLine(self) -> None:
        sent = self.streamUntilClosed(b"2\r\nok\r\n0\r\nX-T: ", b"a" * 8192)
        self.assertTrue(self.client.disconnecting)
        self.assertLess(sent, 512 * 1024)
        self.assertIn(b"431", self.answered().split(b"\r\n", 1)[0])

    def test_endlessChunkExtension(self) -> None:
        sent = self.streamUntilClosed(b"2;ext=", b"e" * 8192)
        self.assertTrue(self.client.disconnecting)
        self.assertLess(sent, 512 * 1024)

    def test_manySmallChunksAreFine(self) -> None:
        """Tiny chunks are mostly framing, but each read carries body bytes: never refused."""
        self.send(b"POST /up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        _, up = self.pool.accept()
        for _ in range(100_000):
            self.send(b"1\r\nx\r\n")
        self.send(b"0\r\n\r\n")
        self.assertFalse(self.client.disconnecting)
        self.assertTrue(up.value().endswith(b"1\r\nx\r\n0\r\n\r\n"))


class ResponseBodyOverheadTests(ForwardTestCase):
    def test_endlessTrailerLineFromTheUpstream(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
        sent = 0
        while not up.aborted and sent < 8 * 1024 * 1024:
            conn.dataReceived(b"a" * 8192)
            sent += 8192
        self.assertTrue(up.aborted)
        self.assertLess(sent, 512 * 1024)
        self.assertTrue(self.client.disconnecting)  # the client sees the response cut short


class PooledTimerTests(ForwardTestCase):
    """On a pooled connection the call's timer lives on the connection: no DelayedCall per request."""

    def answerOn(self, conn: UpstreamConnection) -> None:
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def test_noDelayedCallPerRequest(self) -> None:
        self.get()
        conn, _ = self.pool.accept()
        self.answerOn(conn)
        scheduled: List[object] = []
        real = self.clock.callLater
        self.clock.callLater = lambda *a, **kw: scheduled.append(a) or real(*a, **kw)  # type: ignore[method-assign]
        for _ in range(5):
            self.get()
            self.answerOn(conn)
        self.assertEqual(scheduled, [])
        self.assertEqual(self.answered().count(b"HTTP/1.1 200 OK"), 6)

    def test_aLaterRequestTimesOutOnItsOwnDeadline(self) -> None:
        """The timer left by the first request fires early for the second, which waits for what is left."""
        self.get()
        conn, up = self.pool.accept()
        self.answerOn(conn)
        self.clock.advance(T.responseHeader / 2)
        self.get()
        self.clock.advance(T.responseHeader / 2 + EPS)  # the first request's deadline passed: still waiting
        self.assertEqual(self.answered().count(b"HTTP/1.1"), 1)
        self.assertFalse(up.aborted)
        self.clock.advance(T.responseHeader / 2 - 3 * EPS)
        self.assertEqual(self.answered().count(b"HTTP/1.1"), 1)
        self.clock.advance(3 * EPS)
        self.assertIn(b"HTTP/1.1 504", self.answered())
        self.assertTrue(up.aborted)

    def test_aShorterLimitMovesTheTimerSooner(self) -> None:
        """After a long idle limit (a stream), the next request's shorter header limit still fires on time."""
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")  # idle limit (60 s) runs
        conn.dataReceived(b"ok")
        self.get()
        self.clock.advance(T.responseHeader - EPS)
        self.assertFalse(up.aborted)
        self.clock.advance(2 * EPS)
        self.assertTrue(up.aborted)
        self.assertIn(b"HTTP/1.1 504", self.answered())

    def test_lostConnectionLeavesNoTimer(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        self.answerOn(conn)
        up.lose()
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func == conn._timerFired], [])


class IdleTimeoutTests(ForwardTestCase):
    def start(self) -> UpstreamConnection:
        self.get(b"/watch")
        conn, _ = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        return conn

    def test_streamingThatKeepsMovingIsNeverCut(self) -> None:
        conn = self.start()
        for _ in range(20):  # 20 idle periods in total, never one without a byte
            self.clock.advance(T.idle - EPS)
            conn.dataReceived(b"5\r\nevent\r\n")
        self.assertFalse(self.client.disconnecting)
        self.assertEqual(self.answered().count(b"event"), 20)

    def test_silentStreamIsAborted(self) -> None:
        conn = self.start()
        conn.dataReceived(b"5\r\nevent\r\n")
        self.clock.advance(T.idle - EPS)
        self.assertFalse(self.client.aborted)
        self.clock.advance(2 * EPS)
        # The head went out: the client must see an incomplete response, not an error page or a clean end.
        self.assertTrue(self.client.aborted)
        self.assertNotIn(b"0\r\n\r\n", self.answered())
        self.assertTrue(conn.transport.aborted)  # type: ignore[attr-defined]

    def test_slowClientSuspendsTheIdleTimer(self) -> None:
        """While the client is not reading we are the ones idle: no timeout, and the upstream is paused."""
        conn = self.start()
        self.client.protocol.pauseProducing()  # type: ignore[union-attr]
        self.assertEqual(conn.transport.producerState, "paused")  # type: ignore[attr-defined]
        self.clock.advance(T.idle * 3)
        self.assertFalse(self.client.aborted)
        self.client.protocol.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(conn.transport.producerState, "producing")  # type: ignore[attr-defined]
        self.clock.advance(T.idle - EPS)
        self.assertFalse(self.client.aborted)
        self.clock.advance(2 * EPS)
        self.assertTrue(self.client.aborted)

    def test_noIdleTimeoutConfigured(self) -> None:
        self.handler.timeouts = Timeouts(connect=5.0, responseHeader=30.0, idle=None, tunnelIdle=None)
        conn = self.start()
        self.clock.advance(T.idle * 100)
        self.assertFalse(self.client.aborted)
        conn.dataReceived(b"0\r\n\r\n")
        self.assertTrue(self.answered().endswith(b"0\r\n\r\n"))


class TunnelTests(ForwardTestCase):
    def start(self) -> Tuple[UpstreamConnection, Wire]:
        self.send(b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        conn, up = self.pool.accept()
        self.assertIn(b"\r\nUpgrade: websocket\r\n", up.value())
        conn.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        self.assertStatus(101)
        self.client.clear()
        up.clear()
        return conn, up

    def test_bytesEitherWayKeepTheTunnel(self) -> None:
        conn, up = self.start()
        for i in range(10):
            self.clock.advance(T.tunnelIdle - EPS)
            if i % 2:
                self.send(b"ping")
            else:
                conn.dataReceived(b"pong")
        self.assertFalse(self.client.disconnecting)
        self.assertEqual(self.answered(), b"pong" * 5)
        self.assertEqual(up.value(), b"ping" * 5)
        # Longer than the plain idle limit is fine for a tunnel.
        self.assertGreater(T.tunnelIdle, T.idle)

    def test_bytesRightBehindTheUpgradeRequestReachTheTunnel(self) -> None:
        """A client may send its first frames without waiting for the 101: they go through once it comes."""
        for pooled in (False, True):
            if pooled:  # a warm pool: the request is attached while the same read is being parsed
                self.get()
                conn, up = self.pool.accept()
                conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            client = self.connectClient()
            self.send(b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nEARLY", client)
            if not pooled:
                conn, up = self.pool.accept()
            up.clear()
            conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            self.assertStatus(101, client)
            self.send(b"LATE", client)
            self.assertEqual(up.value(), b"EARLYLATE", pooled)

    def test_silentTunnelIsClosed(self) -> None:
        self.start()
        self.clock.advance(T.tunnelIdle - EPS)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(2 * EPS)
        self.assertTrue(self.client.aborted)

    def test_upstreamCloseEndsTheTunnel(self) -> None:
        conn, up = self.start()
        up.lose()
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StaleRetryTests(ForwardTestCase):
    def reuse(self) -> Tuple[UpstreamConnection, Wire]:
        """One request on a fresh connection, which goes back to the pool."""
        self.get(b"/first")
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
        self.assertEqual(self.pool.idleCount(), 1)
        self.client.clear()
        up.clear()
        return conn, up

    def test_idempotentBodilessRequestIsRetriedOnce(self) -> None:
        conn, up = self.reuse()
        self.get(b"/second")
        self.assertTrue(up.value().startswith(b"GET /second "))  # sent on the pooled connection
        up.lose(Failure(ConnectionLost()))  # ... which the upstream had already closed
        self.assertEqual(self.answered(), b"")
        conn2, up2 = self.pool.accept()
        self.assertTrue(up2.value().startswith(b"GET /second "))
        conn2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertStatus(200)
        self.assertEqual(self.health.events, ["ok", "ok"])

    def test_onlyOnce(self) -> None:
        conn, up = self.reuse()
        self.get(b"/second")
        up.lose(Failure(ConnectionLost()))
        conn2, up2 = self.pool.accept()
        # The fresh connection fails too: that is an answer, not another retry.
        up2.lose(Failure(ConnectionLost()))
        self.assertStatus(502)
        self.assertEqual(len(self.pool.attempts), 2)

    def test_requestWithBodyIsNotRetried(self) -> None:
        conn, up = self.reuse()
        self.send(b"PUT /p HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi")
        up.lose(Failure(ConnectionLost()))
        self.assertStatus(502)
        self.assertEqual(len(self.pool.attempts), 1)

    def test_nonIdempotentIsNotRetried(self) -> None:
        conn, up = self.reuse()
        self.get(b"/p", method=b"POST")
        up.lose(Failure(ConnectionLost()))
        self.assertStatus(502)
        self.assertEqual(len(self.pool.attempts), 1)

    def test_malformedAnswerOnAReusedConnectionIsNotRetried(self) -> None:
        """The upstream got the request and answered: garbage is a 502, not a stale connection to retry."""
        conn, up = self.reuse()
        self.get(b"/second")
        conn.dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
        self.assertTrue(up.aborted)
        self.assertStatus(502)
        self.assertIn(b"malformed response", self.answered())
        self.assertEqual(len(self.pool.attempts), 1)

    def test_freshConnectionIsNotRetried(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        up.lose(Failure(ConnectionLost()))
        self.assertStatus(502)
        self.assertIn(b"closed the connection without a response", self.answered())

    def test_idleConnectionClosedByUpstreamLeavesThePool(self) -> None:
        conn, up = self.reuse()
        up.lose()
        self.assertEqual(self.pool.idleCount(), 0)
        self.get(b"/second")
        self.assertEqual(len(self.pool.attempts), 2)  # a new connection, not the dead one


class AbortTests(ForwardTestCase):
    def test_clientDisconnectAbortsTheUpstreamRequest(self) -> None:
        self.get(b"/slow")
        conn, up = self.pool.accept()
        self.client.lose(Failure(ConnectionLost()))
        self.assertTrue(up.aborted)
        up.lose()
        self.assertEqual(self.pool.idleCount(), 0)
        self.assertEqual(self.pool.active, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_clientDisconnectMidResponse(self) -> None:
        self.get(b"/big")
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        self.client.lose(Failure(ConnectionLost()))
        self.assertTrue(up.aborted)

    def test_upstreamFailureMidBodyAbortsTheClient(self) -> None:
        self.get(b"/big")
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        up.lose(Failure(ConnectionLost()))
        self.assertTrue(self.client.aborted)
        self.assertTrue(self.answered().endswith(b"x" * 10))

    def test_upstreamFailureMidChunkedBodyNeverLooksComplete(self) -> None:
        self.get(b"/big")
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        up.lose(Failure(ConnectionLost()))
        self.assertTrue(self.client.aborted)
        self.assertNotIn(b"0\r\n\r\n", self.answered())

    def test_closeDelimitedBodyEndsCleanly(self) -> None:
        self.get(b"/old")
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        up.lose()
        self.assertFalse(self.client.aborted)
        self.assertTrue(self.answered().endswith(b"9\r\nall of it\r\n0\r\n\r\n"))

    def test_garbageFromUpstreamIs502(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
        self.assertStatus(502)
        self.assertTrue(up.aborted)

    def test_fiveHundredsArePassiveFailures(self) -> None:
        self.get()
        conn, _ = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n")
        self.assertStatus(503)
        self.assertEqual(self.health.events, ["fail"])


class CancelledBeforeSentTests(ForwardTestCase):
    """
    A request whose own bytes the parser rejects later in the same read is answered 400 and cancelled: it must
    not reach the upstream either, even on a pooled connection that takes it at once (the upstream would run a
    request the client was told failed, and the client would retry it).  A good request in front of bad bytes
    is another matter: it is forwarded and answered, and the 400 follows its response.
    """

    def pooledConnection(self):  # type: ignore[no-untyped-def]
        from .test_writethrough import FakeSocket

        self.get()
        conn, wire = self.pool.accept()
        sock = FakeSocket()
        # A pooled connection on a plain socket, as in production: its writes are queued for the turn's end.
        wire.reactor = self.clock  # type: ignore[attr-defined]
        wire.dataBuffer, wire._tempDataLen, wire._writeDisconnected = b"", 0, False  # type: ignore[attr-defined]
        wire.connected = True
        conn._sock = sock  # type: ignore[assignment]
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.pool.idleCount(), 1)
        return conn, sock

    def sendInOneTurn(self, conn, client: Wire, data: bytes) -> None:  # type: ignore[no-untyped-def]
        from ksproxy.http.writes import outbox

        try:
            self.send(data, client)
            outbox.flush()  # the end of the turn
        finally:
            while conn in outbox.owners:
                outbox.owners.remove(conn)

    def test_aRequestWithAMalformedBodyNeverLeaves(self) -> None:
        conn, sock = self.pooledConnection()
        client = self.connectClient()
        self.sendInOneTurn(
            conn, client, b"POST /x/item HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        self.assertStatus(400, client)
        self.assertEqual(sock.sent, [])

    def test_aRequestFollowedByGarbageIsAnsweredFirst(self) -> None:
        conn, sock = self.pooledConnection()
        client = self.connectClient()
        self.sendInOneTurn(conn, client, b"DELETE /x/item HTTP/1.1\r\nHost: gw\r\n\r\nGARBAGE \x01\r\n\r\n")
        self.assertEqual(self.answered(client), b"")  # the 400 waits for the DELETE's response
        [sent] = sock.sent
        self.assertTrue(sent.startswith(b"DELETE /x/item HTTP/1.1\r\n"), sent)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngone")
        answered = self.answered(client)
        self.assertTrue(answered.startswith(b"HTTP/1.1 200 OK\r\n"), answered)
        self.assertEqual(answered.count(b"HTTP/1.1 400 Bad Request\r\n"), 1, answered)
        self.assertLess(answered.index(b"gone"), answered.index(b"HTTP/1.1 400"))


class FailureRightAfterTheHeadTests(ForwardTestCase):
    """
    An upstream that fails right after a valid head (a bad chunk size, a close): while nothing of the response
    has left for the client (the head is corked for the rest of the upstream read, or queued for the end of the
    reactor turn) the client gets a 502, logged as one; once the head is written, aborting is all that is left.
    """

    def setUp(self) -> None:
        super().setUp()
        self.logged: List[Tuple[object, bool]] = []
        self.factory.accessLog = lambda exchange, aborted: self.logged.append((exchange.code, aborted))
        self.warnings = capturedLog(self, "ksproxy.proxy.forward")

    def queueClientWrites(self, client: Wire):  # type: ignore[no-untyped-def]
        """Make C{client} a plain-socket connection as in production: its writes wait for the turn's end."""
        from ksproxy.http.writes import outbox

        from .test_writethrough import FakeSocket

        sock = FakeSocket()
        client.reactor = self.clock  # type: ignore[attr-defined]
        client.dataBuffer, client._tempDataLen, client._writeDisconnected = b"", 0, False  # type: ignore[attr-defined]
        client.connected = True
        client.protocol._sock = sock  # type: ignore[union-attr]

        def forget() -> None:
            while client.protocol in outbox.owners:  # type: ignore[union-attr]
                outbox.owners.remove(client.protocol)  # type: ignore[union-attr]

        self.addCleanup(forget)
        return sock

    def test_badChunkSizeInTheHeadsReadIs502(self) -> None:
        self.get(b"/evil/x")
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n")
        self.assertTrue(up.aborted)
        self.assertStatus(502)
        self.assertEqual(self.answered().count(b"HTTP/1.1"), 1)  # the 200 never left
        self.assertIn(b"malformed response after its headers", self.answered())
        self.assertFalse(self.client.aborted)
        self.assertEqual(self.logged, [(502, False)])
        self.assertEqual(self.health.events, ["ok", "fail"])
        [warning] = self.warnings
        self.assertIn("nothing had reached the client: answered 502", warning)
        # The client connection is still good for its next request.
        self.get()
        conn2, _ = self.pool.accept()
        conn2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.answered().endswith(b"\r\n\r\nok"))

    def test_bodyBytesBeforeTheBadChunkAreTakenBackToo(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
        self.assertStatus(502)
        self.assertNotIn(b"ok\r\n", self.answered().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(self.logged, [(502, False)])

    def test_headQueuedForTheTurnsEndIsTakenBack(self) -> None:
        """Two upstream reads in one turn (TLS records): the head left the cork but not the process."""
        from ksproxy.http.writes import outbox

        sock = self.queueClientWrites(self.client)
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        conn.dataReceived(b"zz\r\n")
        outbox.flush()  # the end of the turn
        sent = b"".join(sock.sent)
        self.assertTrue(sent.startswith(b"HTTP/1.1 502 "), sent)
        self.assertEqual(sent.count(b"HTTP/1.1"), 1)
        self.assertEqual(self.logged, [(502, False)])

    def test_closeRightAfterTheHeadIs502(self) -> None:
        sock = self.queueClientWrites(self.client)
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        up.lose(Failure(ConnectionLost()))
        from ksproxy.http.writes import outbox

        outbox.flush()
        sent = b"".join(sock.sent)
        self.assertTrue(sent.startswith(b"HTTP/1.1 502 "), sent)
        self.assertIn(b"closed the connection before the end of its response", sent)
        self.assertEqual(self.logged, [(502, False)])

    def test_afterTheHeadLeftTheClientIsAborted(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertStatus(200)  # written to the transport
        conn.dataReceived(b"zz\r\n")
        self.assertTrue(up.aborted)
        self.assertTrue(self.client.aborted)
        self.assertEqual(self.answered().count(b"HTTP/1.1"), 1)
        self.assertEqual(self.logged, [(200, True)])
        [warning] = self.warnings
        self.assertIn("response malformed after headers", warning)
        self.assertIn("client connection aborted", warning)

    def test_afterTheHeadWasSentOnTheSocketTheClientIsAborted(self) -> None:
        from ksproxy.http.writes import outbox

        sock = self.queueClientWrites(self.client)
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        outbox.flush()  # a turn ends between the two reads
        conn.dataReceived(b"zz\r\n")
        outbox.flush()
        self.assertTrue(self.client.aborted)
        self.assertEqual(b"".join(sock.sent).count(b"HTTP/1.1"), 1)
        self.assertEqual(self.logged, [(200, True)])


class _WarningsTestCase(ForwardTestCase):
    """Captures what ksproxy.proxy.forward logs."""

    def setUp(self) -> None:
        super().setUp()
        self.warnings = capturedLog(self, "ksproxy.proxy.forward")


class StatusRangeTests(_WarningsTestCase):
    """RFC 9110 15: status codes are 100-599.  llhttp takes any three digits; the rest is a logged 502."""

    def assertRefused(self, code: bytes) -> None:
        conn, up = self.reuse()
        self.get(b"/second")
        conn.dataReceived(b"HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\nok" % code)
        self.assertTrue(up.aborted)
        self.assertEqual(self.pool.idleCount(), 0)
        self.assertStatus(502)
        self.assertIn(b"status code %d outside 100-599" % int(code), self.answered())
        self.assertNotIn(b"Odd", self.answered())
        # An answer, not a stale connection: not retried.
        self.assertEqual(len(self.pool.attempts), 1)
        self.assertEqual(self.health.events, ["ok", "fail"])
        [warning] = self.warnings
        self.assertIn(f"status code {int(code)} outside 100-599: answered 502", warning)

    def reuse(self) -> Tuple[UpstreamConnection, Wire]:
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.pool.idleCount(), 1)
        self.client.clear()
        return conn, up

    def test_600(self) -> None:
        self.assertRefused(b"600")

    def test_999(self) -> None:
        self.assertRefused(b"999")

    def test_099(self) -> None:
        self.assertRefused(b"099")

    def test_000(self) -> None:
        self.assertRefused(b"000")

    def test_afterAnInterimResponse(self) -> None:
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(up.aborted)
        self.assertStatus(502)
        self.assertIn(b"status code 600 outside 100-599", self.answered())

    def test_599And100AreRelayed(self) -> None:
        self.send(b"PUT /x HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertTrue(self.answered().startswith(b"HTTP/1.1 100 Continue\r\n"))
        self.send(b"hi")
        self.client.clear()
        conn.dataReceived(b"HTTP/1.1 599 Edge\r\nContent-Length: 2\r\n\r\nok")
        self.assertStatus(599)
        self.assertTrue(self.answered().endswith(b"\r\n\r\nok"))
        self.assertEqual(self.pool.idleCount(), 1)
        self.assertEqual(self.warnings, [])


class ResponseTransferCodingTests(_WarningsTestCase):
    """
    Only C{chunked} alone: llhttp frames by a final chunked and hands us the decoded chunks, so a coding before it
    would be lost on the way down (as the client side answers 501 for a request of that shape).
    """

    def answer(self, head: bytes, body: bytes = b"3\r\nabc\r\n0\r\n\r\n") -> Tuple[UpstreamConnection, Wire]:
        self.get()
        conn, up = self.pool.accept()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + body)
        return conn, up

    def assertRefused(self, head: bytes, named: bytes, body: bytes = b"3\r\nabc\r\n0\r\n\r\n") -> None:
        _, up = self.answer(head, body)
        self.assertTrue(up.aborted)
        self.assertEqual(self.pool.idleCount(), 0)
        self.assertStatus(502)
        self.assertEqual(self.answered().count(b"HTTP/1.1"), 1)  # the 200 never left
        self.assertIn(b"sent a Transfer-Encoding other than chunked: " + named, self.answered())
        self.assertFalse(self.client.aborted)
        self.assertEqual(self.health.events, ["ok", "fail"])
        [warning] = self.warnings
        self.assertIn(f"Transfer-Encoding other than chunked: {named.decode()}: answered 502", warning)

    def test_codingBeforeChunked(self) -> None:
        self.assertRefused(b"Transfer-Encoding: gzip, chunked\r\n", b"gzip, chunked")

    def test_codingInASecondField(self) -> None:
        self.assertRefused(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", b"gzip,chunked")

    def test_codingAfterChunked(self) -> None:
        # llhttp then reads to the close, the chunk framing as body.
        self.assertRefused(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", b"chunked,gzip")

    def test_closeDelimitedCoding(self) -> None:
        # RFC 9112 6.3: valid (read to the close), but the coding would still be lost.
        self.assertRefused(b"Transfer-Encoding: gzip\r\n", b"gzip", body=b"abc")

    def test_identity(self) -> None:
        # Not a registered transfer coding since RFC 7230 (the client side answers 400 for it).
        self.assertRefused(b"Transfer-Encoding: identity\r\n", b"identity", body=b"abc")

    def test_chunkedTwice(self) -> None:
        self.assertRefused(b"Transfer-Encoding: chunked, chunked\r\n", b"chunked, chunked")

    def test_chunkedInAnyCaseWithOWS(self) -> None:
        # (Not a trailing tab: llhttp then stops treating the body as chunked, and on_header strips it from view.)
        for value in [b"chunked", b"Chunked", b"\t CHUNKED "]:
            self.client.clear()
            conn, up = self.answer(b"Transfer-Encoding: " + value + b"\r\n")
            self.assertStatus(200)
            self.assertTrue(self.answered().endswith(b"\r\n3\r\nabc\r\n0\r\n\r\n"), value)
            self.assertFalse(up.aborted)
            self.assertEqual(self.pool.idleCount(), 1)
            self.pool.takeIdle(UP)
        self.assertEqual(self.warnings, [])
