"""
The upstream side of the proxy: persistent HTTP/1.1 connections, pooled per upstream identity.

An upstream's identity is L{ksproxy.model.types.Endpoint.key} (scheme, host, port, TLS settings), so a changed
caBundle is a different pool (SPEC 11: KubeSphere caches TLS settings per name forever).  Each connection
carries one request at a time and hands what it parses to its current L{IResponseSink}.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Dict, List, Optional, Tuple
from typing import Protocol as TypingProtocol

import httptools
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..model.types import Endpoint, TLSSettings
from .headers import Headers
from .writes import BatchedWriter, awaitingReply, directSocket, flushOut, noDelay

__all__ = [
    "IResponseSink",
    "UpstreamConnection",
    "UpstreamPool",
    "UpstreamResponseInvalid",
    "UpstreamResponseTooLarge",
    "tlsCreator",
]

log = Logger()


class IResponseSink(TypingProtocol):
    """What an L{UpstreamConnection} tells the request it is carrying."""

    def responseHead(self, code: int, reason: bytes, headers: Headers, connection: UpstreamConnection) -> None: ...

    def responseData(self, data: bytes) -> None: ...

    def responseEnd(self, trailers: Optional[List[Tuple[bytes, bytes]]]) -> None: ...

    def upstreamLost(self, reason: Failure, gotHead: bool) -> None: ...

    def upstreamCongested(self, congested: bool) -> None: ...

    def responseFlush(self) -> None:
        """One read from the upstream has been parsed: send on what it produced."""

    def timerFired(self) -> None:
        """The connection's timer (see L{UpstreamConnection.scheduleTimer}) fired: check the running limit."""


# Larger response heads (and trailers, and runs of chunk framing) are refused with a 502 and the connection is
# closed: a client behind us would refuse them anyway, and we buffer heads.  The default of the pool's limit;
# ksproxy run sets it from --max-header-bytes, the limit on client request headers.
MAX_RESPONSE_HEAD = 64 * 1024


_FRAMING = frozenset([b"content-length", b"transfer-encoding"])


class UpstreamResponseTooLarge(Exception):
    """The upstream's response head exceeds the pool's C{maxHeadBytes}."""


class UpstreamResponseInvalid(Exception):
    """The upstream's response head parses but is not one we relay (a status code outside 100-599)."""


class _StopParsing(Exception):
    """Raised from a parser callback to stop at the end of a HEAD response's headers."""


