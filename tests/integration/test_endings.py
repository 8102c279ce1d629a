"""
How a client connection ends, on real sockets through a whole gateway: a bad request pipelined behind good ones
(the good ones are answered first, in order, then the rejection), and a client that half-closes after sending
(shutdown(SHUT_WR), as ``nc -N`` does: what it sent in full is answered, rejections included).
"""

from __future__ import annotations

import json
import re
import socket
from typing import List, Tuple

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ksproxy.http.server import LINGER_TOTAL, HTTPServerFactory, ServerLimits
from tests.integration.gateway import RunningGateway
from tests.integration.wire import listen, splitResponse
from tests.util import CLIENT_TIMEOUT, rawRequest, readUntilClosed

MANIFESTS = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: app}}
spec:
  matcher: {{path: /proxy/app/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{app}'}}
  directives:
    stripPathPrefix: /proxy/app
"""

GET1 = b"GET /proxy/app/1 HTTP/1.1\r\nHost: a\r\n\r\n"
GET2 = b"GET /proxy/app/2 HTTP/1.1\r\nHost: a\r\n\r\n"
BIG_HEADER = b"GET /proxy/app/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n"
CL_TE = b"POST /proxy/app/a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
TWO_CLS = b"POST /proxy/app/a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
CHUNKED_POST = (
    b"POST /proxy/app/post HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)


def responses(data: bytes) -> List[Tuple[int, dict, bytes]]:
    """The responses in C{data}, in order (each framed by its Content-Length)."""
    out = []
    while data:
        status, headers, rest = splitResponse(data)
        length = int(headers[b"content-length"][0])
        out.append((int(status.split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def _halfClosed(port: int, data: bytes) -> bytes:
    """Send C{data}, then shutdown(SHUT_WR) as ``nc -N`` does, and read until the server closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return readUntilClosed(s)
    finally:
        s.close()


def halfClosed(port: int, data: bytes) -> defer.Deferred[bytes]:
    return threads.deferToThread(_halfClosed, port, data)


class _Case(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.app, self.appPort, app = listen(reactor)
        self.gw = RunningGateway({"all.yaml": MANIFESTS.format(app=app)})
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        yield self.appPort.stopListening()

    def assertAnswers(self, data: bytes, codes: List[int]) -> List[Tuple[int, dict, bytes]]:
        got = responses(data)
        self.assertEqual([code for code, _, _ in got], codes, data[:500])
        last = got[-1]
        if last[0] >= 400:
            self.assertEqual(json.loads(last[2])["code"], last[0])
        if last[0] in (400, 431):
            self.assertEqual(last[1].get(b"connection"), [b"close"])  # a rejection closes
        return got


class PipelinedRejectionTests(_Case):
    """A bad request behind a proxied one: the proxied one is answered first, then the rejection, then close."""

    @defer.inlineCallbacks
    def test_garbageAfterAProxiedRequest(self):  # type: ignore[no-untyped-def]
        for bad, code in [(b"GARBAGE\r\n\r\n", 400), (TWO_CLS, 400), (BIG_HEADER, 431)]:
            data = yield rawRequest(self.gw.port, GET1 + bad)
            got = self.assertAnswers(data, [200, code])
            self.assertEqual(got[0][2], b"GET /1 0")
            self.assertNotIn(b"connection", got[0][1])  # not the last response: no close on it

    @defer.inlineCallbacks
    def test_everyQueuedRequestIsAnsweredFirst(self):  # type: ignore[no-untyped-def]
        data = yield rawRequest(self.gw.port, GET1 + GET2 + b"GARBAGE\r\n\r\n" + GET1)
        got = self.assertAnswers(data, [200, 200, 400])
        self.assertEqual([body for _, _, body in got[:2]], [b"GET /1 0", b"GET /2 0"])
        # Nothing behind the bad request was forwarded.
        self.assertEqual([r.target for r in self.app.requests], [b"/1", b"/2"])

    @defer.inlineCallbacks
    def test_badBodyOfAQueuedRequest(self):  # type: ignore[no-untyped-def]
        """The queued request is the bad one: it is not forwarded, the one before it is answered."""
        bad = b"POST /proxy/app/p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        data = yield rawRequest(self.gw.port, GET1 + bad)
        self.assertAnswers(data, [200, 400])
        self.assertEqual([r.target for r in self.app.requests], [b"/1"])


class HalfCloseTests(_Case):
    """The client sends, then shutdown(SHUT_WR): every complete request and every rejection gets its answer."""

    @defer.inlineCallbacks
    def test_rejectionsAreAnswered(self):  # type: ignore[no-untyped-def]
        for raw, code in [(CL_TE, 400), (TWO_CLS, 400), (BIG_HEADER, 431), (b"GARBAGE\r\n\r\n", 400)]:
            data = yield halfClosed(self.gw.port, raw)
            self.assertAnswers(data, [code])
        self.assertEqual(self.app.requests, [])

    @defer.inlineCallbacks
    def test_aProxiedRequestIsAnswered(self):  # type: ignore[no-untyped-def]
        for raw, body in [(GET1, b"GET /1 0"), (CHUNKED_POST, b"POST /post 5")]:
            data = yield halfClosed(self.gw.port, raw)
            got = self.assertAnswers(data, [200])
            self.assertEqual(got[0][2], body)

    @defer.inlineCallbacks
    def test_aLocalAnswerIsAnswered(self):  # type: ignore[no-untyped-def]
        data = yield halfClosed(self.gw.port, b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertAnswers(data, [404])

    @defer.inlineCallbacks
    def test_pipelinedThenHalfClosed(self):  # type: ignore[no-untyped-def]
        data = yield halfClosed(self.gw.port, GET1 + GET2 + b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertAnswers(data, [200, 200, 404])
        data = yield halfClosed(self.gw.port, GET1 + b"GARBAGE\r\n\r\n")
        self.assertAnswers(data, [200, 400])

    @defer.inlineCallbacks
    def test_anUnfinishedRequestIsDropped(self):  # type: ignore[no-untyped-def]
        """A body that will never be complete: no answer, and the upstream never sees a complete request."""
        data = yield halfClosed(
            self.gw.port, b"POST /proxy/app/p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
        )
        self.assertEqual(data, b"")
        data = yield halfClosed(self.gw.port, b"GET /proxy/app/p HTTP/1.1\r\nHo")
        self.assertEqual(data, b"")
        self.assertEqual([r for r in self.app.requests if r.complete], [])


# -- the engine alone, on a StringTransport and a Clock -------------------------------------------------------


class _Held:
    """Keeps every exchange unanswered until the test answers it (a slow upstream)."""

    def __init__(self) -> None:
        self.exchanges: list = []

    def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
        exchange.discardBody()
        self.exchanges.append(exchange)


def _answer(exchange, code: int = 200, body: bytes = b"ok") -> None:  # type: ignore[no-untyped-def]
    exchange.writeHead(code, [(b"Content-Type", b"text/plain")], length=len(body))
    exchange.write(body)
    exchange.finish()


class _HalfClosingTransport(StringTransport):
    """A TCP-like test transport: it can close its write side alone, and records an abort."""

    writeClosed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class EngineEndingTests(SynchronousTestCase):
    def connect(self, handler=None):  # type: ignore[no-untyped-def]
        self.clock = Clock()
        self.handler = handler or _Held()
        self.logged: list = []
        factory = HTTPServerFactory(
            self.handler,
            self.clock,
            ServerLimits(),
            accessLog=lambda e, aborted: self.logged.append((e, aborted)),
        )
        proto = factory.buildProtocol(None)
        transport = _HalfClosingTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555), lenient=True)
        proto.makeConnection(transport)
        return proto, transport

    def test_aRejectionWaitsForTheRequestInFrontOfIt(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")  # nothing more is read meanwhile
        self.assertFalse(transport.writeClosed or transport.disconnecting)
        proto.dataReceived(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")  # (a read already under way): not parsed
        [first] = self.handler.exchanges
        self.assertFalse(first.finished)
        _answer(first)
        got = transport.value()
        self.assertTrue(got.startswith(b"HTTP/1.1 200 OK\r\n"), got)
        self.assertNotIn(b"Connection: close", got[: got.index(b"ok")])
        rejection = got[got.index(b"ok") + 2 :]
        self.assertTrue(rejection.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got)
        self.assertIn(b"Connection: close", rejection)
        self.assertEqual(len(self.handler.exchanges), 1)
        # Then the lingering close, as for any rejection.
        self.assertTrue(transport.writeClosed)
        self.assertEqual(transport.producerState, "producing")

    def test_queuedRequestsAreAnsweredFirstAndReadingStaysOff(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n"
        )
        (first,) = self.handler.exchanges
        _answer(first, body=b"one")
        self.assertEqual(transport.producerState, "paused")  # the next one runs, and still nothing is read
        first, second = self.handler.exchanges
        self.assertEqual(second.target, b"/2")
        self.assertFalse(transport.writeClosed)
        _answer(second, body=b"two")
        got = transport.value()
        self.assertEqual(
            re.findall(rb"HTTP/1\.1 \d+ [A-Za-z ]+(?=\r\n)", got),
            [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"],
        )
        self.assertLess(got.index(b"one"), got.index(b"two"))
        self.assertTrue(transport.writeClosed)

    def test_theWaitIsBoundedByTheRequestsOwnLimit(self) -> None:
        """A slow first response: the rejection goes out when its own timeout answers it (here 504 at 60 s)."""
        proto, transport = self.connect()
        proto.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n"
        )
        [first] = self.handler.exchanges
        self.clock.callLater(60, first.sendError, 504, "upstream did not answer in time")
        self.clock.advance(59.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2)
        got = transport.value()
        self.assertTrue(got.startswith(b"HTTP/1.1 504 "), got)
        self.assertEqual(got.count(b"HTTP/1.1 431 "), 1, got)
        self.assertTrue(transport.writeClosed)
        self.clock.advance(LINGER_TOTAL)
        self.assertTrue(transport.aborted)  # the lingering close has its own end

    def test_aRejectionLogsTheBytesItWrote(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GARBAGE\r\n\r\n")
        [(exchange, aborted)] = self.logged
        body = transport.value().partition(b"\r\n\r\n")[2]
        self.assertEqual((exchange.code, exchange.bytesSent, aborted), (400, len(body), False))
        self.assertGreater(len(body), 0)

    def test_finAfterACompleteRequest(self) -> None:
        """It is answered (its head saying close), then the connection closes."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        proto.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        _answer(self.handler.exchanges[0])
        status, headers, body = splitResponse(transport.value())
        self.assertEqual((status, headers[b"connection"], body), (b"HTTP/1.1 200 OK", [b"close"], b"ok"))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.aborted)
        self.assertEqual([aborted for _, aborted in self.logged], [False])

    def test_finAfterTheHeadWentOutCancels(self) -> None:
        """A FIN while a response streams is a client that went away: an abandoned watch or download frees its
        upstream request at once instead of at its next write (which may be minutes away)."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        exchange = self.handler.exchanges[0]
        gone = []
        exchange.onClientGone = lambda: gone.append(True)
        exchange.writeHead(200, [], length=2)
        proto.readConnectionLost()
        self.assertEqual(gone, [True])
        self.assertTrue(transport.disconnecting)
        self.assertEqual([aborted for _, aborted in self.logged], [True])

    def test_finMidBodyCancels(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        gone = []
        self.handler.exchanges[0].onClientGone = lambda: gone.append(True)
        proto.readConnectionLost()
        self.assertEqual(gone, [True])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual([aborted for _, aborted in self.logged], [True])

    def test_finWhenIdleOrMidHeadCloses(self) -> None:
        for data in [b"", b"GET /1 HTTP/1.1\r\nHo"]:
            proto, transport = self.connect()
            proto.dataReceived(data)
            proto.readConnectionLost()
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"")
            self.assertEqual(self.handler.exchanges, [])

    def test_finWhileLingeringCloses(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GARBAGE\r\n\r\n")
        self.assertTrue(transport.writeClosed)
        self.assertFalse(transport.disconnecting)
        proto.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
