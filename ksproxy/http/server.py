"""
The client side of the proxy: a lean HTTP/1.1 server protocol on the reactor.

twisted.web's C{Request} reads the whole body before a resource runs; a gateway has to decide where a request
goes as soon as its headers are in, and then stream the body.  This protocol parses with llhttp (through
C{httptools}: strict about the request-smuggling shapes, and fast), hands each request to a handler at header
time as an L{Exchange}, and gives the handler a small response API that streams with backpressure.

Flow control, both ways:
  - request body: the handler calls L{Exchange.pauseBody}/L{Exchange.resumeBody} (usually because the upstream
    socket is congested), which stops reading from the client socket;
  - response body: this protocol registers itself as the streaming producer of its own transport, so when the
    client reads slowly the transport tells us, and we tell the handler's C{responseProducer} (the upstream
    connection), which stops reading from the upstream socket.
"""

from __future__ import annotations

import re
import socket
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from typing import Protocol as TypingProtocol

import attrs
import httptools
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolNegotiationFactory, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import phrase, statusBody
from .headers import Headers, renderInto
from .writes import BatchedWriter, directSocket, flushOut, noDelay

__all__ = ["ServerLimits", "Exchange", "IRequestHandler", "HTTPServerProtocol", "HTTPServerFactory"]

log = Logger()

# Reasons to stop reading from the client socket; reading resumes when none is left.
_PAUSE_BODY = 1  # the handler cannot take more request body right now
_PAUSE_PIPELINE = 2  # a pipelined request waits for the one before it to finish
_PAUSE_TUNNEL = 4  # the tunnel peer is congested
_PAUSE_END = 8  # nothing more is read: the connection ends after the responses in progress (_endAfter)

_JSON = b"application/json"
_FRAMING = frozenset([b"host", b"transfer-encoding", b"content-length", b"expect"])
# How long a closing TLS connection may wait for the client's close_notify.
_TLS_CLOSE_GRACE = 5.0
# A lingering close (L{HTTPServerProtocol._startLingering}) ends after this long with nothing arriving, or this
# long in all: nginx's lingering_timeout and lingering_time.
LINGER_IDLE = 5.0
LINGER_TOTAL = 30.0


@attrs.frozen
class ServerLimits:
    """Limits against oversized or slow requests (SPEC 9: 414, 431, 408)."""

    maxUrlBytes: int = 16 * 1024
    maxHeaderBytes: int = 64 * 1024
    maxHeaderCount: int = 128
    # From the first byte of a request to the end of its headers.
    headerTimeout: float = 30.0
    # An idle keep-alive connection (no request in progress) is closed after this long.
    keepAliveTimeout: float = 120.0


class IRequestHandler(TypingProtocol):
    def handleRequest(self, exchange: Exchange) -> None: ...


class BodyConsumer(TypingProtocol):
    def bodyData(self, data: bytes) -> None: ...

    def bodyEnd(self) -> None: ...


class ReadPausable(TypingProtocol):
    def pauseReading(self) -> None: ...

    def resumeReading(self) -> None: ...


class _LastRequest(Exception):
    """The request just read was the connection's last (C{Connection: close}, HTTP/1.0): read no further."""


def _checkTransferCodings(te: bytes) -> None:
    """
    The request's transfer codings, all of its Transfer-Encoding fields joined, when they are not plainly
    C{chunked}.  llhttp frames the body by the final C{chunked} and hands us the decoded chunks; the codings
    before it (C{gzip, chunked}) would be lost on the way upstream, so such a request is refused with 501
    (RFC 9112 7: a coding the server does not understand), and anything else but C{chunked} alone with 400.
    """
    codings = [c.strip().lower() for c in te.split(b",")]
    if codings == [b"chunked"]:
        return
    others = codings[:-1]
    if codings[-1] == b"chunked" and all(c and c != b"chunked" for c in others):
        raise _BadRequest(501, f"transfer coding not supported: {b', '.join(others).decode('latin-1')}")
    raise _BadRequest(400, "invalid Transfer-Encoding")