@implementer(IPushProducer)
class UpstreamConnection(BatchedWriter, Protocol):
    """
    One connection to an upstream.  Also the streaming producer of its own transport (so we hear when the
    upstream stops reading our request body) and the producer the client side pauses when the client reads
    slowly (L{pauseProducing} stops reading the response from the upstream).
    """

    _maxHead = MAX_RESPONSE_HEAD  # the pool's limit, set when connected

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.sink: Optional[IResponseSink] = None
        self.requests = 0  # requests carried, for the stale-connection retry rule
        self.connected = False
        # Made when the connection is, dropped when it is lost: it holds our bound callbacks, and the pair must
        # go by reference counting (tests/integration/test_cycles.py), also when the connection never happens.
        self._parser: Optional[httptools.HttpResponseParser] = None
        self._headers: List[List[bytes]] = []  # Headers items: [lowerName, name, value]
        self._reason = b""
        self._headBytes = 0  # trailers
        self._inHead = False
        self._headSeen = 0
        self._readSize = 0
        self._bodyRead = False  # this read carried body bytes
        self._noBodyRun = 0  # bytes of reads in a row, inside a body, that carried none
        self._gotHead = False
        self._inBody = False
        self._headRequest = False
        self._trailers: Optional[List[Tuple[bytes, bytes]]] = None
        self._closeDelimited = False
        self._tunnel = False
        self._paused = False
        self.idleSince = 0.0  # when it went back to the pool
        self._sock = None  # for writing through (server.sendNow); None on TLS
        self._out: List[bytes] = []  # written in this reactor turn, sent at its end (server._Outbox)
        self.lostReason: Optional[Failure] = None
        # The timer of the requests it carries (L{scheduleTimer}): it lives as long as the connection, so a
        # request on a pooled connection usually costs no DelayedCall at all.
        self._timer = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self._parser = httptools.HttpResponseParser(self)
        self._maxHead = self.pool.maxHeadBytes  # per connection, not looked up per response
        self.transport.registerProducer(self, True)
        self._sock = directSocket(self.transport)
        noDelay(self.transport)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self._out = []
        self._parser = None
        self.cancelTimer()
        self.lostReason = reason
        self.pool._lost(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self._tunnel or (self._inBody and self._closeDelimited):
            # Close-delimited body or tunnel: the close is the end.
            sink.responseEnd(None)
        else:
            sink.upstreamLost(reason, self._gotHead)

    def startRequest(self, sink: IResponseSink, head: bytes, isHead: bool) -> None:
        """Send a request head and make C{sink} the receiver of the response."""
        self.sink = sink
        self.requests += 1
        self._gotHead = False
        self._inBody = False
        self._headRequest = isHead
        self._trailers = None
        # (The pool's idle timer stays: it finds the connection busy when it fires.)
        awaitingReply.soon = True
        self._writeOut([head])

    def write(self, data: bytes) -> None:
        self._writeOut([data])

    def writeSequence(self, data: List[bytes]) -> None:
        self._writeOut(data)


    # -- the carried request's timer ----------------------------------------------------------------------

    def scheduleTimer(self, clock, at: float) -> None:  # type: ignore[no-untyped-def]
        """
        Make sure the sink's C{timerFired} runs no later than C{at} (on C{clock}).  The timer is only ever moved
        later by letting it fire early: the sink checks its own deadline and schedules again for what is left
        (moving a DelayedCall sooner costs Twisted a linear scan of its heap; creating one per request costs
        more than the check).
        """
        timer = self._timer
        if timer is not None:
            if timer.getTime() <= at:
                return
            timer.cancel()
        self._timer = clock.callLater(max(0.0, at - clock.seconds()), self._timerFired)

    def cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _timerFired(self) -> None:
        self._timer = None
        sink = self.sink
        if sink is not None:
            sink.timerFired()

    def abort(self) -> None:
        """Drop this connection (the exchange it carried failed or was abandoned)."""
        self.sink = None
        if self.connected:
            self._out = []  # queued bytes must not follow an abort
            self.transport.abortConnection()

    def release(self) -> None:
        """The exchange is done and the connection is clean: back to the pool."""
        self.sink = None
        if self._paused:
            self.resumeReading()
        self.pool._release(self)

    # -- flow control --------------------------------------------------------------------------------------

    def pauseReading(self) -> None:
        if not self._paused and self.connected:
            self._paused = True
            self.transport.pauseProducing()

    def resumeReading(self) -> None:
        if self._paused and self.connected:
            self._paused = False
            self.transport.resumeProducing()

    # IPushProducer, registered on our own transport: the upstream is not reading our request body.
    def pauseProducing(self) -> None:
        if self.sink is not None:
            self.sink.upstreamCongested(True)

    def resumeProducing(self) -> None:
        if self.sink is not None:
            self.sink.upstreamCongested(False)

    def stopProducing(self) -> None:
        pass

    # -- reading -------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        sink = self.sink
        if self._tunnel:
            if sink is not None:
                sink.responseData(data)
            return
        if sink is None:
            # Bytes on an idle connection: the upstream is confused; do not reuse it.
            self._out = []  # queued bytes must not follow an abort
            self.transport.abortConnection()
            return
        try:
            self._feed(data)
        finally:
            sink.responseFlush()

    def _feed(self, data: bytes) -> None:
        self._readSize = len(data)
        try:
            self._parser.feed_data(data)
            if self._inHead:
                # llhttp holds a header line until it ends, so a head that never ends must be cut by its size.
                # A head that began in this read counts from the next one (one read of slack).
                self._headSeen = self._headSeen + len(data) if self._headSeen >= 0 else 0
                if self._headSeen > self._maxHead:
                    self._fail(UpstreamResponseTooLarge(f"response headers larger than {self._maxHead} bytes"))
            elif self._bodyRead:
                self._bodyRead = False
                self._noBodyRun = 0
            elif self._inBody:
                # Reads in a row without body bytes: chunk framing, extensions or trailers, which llhttp holds
                # while a line grows.  Bounded like a head.
                self._noBodyRun += len(data)
                if self._noBodyRun > self._maxHead:
                    self._fail(UpstreamResponseTooLarge("response trailers or chunk extensions too large"))
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            self._tunnel = True
            if rest and self.sink is not None:
                self.sink.responseData(rest)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _StopParsing):
                self._finishHeadResponse()
            else:
                self._fail(e.__context__ or e)
        except httptools.HttpParserError as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        sink, self.sink = self.sink, None
        self._out = []  # queued bytes must not follow an abort
        self.transport.abortConnection()
        if sink is not None:
            sink.upstreamLost(Failure(error), self._gotHead)

    def _finishHeadResponse(self) -> None:
        # llhttp would wait for a body that a HEAD response never has; start a fresh parser instead.
        self._parser = httptools.HttpResponseParser(self)
        self._inBody = False
        sink = self.sink
        if sink is not None:
            sink.responseEnd(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""
        self._inHead = True
        self._headSeen = -1  # counted per read, from the next one (see _feed)

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # The head's size is checked per read in _feed, not per header (this runs for every header).
        if self._inBody:
            # After the body: trailers, counted here (they are rare).
            self._headBytes += len(name) + len(value) + 4
            if self._headBytes > self._maxHead:
                raise UpstreamResponseTooLarge(f"response trailers larger than {self._maxHead} bytes")
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value.rstrip(b" \t")))
        else:
            self._headers.append([name.lower(), name, value.rstrip(b" \t")])

    def on_headers_complete(self) -> None:
        self._inHead = False
        self._noBodyRun = 0
        maxHead = self._maxHead
        if self._headSeen >= 0 or self._readSize > maxHead:
            # The head spanned reads (or came in one huge one): the per-read count has slack, count exactly.
            size = sum(len(item[1]) + len(item[2]) + 4 for item in self._headers)
            if size > maxHead:
                raise UpstreamResponseTooLarge(f"response headers larger than {maxHead} bytes")
        parser = self._parser
        code = parser.get_status_code()
        # llhttp takes any three digits; RFC 9110 15 allows 100-599.  Nested so that a 2xx-5xx costs the same
        # two comparisons the interim check alone did.  Raised before the head counts as got: a 502, no retry.
        if code < 200:
            if code < 100:
                raise UpstreamResponseInvalid(f"status code {code} outside 100-599")
            if code != 101:
                if self.sink is not None:
                    self.sink.responseHead(code, self._reason, Headers.fromItems(self._headers), self)
                return
        elif code > 599:
            raise UpstreamResponseInvalid(f"status code {code} outside 100-599")
        headers = Headers.fromItems(self._headers)
        self._gotHead = True
        self._inBody = True
        self._headBytes = 0
        framed = False
        for item in self._headers:
            if item[0] in _FRAMING:
                framed = True
                break
        self._closeDelimited = not framed and code not in (204, 304)
        if self.sink is not None:
            self.sink.responseHead(code, self._reason, headers, self)
        if self._headRequest and code != 101:
            raise _StopParsing()

    def on_body(self, data: bytes) -> None:
        self._bodyRead = True
        if self.sink is not None:
            self.sink.responseData(data)

    def on_message_complete(self) -> None:
        if not self._gotHead:
            return  # the end of an interim 1xx response
        if self._parser.get_status_code() == 101:
            return  # llhttp ends the 101 "message" before raising HttpParserUpgrade: the tunnel starts here
        self._inBody = False
        sink = self.sink
        if sink is not None:
            sink.responseEnd(self._trailers)

    @property
    def keepAlive(self) -> bool:
        return self.connected and not self._tunnel and self._parser.should_keep_alive()


