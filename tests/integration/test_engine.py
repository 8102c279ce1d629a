"""
The HTTP engine on real sockets: client protocol, upstream pool and forwarding, without routing.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ksproxy.http.server import HTTPServerFactory
from ksproxy.http.upstream import UpstreamPool
from ksproxy.model.types import Endpoint
from ksproxy.proxy.forward import ProxyCall, Timeouts, UpstreamRequest, stripHopByHop
from tests.util import RecordingUpstream, httpRequest, listenUpstream, rawRequest


class _ForwardAll:
    def __init__(self, endpoint: Endpoint, pool: UpstreamPool) -> None:
        self.endpoint = endpoint
        self.pool = pool

    def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
        headers = exchange.headers
        stripHopByHop(headers)
        headers.set(b"Host", self.endpoint.hostport.encode())
        req = UpstreamRequest(self.endpoint, exchange.method, exchange.target, headers)
        ProxyCall(exchange, req, self.pool, reactor, Timeouts()).start()


class EngineTests(TestCase):
    def setUp(self) -> None:
        self.upstream = RecordingUpstream()
        self.upPort, upPortNum = listenUpstream(reactor, self.upstream)
        self.pool = UpstreamPool(reactor)
        endpoint = Endpoint("http", "127.0.0.1", upPortNum)
        factory = HTTPServerFactory(_ForwardAll(endpoint, self.pool), reactor)
        self.proxyPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.proxyPort.getHost().port

    def tearDown(self):  # type: ignore[no-untyped-def]
        self.pool.closeIdle()
        return self.proxyPort.stopListening().addCallback(lambda _: self.upPort.stopListening())

    async def test_getForwardsRawTarget(self) -> None:
        status, headers, body = await httpRequest(self.port, "GET", "/a%2fb;x/../c?q=1&&b&q=2")
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.last.uri, b"/a%2fb;x/../c?q=1&&b&q=2")

    async def test_postBodyStreams(self) -> None:
        status, _, body = await httpRequest(self.port, "POST", "/p", body=b"x" * 100000)
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.last.body, b"x" * 100000)

    async def test_chunkedRequestBody(self) -> None:
        data = await rawRequest(
            self.port,
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)
        self.assertEqual(self.upstream.last.body, b"abcde")

    async def test_pipelined(self) -> None:
        data = await rawRequest(
            self.port,
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(data.count(b"HTTP/1.1 200"), 2, data)
        self.assertLess(data.index(b"GET /1"), data.index(b"GET /2"))

    async def test_bytesAfterTheLastRequestAreNotRead(self) -> None:
        """After `Connection: close` (or an HTTP/1.0 request) the answer comes, then the close; what follows is
        not parsed (it used to turn the answer into a 400 and cancel the request)."""
        for last in (b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"GET /1 HTTP/1.0\r\n\r\n"):
            for after in (b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n", b"GARBAGE \x01\r\n\r\n"):
                data = await rawRequest(self.port, last + after)
                self.assertTrue(data.startswith(b"HTTP/1.1 200"), (last, after, data))
                self.assertEqual(data.count(b"HTTP/1.1 "), 1, data)
                self.assertIn(b"upstream GET /1", data)
        self.assertEqual({r.uri for r in self.upstream.requests}, {b"/1"})

    async def test_smuggling(self) -> None:
        data = await rawRequest(
            self.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 400"), data)
        self.assertEqual(self.upstream.requests, [])
