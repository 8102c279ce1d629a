"""
Forwarding one request to an upstream and streaming the answer back (SPEC 6).

A L{ProxyCall} joins an L{Exchange} (the client side) to an L{UpstreamConnection}: it writes the request head,
streams the body with backpressure both ways, relays the response (or a 101 tunnel), and maps each failure to
the right answer: 502 when the upstream cannot be reached or answers garbage (also right after a valid head,
while nothing of the response has left for the client), 504 on a timeout, an aborted client connection when
the upstream fails after the head went out.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import attrs
import httptools
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..http.headers import Headers, renderInto
from ..http.server import Exchange
from ..http.upstream import (
    UpstreamConnection,
    UpstreamPool,
    UpstreamResponseInvalid,
    UpstreamResponseTooLarge,
)
from ..model.types import Endpoint

__all__ = ["Timeouts", "HOP_BY_HOP", "UpstreamRequest", "ProxyCall", "stripHopByHop", "IDEMPOTENT"]

log = Logger()

HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        # RFC 9110 7.6.1: the field name "Close" is reserved (it would collide with the connection option).
        b"close",
    ]
)

IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])


@attrs.frozen
class Timeouts:
    """Upstream timeouts in seconds (SPEC 6).  None disables one."""

    connect: float = 10.0
    # From the end of the request head (and each body chunk sent) to the response head.
    responseHeader: Optional[float] = 60.0
    # No byte either way for this long, once the response has started.
    idle: Optional[float] = 900.0
    # The same for upgraded connections (exec shells can sit quietly for a long time).
    tunnelIdle: Optional[float] = 3600.0


# Failures that are an answer, just not one we relay: a 502 (not a stale connection to retry).
_MALFORMED = (httptools.HttpParserError, UpstreamResponseTooLarge, UpstreamResponseInvalid)


def _plainlyChunked(te: bytes) -> bool:
    """C{te} (all Transfer-Encoding fields joined with ",") is C{chunked} alone, in any case, with any OWS."""
    return [c.strip(b" \t").lower() for c in te.split(b",")] == [b"chunked"]


# What a response head loses before it is relayed: hop-by-hop headers, and Content-Length (writeHead frames).
_DROP_DOWN = HOP_BY_HOP | {b"content-length"}


def _connectionTokens(value: bytes, named: Optional[set]) -> Optional[set]:
    """Add the header names listed in one C{Connection} value to C{named} (created when needed)."""
    if value.lower() in HOP_BY_HOP:
        return named  # the usual "keep-alive" or "close": it names a header that is dropped anyway
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            if named is None:
                named = set()
            named.add(token)
    return named


def connectionNamed(headers: Headers) -> Optional[set]:
    """The header names listed in C{Connection} (lower-case), or None when there are none."""
    named = None
    for item in headers.items:
        if item[0] == b"connection":
            named = _connectionTokens(item[2], named)
    return named


def stripHopByHop(headers: Headers) -> None:
    """Remove hop-by-hop headers and every header named in C{Connection} (RFC 9110 7.6.1)."""
    named = connectionNamed(headers)
    if named:
        headers.removeMany(HOP_BY_HOP | named)
    else:
        headers.removeMany(HOP_BY_HOP)


@attrs.define
class UpstreamRequest:
    """The request as it goes to the upstream, after routing, directives and header rules."""

    endpoint: Endpoint
    method: bytes
    target: bytes
    headers: Headers
    # Applied to the response head (headerDown); may be None.
    rewriteResponse: Optional[Callable[[Headers], None]] = None
    upgrade: Optional[bytes] = None  # the Upgrade header value for upgrade requests


class _Done(Exception):
    pass


class ProxyCall:
    """One request in flight to one upstream."""

    __slots__ = (
        "exchange",
        "request",
        "pool",
        "clock",
        "timeouts",
        "health",
        "conn",
        "_chunkedUp",
        "_bodySent",
        "_headSent",
        "_retried",
        "_timer",
        "_since",
        "_limit",
        "_done",
        "_upstreamCongested",
        "_isHead",
        "_connecting",
    )

    def __init__(
        self,
        exchange: Exchange,
        request: UpstreamRequest,
        pool: UpstreamPool,
        clock,
        timeouts: Timeouts,
        health=None,
    ) -> None:
        self.exchange = exchange
        self.request = request
        self.pool = pool
        self.clock = clock
        self.timeouts = timeouts
        self.health = health
        self.conn: Optional[UpstreamConnection] = None
        self._chunkedUp = False
        self._bodySent = not exchange.hasBody
        self._headSent = False
        self._retried = False
        self._timer = None
        self._since = 0.0  # the last activity, for the running limit
        self._limit: Optional[float] = None  # the running limit (connect, response header, idle), or None
        self._done = False
        self._upstreamCongested = False
        self._isHead = request.method == b"HEAD"
        self._connecting: Optional[defer.Deferred] = None

    # -- starting -----------------------------------------------------------------------------------------

    def start(self) -> None:
        exchange = self.exchange
        exchange.onClientGone = self.clientGone
        conn = self.pool.takeIdle(self.request.endpoint)
        if conn is not None:
            self._attach(conn)
        else:
            self._connect()

    def _connect(self) -> None:
        # Our own timer (not only the endpoint's): on the injected clock, and it cancels the attempt.
        self._armTimer(self.timeouts.connect)
        d = self._connecting = self.pool.connect(self.request.endpoint)
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, conn: UpstreamConnection) -> None:
        self._connecting = None
        if self._done:  # pragma: no cover - a finished call cancels its connection attempt
            conn.abort()
            return
        self._attach(conn)

    def _connectFailed(self, reason: Failure) -> None:
        self._connecting = None
        if self._done:
            return
        if reason.check(defer.CancelledError):
            reason = Failure(TimeoutError())
        if self.health is not None:
            self.health.passiveFailure(self.request.endpoint.key)
        if reason.check(TimeoutError):
            self._error(504, f"upstream {self.request.endpoint.origin} did not accept the connection in time")
        elif reason.check(DNSLookupError):
            self._error(502, f"upstream {self.request.endpoint.origin}: host name not found")
        elif reason.check(ConnectionRefusedError, ConnectError):
            self._error(502, f"upstream {self.request.endpoint.origin} refused the connection")
        else:
            self._error(502, f"upstream {self.request.endpoint.origin} connection failed: {reason.getErrorMessage()}")

    def _attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        request = self.request
        exchange = self.exchange
        headers = request.headers
        exchange.responseProducer = self
        if exchange.hasBody and not exchange.upgrade:
            if b"content-length" not in headers:
                self._chunkedUp = True
                headers.add(b"Transfer-Encoding", b"chunked")
        head = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        renderInto(head, headers.items)
        head.append(b"\r\n")
        if self._timer is not None:
            # The connect timer ends here: from now on the connection hosts this call's timer.
            self._timer.cancel()
            self._timer = None
        conn.startRequest(self, b"".join(head), self._isHead)
        if self._chunkedUp:
            # Take it back out so a retry on a fresh connection does not add it twice.
            headers.remove(b"transfer-encoding")
        self._armTimer(self.timeouts.responseHeader)
        if exchange.congestedByClient:
            self.pauseReading()
        if exchange.hasBody:
            exchange.setBodyConsumer(self)
        # (An upgrade request without a body: what the client sent after its head belongs to the tunnel and is
        # held by the exchange until the 101, which hands it over.)

    # -- request body (BodyConsumer) ------------------------------------------------------------------------

    def bodyData(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self._done:
            return
        if self._chunkedUp:
            conn.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            conn.write(data)
        if self._limit is not None:
            # Bytes moving upward count as activity, before the response head and after it.
            self._since = self.clock.seconds()

    def bodyEnd(self) -> None:
        self._bodySent = True
        conn = self.conn
        if conn is None or self._done:
            return
        if self._chunkedUp:
            conn.write(b"0\r\n\r\n")

    # -- response (IResponseSink) ---------------------------------------------------------------------------

    def responseHead(self, code: int, reason: bytes, headers: Headers, connection: UpstreamConnection) -> None:
        exchange = self.exchange
        if 100 <= code < 200 and code != 101:
            if code == 100 and exchange.expectContinue:
                exchange.sendContinue()
            return
        self._headSent = True
        if self.health is not None:
            if code >= 500:
                self.health.passiveFailure(self.request.endpoint.key)
            else:
                self.health.passiveSuccess(self.request.endpoint.key)
        if code == 101:
            if not exchange.upgrade:
                # Switching protocols nobody asked for would hand the client a byte stream it cannot read.
                self._error(502, f"upstream {self.request.endpoint.origin} switched protocols without an upgrade request")
                return
            self._startTunnel(reason, headers)
            return
        length: Optional[int] = None
        # One pass for the framing facts, one to drop hop-by-hop headers and Content-Length (writeHead frames).
        cl = None
        te: Optional[bytes] = None
        named: Optional[set] = None
        items = headers.items
        for item in items:
            lname = item[0]
            if lname == b"content-length":
                if cl is None:
                    cl = item[2]
            elif lname == b"transfer-encoding":
                # All fields joined, as the client side does (server.py): a second field can add a coding.
                te = item[2] if te is None else te + b"," + item[2]
            elif lname == b"connection":
                named = _connectionTokens(item[2], named)
        if te is not None:
            if te != b"chunked" and not _plainlyChunked(te):
                # llhttp frames by a final chunked and drops the codings before it, and we relay the body
                # re-chunked: any other coding would reach the client undeclared (the client side answers 501).
                self._refuse(f"sent a Transfer-Encoding other than chunked: {te[:100].decode('latin-1')}")
                return
        elif cl is not None:
            try:
                length = int(cl)
            except ValueError:
                self._error(502, "upstream sent an invalid Content-Length")
                return
        drop = _DROP_DOWN | named if named else _DROP_DOWN
        headers.items = [item for item in items if item[0] not in drop]
        if self.request.rewriteResponse is not None:
            self.request.rewriteResponse(headers)
        # The body bytes of the same upstream read go out with the head (uncorked in responseFlush).
        exchange.cork()
        exchange.writeHead(code, headers, reason=reason or None, length=length)
        self._armIdle()

    def _startTunnel(self, reason: bytes, headers: Headers) -> None:
        exchange = self.exchange
        upgrade = headers.get(b"upgrade")
        stripHopByHop(headers)
        if upgrade is not None:
            headers.add(b"Upgrade", upgrade)
        if self.request.rewriteResponse is not None:
            self.request.rewriteResponse(headers)
        exchange.writeHead(101, headers, reason=reason or None)
        exchange.startTunnel(self._tunnelFromClient)
        self._armIdle()

    def _tunnelFromClient(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and not self._done:
            conn.write(data)
            if self._limit is not None:
                self._since = self.clock.seconds()

    def responseData(self, data: bytes) -> None:
        if self._done:
            return
        self.exchange.write(data)
        if self._limit is not None:
            self._since = self.clock.seconds()

    def responseFlush(self) -> None:
        self.exchange.uncork()

    def responseEnd(self, trailers: Optional[List[Tuple[bytes, bytes]]]) -> None:
        if self._done:
            return
        self._done = True
        self._cancelTimer()
        conn, self.conn = self.conn, None
        exchange = self.exchange
        exchange.responseProducer = None
        if conn is not None:
            if self._bodySent and not exchange.upgrade and conn.connected:
                conn.release()
            else:
                # The upstream answered before it had our whole body: the connection is not reusable.
                conn.abort()
        if not exchange.finished:
            exchange.finish(trailers if trailers else None)

    def upstreamLost(self, reason: Failure, gotHead: bool) -> None:
        if self._done:
            return
        conn, self.conn = self.conn, None
        if not gotHead and not self._headSent:
            malformed = reason is not None and reason.check(*_MALFORMED)
            # A reused connection that the upstream had already closed: retry once, only when that is safe.  (A
            # malformed answer is an answer: the upstream got the request, and would get it twice.)
            if (
                not malformed
                and conn is not None
                and conn.requests > 1
                and not self._retried
                and self.request.method in IDEMPOTENT
                and not self.exchange.hasBody
                and not self.exchange.upgrade
            ):
                self._retried = True
                self._cancelTimer()
                self._connect()
                return
            if self.health is not None:
                self.health.passiveFailure(self.request.endpoint.key)
            origin = self.request.endpoint.origin
            if malformed:
                what = f"sent a malformed response: {reason.getErrorMessage()}"
                if reason.check(UpstreamResponseInvalid):
                    # Well-formed HTTP that we still will not relay: say so in the log too.
                    log.warn("upstream {origin} {what}: answered 502", origin=origin, what=what)
                self._error(502, f"upstream {origin} {what}")
            else:
                self._error(502, f"upstream {origin} closed the connection without a response")
            return
        self._failAfterHead(reason)

    def _failAfterHead(self, reason: Optional[Failure], timedOut: bool = False) -> None:
        """
        The upstream failed after its response head (malformed framing, a close before the end, silence).  If
        nothing of the response has left for the client yet (the head is still corked or queued for the end of
        this reactor turn), it is taken back and the client gets a 502 (504 for silence), as for a failure before
        the head.  Otherwise the client must see an incomplete response, never one that looks complete: abort.
        """
        origin = self.request.endpoint.origin
        malformed = reason is not None and reason.check(*_MALFORMED)
        if timedOut:
            what = "went silent"
        elif malformed:
            what = f"sent a malformed response after its headers: {reason.getErrorMessage()}"  # type: ignore[union-attr]
        else:
            what = "closed the connection before the end of its response"
        exchange = self.exchange
        if exchange.retractHead():
            # Logged as such (the access log shows only the status).
            log.warn(
                "upstream {origin} {what}; nothing had reached the client: answered {code}",
                origin=origin,
                what=what,
                code=504 if timedOut else 502,
            )
            if self.health is not None:
                self.health.passiveFailure(self.request.endpoint.key)
            if timedOut:
                self._error(504, f"upstream {origin} did not answer in time")
            else:
                self._error(502, f"upstream {origin} {what}")
            return
        if malformed:
            log.warn(
                "upstream {origin} response malformed after headers ({error}): client connection aborted",
                origin=origin,
                error=reason.getErrorMessage(),  # type: ignore[union-attr]
            )
        self._done = True
        self._cancelTimer()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        exchange.responseProducer = None
        exchange.abort()

    # -- the client's read pace (the exchange's responseProducer) ------------------------------------------

    def pauseReading(self) -> None:
        """The client is not reading: stop reading the upstream, and stop the idle clock (we are the ones idle)."""
        conn = self.conn
        if conn is not None:
            conn.pauseReading()
        if self._headSent:
            self._cancelTimer()

    def resumeReading(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.resumeReading()
        if self._headSent and not self._done:
            self._armIdle()

    def upstreamCongested(self, congested: bool) -> None:
        self._upstreamCongested = congested
        exchange = self.exchange
        if exchange._tunnel is not None:
            exchange.pauseTunnel() if congested else exchange.resumeTunnel()
        else:
            exchange.pauseBody() if congested else exchange.resumeBody()

    # -- endings --------------------------------------------------------------------------------------------

    def clientGone(self) -> None:
        """The client disconnected: abort the upstream request, or the connection attempt (SPEC 6)."""
        if self._done:
            return
        self._done = True
        self._cancelTimer()
        self._cancelConnect()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()

    def _cancelConnect(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()

    def _refuse(self, what: str) -> None:
        """A response head we will not relay: 502, logged (the access log shows only the status), connection closed."""
        origin = self.request.endpoint.origin
        log.warn("upstream {origin} {what}: answered 502", origin=origin, what=what)
        if self.health is not None:
            self.health.passiveFailure(self.request.endpoint.key)
        self._error(502, f"upstream {origin} {what}")

    def _error(self, code: int, message: str, extra: Sequence[Tuple[bytes, bytes]] = ()) -> None:
        self._done = True
        self._cancelTimer()
        self._cancelConnect()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        exchange = self.exchange
        exchange.responseProducer = None
        if not exchange.finished:
            exchange.sendError(code, message, extra)

    # -- timers ---------------------------------------------------------------------------------------------

    def _armIdle(self) -> None:
        self._armTimer(self.timeouts.tunnelIdle if self.exchange._tunnel is not None else self.timeouts.idle)

    # Never a DelayedCall moved sooner unless a shorter limit starts (Twisted moves a call sooner with a linear
    # scan of its heap), none touched per chunk (activity only records the time: a timer that fires before the
    # deadline schedules again for what is left), and none created per request on a pooled connection: once
    # attached, the timer lives on the connection (UpstreamConnection.scheduleTimer).  Before that (connecting)
    # it is the call's own.

    def _armTimer(self, delay: Optional[float]) -> None:
        """Start a new limit of C{delay} seconds from now (None: no limit)."""
        if delay is None:
            self._cancelTimer()
            return
        now = self.clock.seconds()
        self._since = now
        self._limit = delay
        self._schedule(now + delay)

    def _schedule(self, at: float) -> None:
        conn = self.conn
        if conn is not None:
            conn.scheduleTimer(self.clock, at)
            return
        timer = self._timer
        if timer is not None:
            if timer.active():
                if timer.getTime() <= at:
                    return
                timer.cancel()
        self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._timedOut)

    def _cancelTimer(self) -> None:
        """No limit runs any more.  A timer left on the connection fires harmlessly (or moves to its next call)."""
        timer = self._timer
        self._limit = None
        if timer is not None:
            if timer.active():
                timer.cancel()
            self._timer = None

    def timerFired(self) -> None:
        """IResponseSink: the connection's timer fired."""
        self._timedOut()

    def _timedOut(self) -> None:
        self._timer = None
        if self._done or self._limit is None:
            return
        deadline = self._since + self._limit
        if deadline - self.clock.seconds() > 1e-9:
            self._schedule(deadline)
            return
        if self._connecting is not None:
            # Connect timeout: cancelling the attempt ends in _connectFailed with a TimeoutError (504).
            self._cancelConnect()
            return
        if not self._headSent:
            if self.health is not None:
                self.health.passiveFailure(self.request.endpoint.key)
            self._error(504, f"upstream {self.request.endpoint.origin} did not answer in time")
        else:
            # Idle mid-stream: the response cannot be completed.
            self._failAfterHead(None, timedOut=True)