@implementer(IOpenSSLClientConnectionCreator)
class _InsecureCreator:
    """TLS without certificate verification, for C{insecureSkipVerify: true} only.  SNI is still sent."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname.encode("idna") if not _isIP(hostname) else None
        self._ctx = CertificateOptions(verify=False, raiseMinimumTo=None).getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if self._hostname:
            conn.set_tlsext_host_name(self._hostname)
        return conn


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def tlsCreator(host: str, tls: TLSSettings, clock=None) -> IOpenSSLClientConnectionCreator:
    """
    The TLS connection creator for one upstream: its CA bundle, or the system store; hostname verified; its
    client certificate when it has one (mTLS; the files are re-read when they change, on C{clock}).
    """
    if tls.clientCertificate is not None:
        from ..tls.client import ClientCertificateCreator

        return ClientCertificateCreator(host, tls, clock)
    if tls.insecureSkipVerify:
        return _InsecureCreator(host)
    if tls.caBundle is not None:
        certs = [Certificate.loadPEM(pem) for pem in _splitPem(tls.caBundle)]
        return optionsForClientTLS(host, trustRoot=trustRootFromCertificates(certs))
    return optionsForClientTLS(host)


def _splitPem(bundle: bytes) -> List[bytes]:
    marker = b"-----END CERTIFICATE-----"
    parts = []
    for piece in bundle.split(marker):
        start = piece.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            parts.append(piece[start:] + marker + b"\n")
    return parts


def _close(conn: UpstreamConnection) -> None:
    """Close cleanly.  The producer we registered on the transport must go first: Twisted's TLS layer waits for
    a registered producer to finish before it closes, so a TLS upstream connection would otherwise stay open."""
    transport = conn.transport
    if transport is None:
        return
    flushOut(conn)
    transport.unregisterProducer()
    transport.loseConnection()


class _OneShotFactory(Factory):
    """C{connectProtocol}'s factory, without its two info-level log lines ("Starting/Stopping factory") per
    connection."""

    noisy = False

    def __init__(self, protocol: UpstreamConnection) -> None:
        self.protocol: Optional[UpstreamConnection] = protocol  # type: ignore[assignment]

    def buildProtocol(self, addr: object) -> Optional[UpstreamConnection]:
        # Handed over, not kept (nor kept after a failed attempt): Twisted's connector and endpoint factory
        # refer to each other, and that cycle outlives the connection; it must not hold the connection too.
        protocol, self.protocol = self.protocol, None
        return protocol


class UpstreamPool:
    """
    Idle connections by upstream identity, capped and expired; new connections through endpoints, with the
    upstream's TLS settings.  Connection creators are built once per identity, not per request.
    """

    def __init__(
        self,
        reactor,
        *,
        maxIdlePerKey: int = 256,
        idleTimeout: float = 60.0,
        connectTimeout: float = 10.0,
        maxHeadBytes: int = MAX_RESPONSE_HEAD,
    ) -> None:
        self.reactor = reactor
        # The largest response head (and trailers) an upstream may send: 502 and a closed connection above.
        self.maxHeadBytes = maxHeadBytes
        self.maxIdlePerKey = maxIdlePerKey
        self.idleTimeout = idleTimeout
        self.connectTimeout = connectTimeout
        self._idle: Dict[str, List[UpstreamConnection]] = {}
        self._timers: Dict[int, object] = {}
        self._endpoints: Dict[str, IStreamClientEndpoint] = {}
        self.active = 0  # connections open (idle or busy), for metrics and leak tests
        self.onConnect: Optional[Callable[[Endpoint], None]] = None
        self.closed = False  # shutting down: connections that finish their exchange are closed, not pooled

    def idleCount(self, key: Optional[str] = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def takeIdle(self, endpoint: Endpoint) -> Optional[UpstreamConnection]:
        """An idle connection to C{endpoint}, most recently used first, or None."""
        idle = self._idle.get(endpoint.key)
        while idle:
            conn = idle.pop()
            if conn.connected:
                return conn
        return None

    def connect(self, endpoint: Endpoint) -> defer.Deferred[UpstreamConnection]:
        key = endpoint.key
        conn = UpstreamConnection(self, key)
        ep = self._endpoints.get(key)
        if ep is None:
            ep = self._endpoints[key] = self._clientEndpoint(endpoint)
        if self.onConnect is not None:
            self.onConnect(endpoint)
        factory = _OneShotFactory(conn)
        d = ep.connect(factory)
        self.active += 1

        def failed(f: Failure) -> Failure:
            self.active -= 1
            factory.protocol = None
            return f

        d.addErrback(failed)
        return d

    def _clientEndpoint(self, endpoint: Endpoint) -> IStreamClientEndpoint:
        """Built once per upstream identity: the TLS creator (CA parsing) is not redone per connection."""
        host = endpoint.host
        ep: IStreamClientEndpoint
        if _isIP(host):
            # No resolution, and a refused connection fails at once (HostnameEndpoint reports it only at its
            # next 0.3 s attempt tick).
            tcp = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
            ep = tcp(self.reactor, host, endpoint.port, timeout=self.connectTimeout)
        else:
            ep = HostnameEndpoint(self.reactor, host, endpoint.port, timeout=self.connectTimeout)
        if endpoint.scheme == "https":
            ep = wrapClientTLS(tlsCreator(host, endpoint.tls, self.reactor), ep)
        return ep

    def _release(self, conn: UpstreamConnection) -> None:
        if self.closed or not conn.keepAlive:
            _close(conn)
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.maxIdlePerKey:
            _close(conn)
            return
        idle.append(conn)
        conn.idleSince = self.reactor.seconds()
        # One timer per connection, not one per request: a pending one fires no later than this deadline and
        # re-arms (see _expire).
        if id(conn) not in self._timers:
            self._timers[id(conn)] = self.reactor.callLater(self.idleTimeout, self._expire, conn)

    def _cancelIdle(self, conn: UpstreamConnection) -> None:
        timer = self._timers.pop(id(conn), None)
        if timer is not None and timer.active():  # type: ignore[attr-defined]
            timer.cancel()  # type: ignore[attr-defined]

    def _expire(self, conn: UpstreamConnection) -> None:
        self._timers.pop(id(conn), None)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            left = conn.idleSince + self.idleTimeout - self.reactor.seconds()
            if left > 1e-9:
                self._timers[id(conn)] = self.reactor.callLater(left, self._expire, conn)
                return
            idle.remove(conn)
            _close(conn)

    def _lost(self, conn: UpstreamConnection) -> None:
        self.active -= 1
        self._cancelIdle(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if idle is not None and not idle:
            del self._idle[conn.key]

    def prune(self, liveKeys: set[str]) -> None:
        """Close idle connections and drop TLS creators of upstreams no route uses any more."""
        for key in [k for k in self._idle if k not in liveKeys]:
            for conn in self._idle.pop(key):
                self._cancelIdle(conn)
                _close(conn)
        for key in [k for k in self._endpoints if k not in liveKeys]:
            del self._endpoints[key]

    def closeIdle(self) -> None:
        self.prune(set())

    def close(self) -> None:
        """Shutdown: close idle connections now, and every busy one when its exchange ends."""
        self.closed = True
        self.closeIdle()