class _BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Exchange:
    """
    One request and its response on a client connection.

    The handler reads C{method}, C{target} (the raw request target, byte for byte), C{headers}, and answers with
    L{writeHead}, L{write}, L{finish} (or L{sendError}); it takes the request body by setting a consumer with
    L{setBodyConsumer}.  Until a consumer is set the body is held (and reading from the client is paused), so a
    handler may decide asynchronously (e.g. after an authentication round trip) without losing bytes.
    """

    __slots__ = (
        "channel",
        "method",
        "target",
        "version",
        "headers",
        "keepAlive",
        "upgrade",
        "expectContinue",
        "hasBody",
        "startedAt",
        "route",
        "upstreamName",
        "generation",
        "code",
        "bytesSent",
        "responseProducer",
        "onClientGone",
        "_consumer",
        "_held",
        "_bodyDone",
        "_headSent",
        "_chunked",
        "_noBody",
        "_finished",
        "_tunnel",
        "_continueSent",
        "_pending",
        "_headBuf",
    )

    def __init__(
        self,
        channel: HTTPServerProtocol,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        keepAlive: bool,
        upgrade: bool,
        hasBody: bool,
        startedAt: float,
    ) -> None:
        self.channel = channel
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keepAlive = keepAlive
        self.upgrade = upgrade
        self.hasBody = hasBody
        self.startedAt = startedAt
        self.expectContinue = False
        # Filled in by the handler for the access log.
        self.route: str = "-"
        self.upstreamName: str = "-"
        self.generation: int = 0
        self.code = 0
        self.bytesSent = 0
        # Whatever feeds the response (the upstream connection): paused while the client reads slowly.
        self.responseProducer: Optional[ReadPausable] = None
        self.onClientGone: Optional[Callable[[], None]] = None
        self._consumer: Optional[BodyConsumer] = None
        self._held: List[bytes] = []
        self._bodyDone = not hasBody
        self._headSent = False
        self._chunked = False
        self._noBody = False
        self._finished = False
        self._tunnel: Optional[Callable[[bytes], None]] = None
        self._continueSent = False
        # Response bytes held back while corked (see L{cork}); None when not corked.
        self._pending: Optional[List[bytes]] = None

    # -- request side --------------------------------------------------------------------------------------

    @property
    def bodyComplete(self) -> bool:
        return self._bodyDone

    @property
    def headSent(self) -> bool:
        return self._headSent

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def congestedByClient(self) -> bool:
        """The client is not reading our response fast enough right now."""
        return self.channel._congested

    @property
    def clientAddress(self) -> str:
        return self.channel.peerHost

    @property
    def secure(self) -> bool:
        return self.channel.secure

    def setBodyConsumer(self, consumer: BodyConsumer) -> None:
        """Deliver the request body (what was held, then the rest as it arrives) to C{consumer}."""
        self._consumer = consumer
        held, self._held = self._held, []
        for chunk in held:
            consumer.bodyData(chunk)
        if self._bodyDone:
            consumer.bodyEnd()
        else:
            self.resumeBody()
            if self.expectContinue and not self._continueSent:
                self.sendContinue()

    def discardBody(self) -> None:
        """The handler will not read the body (it answered by itself)."""
        self._held = []
        self._consumer = _DISCARD

    def _unlink(self) -> None:
        """
        The exchange is over: drop the links to its handler, which refers back to it (a proxy call holds its
        exchange).  Both are then freed by reference counting when the request ends, rather than left for the
        cycle collector: no collector work per request, and nothing the collector must find later once the
        live route table is frozen out of its sight (L{ksproxy.routing.background}).
        """
        self.onClientGone = None
        self.responseProducer = None
        self._tunnel = None
        if self._consumer is not None:
            self._consumer = _DISCARD  # body bytes still arriving are read on and dropped

    def pauseBody(self) -> None:
        self.channel._pause(_PAUSE_BODY)

    def resumeBody(self) -> None:
        self.channel._unpause(_PAUSE_BODY)

    def sendContinue(self) -> None:
        """Send C{100 Continue} (at most once, and only before the response head)."""
        if not self._continueSent and not self._headSent and self.version == b"1.1":
            self._continueSent = True
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _bodyData(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer.bodyData(data)
        else:
            self._held.append(data)
            self.pauseBody()

    def _bodyEnd(self) -> None:
        self._bodyDone = True
        if self._consumer is not None:
            self._consumer.bodyEnd()

    # -- response side -------------------------------------------------------------------------------------

    def cork(self) -> None:
        """
        Hold response bytes until L{uncork} (or L{finish}): a head and the body bytes that came with it go out
        in one send instead of one per call.
        """
        if self._pending is None:
            self._pending = []

    def uncork(self) -> None:
        """Send what L{cork} held, now."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if not pending:
            return
        self.channel._writeOut(pending)

    def _send(self, data: bytes) -> None:
        pending = self._pending
        if pending is not None:
            pending.append(data)
        else:
            self.channel._writeOut([data])

    def writeHead(
        self,
        code: int,
        headers: Sequence[Tuple[bytes, bytes]] | Headers,
        *,
        reason: Optional[bytes] = None,
        length: Optional[int] = None,
        noBody: bool = False,
    ) -> None:
        """
        Send the status line and headers.  C{headers} must not contain framing headers (Content-Length,
        Transfer-Encoding, Connection): this method adds them.  C{length} None means "unknown": chunked for
        HTTP/1.1 clients, close-delimited for HTTP/1.0.  C{noBody} for HEAD, 204, 304 and 1xx.
        """
        if self._headSent:
            raise RuntimeError("response head already sent")
        self._headSent = True
        self.code = code
        channel = self.channel
        if channel._closing:
            # The server is draining: this is the last response on this connection.  Unless the connection
            # ends after the responses in progress (L{HTTPServerProtocol._endAfter}): then only the last of
            # them says so, and not when a rejection is still to follow it.
            end = channel._endAfter
            if end is None or end is _AT_EOF and not channel._queue:
                self.keepAlive = False
        if self.method == b"HEAD" or code in (204, 304) or 100 <= code < 200:
            noBody = True
        self._noBody = noBody
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, reason or phrase(code))]
        if isinstance(headers, Headers):
            renderInto(lines, headers.items)
        else:
            for name, value in headers:
                lines += (name, b": ", value, b"\r\n")
        if code == 101:
            lines.append(b"Connection: Upgrade\r\n")
        else:
            if length is not None:
                if code != 204 and not (100 <= code < 200):
                    lines.append(b"Content-Length: %d\r\n" % length)
            elif not noBody:
                if self.version == b"1.1":
                    self._chunked = True
                    lines.append(b"Transfer-Encoding: chunked\r\n")
                else:
                    self.keepAlive = False
            if not self._bodyDone and self._consumer is not _DISCARD:
                # We answer before the whole body is in, and nobody reads the rest of it to drop it (there is no
                # reader, or the handler still owns it: an upstream that answered early): the connection ends
                # with this response, and the head must say so, or the client sends its next request into a
                # closed connection.  A discarded body is read on and dropped instead.
                self.keepAlive = False
            if not self.keepAlive:
                lines.append(b"Connection: close\r\n")
            elif self.version != b"1.1":
                lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        # Kept (one slot store, no copy) so that L{retractHead} can find it while it is still queued.
        head = self._headBuf = b"".join(lines)
        self._send(head)

    def retractHead(self) -> bool:
        """
        Take back a response head that has not left yet, with whatever of the response followed it, so that the
        handler can answer otherwise (a 502 for an upstream that failed right after its head).  The head has
        not left while it is held by L{cork} or queued for the end of this reactor turn (the channel's outbox);
        once it is written to the transport it has, and this returns False (the caller must L{abort}).
        Rare path only: it scans the queued chunks.
        """
        head = getattr(self, "_headBuf", None)  # (unset until writeHead)
        if head is None or self._finished or self._tunnel is not None:
            return False
        pending = self._pending
        # Queued on the channel before anything still corked: a head found there takes all that is corked too.
        for queue in (self.channel._out, pending):
            if not queue:
                continue
            for i, chunk in enumerate(queue):
                if chunk is head:
                    del queue[i:]  # what came before it (a 100 Continue) is this exchange's too, and stands
                    if queue is not pending and pending:
                        del pending[:]
                    self._headBuf = None
                    self._headSent = False
                    self._chunked = False
                    self._noBody = False
                    self.code = 0
                    self.bytesSent = 0
                    return True
        return False

    def write(self, data: bytes) -> None:
        if self._finished or self._noBody or not data:
            return
        self.bytesSent += len(data)
        if self._chunked and self._tunnel is None:
            pending = self._pending
            if pending is not None:
                pending.extend((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                self.channel._writeOut([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self._send(data)

    def finish(self, trailers: Optional[Sequence[Tuple[bytes, bytes]]] = None) -> None:
        """The response is complete."""
        if self._finished:
            return
        self._finished = True
        if self._chunked:
            if trailers:
                self._send(b"".join([b"0\r\n", *[b"%s: %s\r\n" % (n, v) for n, v in trailers], b"\r\n"]))
            else:
                self._send(b"0\r\n\r\n")
        self.uncork()
        self.channel._exchangeFinished(self)

    def abort(self) -> None:
        """Something failed after the head went out: cut the connection so the client sees it incomplete."""
        if self._finished:
            return
        self._finished = True
        self.keepAlive = False
        self._pending = None
        self.channel._exchangeFinished(self, aborted=True)

    def sendError(
        self, code: int, message: str, extraHeaders: Sequence[Tuple[bytes, bytes]] = (), reason: Optional[str] = None
    ) -> None:
        """Answer with a Kubernetes C{Status} body; if the head is already out, abort instead."""
        if self._headSent:
            self.abort()
            return
        body = statusBody(code, message, reason)
        self.cork()
        self.writeHead(
            code, [(b"Content-Type", _JSON), (b"Cache-Control", b"no-store"), *extraHeaders], length=len(body)
        )
        self.write(body)
        self.finish()

    # -- upgrades ------------------------------------------------------------------------------------------

    def startTunnel(self, receive: Callable[[bytes], None]) -> None:
        """
        After a C{101} head has been written: every further byte from the client goes to C{receive}, and
        L{write} sends raw bytes.  L{finish} ends the tunnel (and the connection).
        """
        self._tunnel = receive
        self.keepAlive = False
        self._chunked = False
        self._noBody = False
        self.channel._enterTunnel(self)

    def pauseTunnel(self) -> None:
        self.channel._pause(_PAUSE_TUNNEL)

    def resumeTunnel(self) -> None:
        self.channel._unpause(_PAUSE_TUNNEL)


class _Discard:
    def bodyData(self, data: bytes) -> None:
        pass

    def bodyEnd(self) -> None:
        pass


_DISCARD = _Discard()

# L{HTTPServerProtocol._endAfter} when the client sent its FIN: close after the responses in progress.
_AT_EOF = (0, "")


@implementer(IPushProducer, IHalfCloseableProtocol)
class HTTPServerProtocol(BatchedWriter, Protocol):
    """One client connection: parse requests, hand them to the handler, write responses in order."""

    # Initial state as class attributes: an instance dict holds only what a connection has changed, which
    # keeps it small (CPython shares the keys of small instance dicts) and makes a connection cheaper to set up.
    peerHost = "-"
    secure = False
    _sock: Optional[socket.socket] = None  # for writing through (L{sendNow}); None on TLS
    _urlLen = 0
    _headerBytes = 0
    _current: Optional[Exchange] = None  # the exchange whose response is being written
    _parsing: Optional[Exchange] = None  # the exchange whose request is being parsed
    _pauses = 0
    _congested = False
    _closing = False
    _lastRead = False  # the last request (Connection: close, HTTP/1.0) is read: nothing after it is
    _tunnelled: Optional[Exchange] = None
    # One timer per connection for both the keep-alive and the header timeout (see L{_ensureTimer}).
    _timer = None
    _arrivalQueued = False  # its first deadline is kept by the factory (L{HTTPServerFactory._arrived})
    _idleSince = 0.0  # when the connection last became idle
    _headSince = 0.0  # when the request head being read began
    _gone = False
    # A request head is being read: its bytes count against the limits before llhttp hands them over.
    _inHead = False
    _fresh = False
    _headSeen = 0
    # Body phase: whether this read carried body bytes, and the bytes of reads in a row that carried none.
    _bodyRead = False
    _noBodyRun = 0
    _h2 = None  # the HTTP/2 connection, once ALPN chose h2
    _producing = False  # registered as our transport's producer
    _linger = None  # the closing grace timer: a TLS close_notify, or a lingering close
    _lingerSince = 0.0
    _lingerLast = 0.0  # when bytes last arrived during a lingering close
    # The connection ends once the requests in progress are answered (reading has stopped): with a rejection
    # to write then, (code, message), for a bad request that came behind them; or L{_AT_EOF}, the client's
    # FIN.  None otherwise.
    _endAfter: Optional[Tuple[int, str]] = None

    def __init__(self, factory: HTTPServerFactory) -> None:
        self.factory = factory
        self.handler = factory.handler
        self.limits = factory.limits
        self.clock = factory.clock
        self._timerSpan = factory._timerSpan  # see _ensureTimer
        self._out: List[bytes] = []  # written in this reactor turn, sent at its end (L{_Outbox})
        self._parser = httptools.HttpRequestParser(self)
        self._url: List[bytes] = []
        self._headers: List[List[bytes]] = []  # Headers items: [lowerName, name, value]
        self._queue: List[Exchange] = []  # pipelined exchanges waiting for their turn

    # -- connection ---------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        self._sock = directSocket(transport)
        client = getattr(transport, "client", None)
        if type(client) is tuple:  # a TCP connection's (host, port, ...), which getPeer() would wrap
            self.peerHost = client[0]
        else:
            self.peerHost = getattr(transport.getPeer(), "host", None) or "unix"
        if self._sock is None:
            self.secure = bool(getattr(transport, "TLS", False) or _isTLS(transport))
        if self.secure:
            # ALPN has its answer once the handshake is over, which is before the first application byte.
            self.dataReceived = self._firstSecureData  # type: ignore[method-assign]
        transport.registerProducer(self, True)
        self._producing = True
        noDelay(transport)
        self.factory._connectionMade(self)
        self._idleSince = self.clock.seconds()
        # Until its first request begins, a connection has the header timeout, not the keep-alive one: a client
        # that connects and says nothing holds a socket for headerTimeout at most (as nginx's client_header_timeout).
        self._fresh = True
        # Its first deadline is kept by the factory's queue of new connections, not a timer of its own: a
        # connection that sends one request and closes then never schedules or cancels a DelayedCall.
        self._arrivalQueued = True
        self.factory._arrived(self, self._idleSince)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._gone = True
        self._out = []
        # The parser holds our bound callbacks: let the pair go by reference counting (see Exchange._unlink).
        self._parser = None
        self._cancelTimer()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self.factory._connectionLost(self)
        if self._h2 is not None:
            self._h2.connectionLost(reason)
            return
        self._cancelAll()

    def _cancelAll(self) -> None:
        pending = [e for e in (self._current, self._parsing, *self._queue) if e is not None]
        self._current = self._parsing = None
        self._queue = []
        seen = set()
        for exchange in pending:
            if id(exchange) in seen:
                continue
            seen.add(id(exchange))
            self._cancel(exchange)

    # IPushProducer for our own transport: the client is not reading fast enough.
    def pauseProducing(self) -> None:
        self._congested = True
        if self._h2 is not None:
            self._h2.pauseProducing()
            return
        producer = self._current.responseProducer if self._current is not None else None
        if producer is not None:
            producer.pauseReading()

    def resumeProducing(self) -> None:
        self._congested = False
        if self._h2 is not None:
            self._h2.resumeProducing()
            return
        producer = self._current.responseProducer if self._current is not None else None
        if producer is not None:
            producer.resumeReading()

    def stopProducing(self) -> None:
        pass

    # IHalfCloseableProtocol (plain TCP; a TLS connection's FIN still arrives as connectionLost).  Without it
    # Twisted closes the socket at the client's FIN, and whatever was still to be written (a rejection, an
    # answer in the transport's buffer) is lost.

    def readConnectionLost(self) -> None:
        """
        The client sent its FIN (C{shutdown(SHUT_WR)}, C{nc -N}): it sends nothing more.  Requests it sent in
        full are still answered, then the connection closes (as HAProxy does); one it did not finish is
        cancelled.  A FIN while a response is already on its way is a client that went away (a half-closing
        client sends it right after its request, long before an answer starts): cancelled at once, so an
        abandoned stream (a watch, a download) frees its upstream request now, not at its next write.
        """
        if self._gone:
            return
        if self._linger is not None:
            # We closed our side (a lingering close, a TLS grace) and waited for this: close once flushed.
            self.transport.loseConnection()
            return
        if self._h2 is not None or self._tunnelled is not None or self._parsing is not None:
            # A tunnel ends with the client's side, as before; so does a request whose body will never be
            # complete (the client gave up on it): cancelled, and the upstream request with it.
            self._closing = True
            self._cancelAll()
            self.loseConnection()
            return
        if self._current is None:
            # Nothing in progress (a partial head is dropped).
            self.loseConnection()
            return
        if self._current._headSent:
            self._closing = True
            self._cancelAll()
            self.loseConnection()
            return
        if self._endAfter is None:
            # No more requests: answer those in progress, then close (L{_afterExchange}).
            self._endAfter = _AT_EOF
            self._closing = True
            self._lastRead = True
            self._pause(_PAUSE_END)  # (else a resumed transport would read the EOF again)

    def writeConnectionLost(self) -> None:
        """Our FIN is out (a lingering close): we read on until the client closes (L{readConnectionLost})."""


    def loseConnection(self, linger: bool = False) -> None:
        """
        Close after what is buffered has been written.  We unregister as the transport's producer first: a
        transport whose producer is paused resumes it instead of closing when its buffer drains, and would then
        stay open for good.

        C{linger}: the client may still be sending (a body we did not read to its end, a request we rejected):
        close our side only, and read on for a while (L{_startLingering}).
        """
        transport = self.transport
        self._cancelTimer()
        flushOut(self)  # what this turn queued goes before the close
        if self._producing:
            self._producing = False
            transport.unregisterProducer()
        if linger and not self.secure and self._linger is None and not self._gone:
            halfClose = getattr(transport, "loseWriteConnection", None)
            if halfClose is not None:
                self._startLingering(halfClose)
                return
        transport.loseConnection()
        if self.secure and not self._gone and self._linger is None:
            # TLS waits for the client's close_notify before it closes the socket: do not wait forever.
            self._linger = self.clock.callLater(_TLS_CLOSE_GRACE, self._abortLingering)

    def _abortLingering(self) -> None:
        self._linger = None
        if not self._gone:
            self._out = []  # queued bytes must not follow an abort
            self.transport.abortConnection()

    def _startLingering(self, halfClose: Callable[[], None]) -> None:
        """
        A lingering close (RFC 9112 9.6, nginx's lingering_close): send our FIN after the answer, then read and
        drop whatever the client still sends until it closes, for at most L{LINGER_TOTAL} and L{LINGER_IDLE}
        with nothing arriving.  Closing with unread bytes makes the kernel send a reset, and a client still
        writing its body then sees a broken pipe instead of the answer waiting for it.
        """
        self._closing = True
        parsing, self._parsing = self._parsing, None
        if parsing is not None:
            self._cancel(parsing)  # (a no-op for the exchange just answered)
        now = self.clock.seconds()
        self._lingerSince = self._lingerLast = now
        self._pauses = 0
        self.transport.resumeProducing()
        halfClose()
        self._linger = self.clock.callLater(LINGER_IDLE, self._lingerCheck)

    def _lingerCheck(self) -> None:
        self._linger = None
        if self._gone:
            return
        due = min(self._lingerLast + LINGER_IDLE, self._lingerSince + LINGER_TOTAL)
        left = due - self.clock.seconds()
        if left > 1e-9:
            self._linger = self.clock.callLater(left, self._lingerCheck)
            return
        self._abortLingering()

    @property
    def congested(self) -> bool:
        return self._congested

    # -- reading --------------------------------------------------------------------------------------------

    def _firstSecureData(self, data: bytes) -> None:
        del self.dataReceived  # back to the class's method: this check runs once per connection
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            from .h2 import H2ServerConnection

            self._cancelTimer()
            self._h2 = H2ServerConnection(self)
            # The HTTP/2 connection reads the socket from now on; we stay the transport's producer and relay.
            self.dataReceived = self._h2.dataReceived  # type: ignore[method-assign]
            self._h2.makeConnection(self.transport)
        self.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self._tunnelled is not None:
            receive = self._tunnelled._tunnel
            if receive is not None:
                receive(data)
            return
        if self._lastRead or self._closing and self._parsing is None and self._current is None:
            if self._linger is not None:
                self._lingerLast = self.clock.seconds()  # dropped, but the client is still there
            return
        try:
            self._parser.feed_data(data)
            if self._inHead:
                # llhttp holds a header line until its end: a line that never ends must not grow without bound.
                # (A head that began in this read is counted from the next one: one read of slack.)
                self._headSeen = self._headSeen + len(data) if self._headSeen >= 0 else 0
                if self._headSeen > self._headBudget:
                    raise _BadRequest(431, "request headers too large")
            elif self._bodyRead:
                self._bodyRead = False
                self._noBodyRun = 0
            elif self._parsing is not None:
                # Inside a body, a read that carried no body bytes: chunk framing, chunk extensions or
                # trailers.  Those have no use in bulk, and llhttp holds an unfinished trailer line as it grows:
                # bounded like a head.
                self._noBodyRun += len(data)
                if self._noBodyRun > self._headBudget:
                    raise _BadRequest(431, "request trailers or chunk extensions too large")
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            rest = data[offset:]
            exchange = self._parsing or self._current
            if exchange is not None and rest:
                # Bytes after the upgrade request belong to the tunnel, once it exists.
                exchange._held.append(rest) if exchange._consumer is None else exchange._consumer.bodyData(rest)
            self._pause(_PAUSE_PIPELINE)
        except _BadRequest as bad:
            self._reject(bad.code, bad.message)
        except httptools.HttpParserCallbackError as e:
            # In a method of its own: a local here holding the cause would form a cycle with this frame, which
            # the cause's traceback holds.
            self._callbackRaised(e.__context__)
        except httptools.HttpParserInvalidMethodError:
            self._reject(400, "invalid request method")
        except httptools.HttpParserInvalidURLError:
            self._reject(400, "invalid request target")
        except httptools.HttpParserError as e:
            self._reject(400, f"malformed request: {_describe(e)}")

    def _callbackRaised(self, cause: Optional[BaseException]) -> None:
        """What one of our parser callbacks raised, as llhttp hands it back."""
        if isinstance(cause, _LastRequest):
            return
        if isinstance(cause, _BadRequest):
            self._reject(cause.code, cause.message)
            return
        log.failure("request handler failed", Failure(cause) if cause else None)
        self._reject(500, "internal error")

    def _reject(self, code: int, message: str) -> None:
        """
        A request we cannot parse: answer, then close (the byte stream is no longer trustworthy).  Requests in
        front of it that are still being answered are answered first (responses go in request order): the
        rejection waits for them (L{_endAfter}), and nothing more is read or dispatched meanwhile.
        """
        if self._closing and self._current is None and self._parsing is None:
            # Already closing with its last answer out (the rest of a read that ended the connection): nothing
            # more may be written.
            return
        current = self._current
        parsing = self._parsing
        if parsing is not None:
            # The bad bytes are in this request's body: it is the one rejected.
            self._parsing = None
            if parsing is current:
                if current._headSent:
                    # Its response already streams: cut both sides.
                    self._closing = True
                    self._cancel(current)
                    self._out = []  # queued bytes must not follow an abort
                    self.transport.abortConnection()
                    return
                current = None
            elif parsing in self._queue:
                self._queue.remove(parsing)
            self._cancel(parsing)
        self._closing = True
        self._lastRead = True  # nothing after the bad bytes is parsed
        if current is not None:
            # An earlier request is still being answered: the rejection goes out after it (and after any
            # queued behind it), then the connection closes (L{_afterExchange}).  Its own timeouts bound the wait.
            self._endAfter = (code, message)
            self._pause(_PAUSE_END)
            return
        self._writeRejection(code, message)

    def _writeRejection(self, code: int, message: str) -> None:
        """Write a rejection's Status answer, then close, lingering: the client may be sending more."""
        self._current = None
        body = statusBody(code, message)
        flushOut(self)
        self.transport.writeSequence(
            [
                b"HTTP/1.1 %d %s\r\n" % (code, phrase(code)),
                b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body),
                body,
            ]
        )
        self.factory._logRejected(self, code, message, len(body))
        self.loseConnection(linger=True)

    def _cancel(self, exchange: Exchange) -> None:
        """The client side of C{exchange} is gone or unusable: tell the handler so it drops the upstream."""
        if not exchange._finished:
            exchange._finished = True
            if exchange.onClientGone is not None:
                exchange.onClientGone()
            self.factory._logExchange(exchange, aborted=True)
            exchange._unlink()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._closing and self._current is None and self._parsing is None:
            # The connection closed during this read (a lingering close): what follows in it is not a request.
            raise _LastRequest()
        self._url = []
        self._urlLen = 0
        self._headers = []
        self._headerBytes = 0
        self._inHead = True
        self._fresh = False
        self._headSeen = -1
        if self._current is None:
            # The connection's timer already fires no later than now + headerTimeout (see _ensureTimer).
            self._headSince = self.clock.seconds()

    @property
    def _headBudget(self) -> int:
        # Request line and header block, with room for the framing bytes the limits do not count.
        limits = self.limits
        return limits.maxUrlBytes + limits.maxHeaderBytes + 4 * limits.maxHeaderCount + 1024

    def on_url(self, url: bytes) -> None:
        self._urlLen += len(url)
        if self._urlLen > self.limits.maxUrlBytes:
            raise _BadRequest(414, "request target too long")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headerBytes += len(name) + len(value) + 4
        if self._headerBytes > self.limits.maxHeaderBytes or len(self._headers) >= self.limits.maxHeaderCount:
            raise _BadRequest(431, "request headers too large")
        # llhttp keeps trailing whitespace of a value; RFC 9112 says it is not part of it.
        self._headers.append([name.lower(), name, value.rstrip(b" \t")])

    def on_headers_complete(self) -> None:
        self._inHead = False
        self._noBodyRun = 0
        parser = self._parser
        items = self._headers
        headers = Headers.fromItems(items)
        target = b"".join(self._url) if len(self._url) != 1 else self._url[0]
        version = _VERSIONS.get(parser.get_http_version()) or parser.get_http_version().encode("ascii")
        method = parser.get_method()
        # One pass for the framing facts (not one scan per question).
        te = cl = expect = host = None
        hosts = 0
        for lname, _, value in items:
            if lname in _FRAMING:
                if lname == b"host":
                    hosts += 1
                    host = value
                elif lname == b"transfer-encoding":
                    te = value if te is None else te + b"," + value
                elif lname == b"content-length":
                    if cl is None:
                        cl = value
                elif expect is None:
                    expect = value
        hasBody = te is not None or (cl is not None and cl not in (b"0", b""))
        upgrade = parser.should_upgrade()
        if upgrade and method == b"CONNECT":
            raise _BadRequest(405, "CONNECT is not supported")
        if version not in (b"1.1", b"1.0"):
            raise _BadRequest(400, "unsupported HTTP version")
        if te is not None:
            if version != b"1.1":
                # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
                raise _BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te != b"chunked":
                _checkTransferCodings(te)
        if version == b"1.1" and not hosts:
            raise _BadRequest(400, "missing Host header")
        if hosts > 1:
            raise _BadRequest(400, "more than one Host header")
        if host and host not in _validHosts and not validHost(host):
            # RFC 9112 3.2: a Host that is not host[:port] is a 400 (it would reach X-Forwarded-Host and rules).
            raise _BadRequest(400, "invalid Host header")
        exchange = Exchange(
            self,
            method,
            target,
            version,
            headers,
            parser.should_keep_alive() and not self._closing,
            upgrade,
            hasBody,
            self.clock.seconds(),
        )
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise _BadRequest(417, "unsupported Expect value")
            exchange.expectContinue = version == b"1.1" and hasBody
        if upgrade:
            # Whatever follows belongs to the tunnel, or to nobody if the upgrade is refused.
            exchange.keepAlive = False
        self._parsing = exchange
        if self._current is None:
            # No timeout while the handler works: the timer, when it fires, finds the connection busy.
            self._current = exchange
            self._dispatch(exchange)
        else:
            self._queue.append(exchange)
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, data: bytes) -> None:
        self._bodyRead = True
        exchange = self._parsing
        if exchange is not None:
            exchange._bodyData(data)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        self._parsing = None
        if exchange is not None and not exchange.upgrade:
            exchange._bodyEnd()
            if not exchange.keepAlive:
                # What the client sends after its last request is not read (llhttp would call it malformed
                # and the answer to the last request would become a 400): the connection closes after it.
                self._lastRead = True
                raise _LastRequest()

    def _dispatch(self, exchange: Exchange) -> None:
        try:
            self.handler.handleRequest(exchange)
        except Exception:
            log.failure("request handler raised")
            if not exchange._finished:
                exchange.sendError(500, "internal error")

    # -- writing and pipelining -----------------------------------------------------------------------------

    def _exchangeFinished(self, exchange: Exchange, aborted: bool = False) -> None:
        try:
            self._afterExchange(exchange, aborted)
        finally:
            exchange._unlink()

    def _afterExchange(self, exchange: Exchange, aborted: bool) -> None:
        if self._out and not aborted:
            # The response is complete: send it now, not after the access log, the metrics and the next
            # request's set-up (the client's latency, most visible at low load).
            flushOut(self)
        self.factory._logExchange(exchange, aborted=aborted)
        if self._gone:
            return
        if exchange is not self._current:
            return
        self._current = None
        self._unpause(_PAUSE_BODY | _PAUSE_TUNNEL)
        if aborted:
            self._out = []  # queued bytes must not follow an abort
            self.transport.abortConnection()
            return
        stillSending = exchange is self._parsing and not exchange._bodyDone
        if not exchange.keepAlive or exchange._tunnel is not None or self._closing and not self._queue:
            end = self._endAfter
            if end is not None:
                # The last response before the end: write the rejection that waited for it, or (the client's
                # FIN) just close.
                if end is not _AT_EOF and exchange.keepAlive:
                    self._writeRejection(*end)
                else:
                    self.loseConnection(linger=end is not _AT_EOF)
                return
            self.loseConnection(linger=stillSending)
            return
        if stillSending and exchange._consumer is not _DISCARD:
            # Answered before its body was read, by a handler that still owns it: do not reuse the connection.
            # (A discarded body is read on and dropped instead.  A request without a body, answered at once, is
            # simply complete.)
            self.loseConnection(linger=True)
            return
        if self._queue:
            nxt = self._queue.pop(0)
            self._current = nxt
            if not self._queue:
                self._unpause(_PAUSE_PIPELINE)
            self._dispatch(nxt)
        else:
            self._unpause(_PAUSE_PIPELINE)
            if self.factory.draining:
                self.loseConnection()
            else:
                now = self.clock.seconds()
                if self._inHead:
                    # The next request's head is partly in: its clock runs from now.
                    self._headSince = now
                else:
                    self._idleSince = now
                self._ensureTimer(now)

    def _enterTunnel(self, exchange: Exchange) -> None:
        self._tunnelled = exchange
        self._parsing = None
        held, exchange._held = exchange._held, []
        self._unpause(_PAUSE_PIPELINE | _PAUSE_BODY)
        for chunk in held:
            exchange._tunnel(chunk)  # type: ignore[misc]

    # -- pausing --------------------------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._pauses and not self._gone:
            self.transport.pauseProducing()
        self._pauses |= reason

    def _unpause(self, reasons: int) -> None:
        if not self._pauses & reasons:
            return
        self._pauses &= ~reasons
        if not self._pauses and not self._gone:
            self.transport.resumeProducing()

    # -- timers ---------------------------------------------------------------------------------------------

    # The keep-alive deadline (idle since + keepAliveTimeout) and the header deadline (head began + headerTimeout)
    # share one DelayedCall that is never moved sooner (Twisted does that with a linear scan of its timer heap) and
    # is not touched per request: whenever the connection is idle or reading a head, it fires no later than
    # min(headerTimeout, keepAliveTimeout) after the last state change, so no deadline can pass unseen; when it
    # fires early it re-arms for what is left.

    def _ensureTimer(self, now: float) -> None:
        if self._arrivalQueued:
            self._leaveArrivals()
        span = self._timerSpan
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= now + span:
                return
            timer.cancel()
        self._timer = self.clock.callLater(span, self._timedOut)

    def _leaveArrivals(self) -> None:
        self._arrivalQueued = False
        self.factory._left(self)

    def _cancelTimer(self) -> None:
        if self._arrivalQueued:
            self._leaveArrivals()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        if self._current is not None or self._gone:
            return  # busy: re-armed when the exchange finishes
        limits = self.limits
        now = self.clock.seconds()
        if self._inHead:
            left = self._headSince + limits.headerTimeout - now
        else:
            # A head may begin at any moment: its deadline is at least headerTimeout away.
            idleLimit = limits.headerTimeout if self._fresh else limits.keepAliveTimeout
            left = min(self._idleSince + idleLimit - now, limits.headerTimeout)
        if left > 1e-9:
            self._timer = self.clock.callLater(left, self._timedOut)
            return
        if self._inHead:
            # Slow headers: tell the client why before closing.
            self._reject(408, "timed out reading request headers")
        else:
            self.loseConnection()

    # -- shutdown -------------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Finish what is in progress, take no new request, then close."""
        self._closing = True
        if self._h2 is not None:
            self._h2.drain()
        elif self._current is None and self._parsing is None:
            self.loseConnection()

    @property
    def busy(self) -> bool:
        """A request is in progress (or a tunnel is open) on this connection."""
        if self._h2 is not None:
            return bool(self._h2.streams)
        return self._current is not None or self._tunnelled is not None


# RFC 3986 host (IP-literal, IPv4 or reg-name) and an optional port; empty is allowed (RFC 9112 3.2).
_VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?\Z").match


# Host values already found valid: most requests repeat a handful of them (checked once each).
_validHosts: set = set()


def validHost(host: bytes) -> bool:
    """Whether a Host (or HTTP/2 C{:authority}) value is host[:port] (RFC 9112 3.2); empty is valid."""
    if host in _validHosts:
        return True
    if not _VALID_HOST(host):
        return False
    if len(_validHosts) >= 1024:
        _validHosts.clear()  # bounded: a client cycling through names costs a regex match each, no memory
    _validHosts.add(host)
    return True


# The request methods llhttp parses (its HTTP list; it refuses any other token, lower case included).  HTTP/1.1
# gets this check from llhttp itself; HTTP/2 has no request line, so it checks C{:method} against the same set
# (tests/unit pins the two together).
REQUEST_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND"
    b" REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE"
    b" MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)

# The request-target bytes llhttp accepts (visible ASCII; no space, control or 8-bit byte).  As with the
# methods, HTTP/2 checks C{:path} explicitly: a space there would split the upstream request line.
validTarget = re.compile(rb"[\x21-\x7e]+\Z").match

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


def _isTLS(transport: object) -> bool:
    from twisted.internet.interfaces import ISSLTransport

    return ISSLTransport.providedBy(transport)


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.rstrip(".")


@implementer(IProtocolNegotiationFactory)
class HTTPServerFactory(Factory):
    """
    Builds L{HTTPServerProtocol}s for one listener and tracks open connections for graceful shutdown.

    It names the protocols it speaks for ALPN: behind Twisted's own C{ssl:} endpoint, whose ALPN callback
    (Twisted 26) answers a client that offers ALPN with an internal-error alert when the server names none,
    which is every browser and curl.

    @ivar accessLog: called with each finished exchange (and whether it was aborted).
    """

    protocol = HTTPServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        handler: IRequestHandler,
        clock,
        limits: ServerLimits = ServerLimits(),
        accessLog: Optional[Callable[[Exchange, bool], None]] = None,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits
        self.accessLog = accessLog
        self.connections: set = set()
        self.draining = False

        # New connections in arrival order, and one timer for the oldest one's deadline (L{_arrived}).
        self._arrivals: Dict[HTTPServerProtocol, None] = {}
        self._arrivalTimer = None

    def acceptableProtocols(self) -> List[bytes]:
        from ..tls.server import DEFAULT_ALPN

        return list(DEFAULT_ALPN)

    @property
    def _timerSpan(self) -> float:
        return min(self.limits.headerTimeout, self.limits.keepAliveTimeout)

    def _arrived(self, proto: HTTPServerProtocol, now: float) -> None:
        """
        Keep C{proto}'s first deadline (C{now} + its timer span) until it arms a timer of its own or goes.
        Connections arrive in deadline order, so one timer at the oldest deadline serves them all.
        """
        self._arrivals[proto] = None
        if self._arrivalTimer is None:
            self._arrivalTimer = self.clock.callLater(self._timerSpan, self._arrivalsDue)

    def _left(self, proto: HTTPServerProtocol) -> None:
        arrivals = self._arrivals
        arrivals.pop(proto, None)
        if not arrivals and self._arrivalTimer is not None:
            # Nothing left to time out: an idle gateway holds no timer.
            self._arrivalTimer.cancel()
            self._arrivalTimer = None

    def stopFactory(self) -> None:
        # The listener is gone (its connections may live on: they get timers of their own).
        timer, self._arrivalTimer = self._arrivalTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        arrivals, self._arrivals = self._arrivals, {}
        now = self.clock.seconds()
        for proto in arrivals:
            proto._arrivalQueued = False
            if not proto._gone:
                proto._timer = self.clock.callLater(max(0.0, proto._idleSince + self._timerSpan - now), proto._timedOut)

    def _arrivalsDue(self) -> None:
        self._arrivalTimer = None
        arrivals = self._arrivals
        now = self.clock.seconds()
        span = self._timerSpan
        while arrivals:
            proto = next(iter(arrivals))
            left = proto._idleSince + span - now
            if left > 1e-9:
                self._arrivalTimer = self.clock.callLater(left, self._arrivalsDue)
                return
            del arrivals[proto]
            proto._arrivalQueued = False
            try:
                proto._timedOut()  # what its own timer would have done now
            except Exception:
                log.failure("timing out {proto!r} failed", proto=proto)

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        return HTTPServerProtocol(self)

    def _connectionMade(self, proto: HTTPServerProtocol) -> None:
        self.connections.add(proto)
        if self.draining:
            proto.drain()

    def _connectionLost(self, proto: HTTPServerProtocol) -> None:
        self.connections.discard(proto)

    def _logExchange(self, exchange: Exchange, aborted: bool) -> None:
        if self.accessLog is not None:
            self.accessLog(exchange, aborted)

    def _logRejected(self, proto: HTTPServerProtocol, code: int, message: str, bodyBytes: int = 0) -> None:
        if self.accessLog is not None:
            exchange = Exchange(proto, b"-", b"-", b"1.1", Headers(), False, False, False, self.clock.seconds())
            exchange.code = code
            exchange.bytesSent = bodyBytes  # as for any response: the body bytes written
            exchange.route = "rejected: " + message
            self.accessLog(exchange, False)

    def drain(self) -> None:
        """Stop taking requests on every connection; idle ones close now, busy ones after their response."""
        self.draining = True
        for proto in list(self.connections):
            proto.drain()

    def busyConnections(self) -> int:
        return sum(1 for p in self.connections if p.busy)
