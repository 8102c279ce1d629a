# -*- test-case-name: tests.integration.test_h2 -*-
"""
HTTP/2 for clients (ALPN C{h2} on a TLS listener), served by the same handler as HTTP/1.1.

Twisted's C{H2Connection} does the framing, HPACK, priorities and flow control.  It drives one request object per
stream through the subset of twisted.web's C{IRequest} that C{H2Stream} calls (C{requestHeaders}, C{gotLength},
C{handleContentChunk}, C{requestReceived}, C{connectionLost}).  Here that object is a thin L{_StreamRequest}, and
as soon as a stream's headers are in, an L{H2Exchange} (an L{Exchange} whose response methods write frames) goes
to C{handler.handleRequest}, exactly as an HTTP/1.1 request does: routed at header time, body streamed.

Flow control, both ways:
  - request body: L{H2Exchange.pauseBody} stops the stream (C{H2Stream.pauseProducing}); Twisted then keeps the
    DATA frames it has and stops opening the stream's receive window, so the client stops after one window;
  - response body: the exchange is the stream's registered producer; when the client's window is used up (or the
    socket is congested and the queue reaches the window) it pauses the handler's C{responseProducer}.

Upstreams stay HTTP/1.1.  Not carried over HTTP/2: upgrades (WebSocket over HTTP/2 needs RFC 8441 extended
CONNECT, which kubectl and browsers do not need here: they use HTTP/1.1 for upgrades) and response trailers
(Twisted's stream writer cannot send a trailing HEADERS frame; they are dropped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import h2.events
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection, H2Stream

from .headers import Headers
from .server import REQUEST_METHODS, Exchange, validHost, validTarget

if TYPE_CHECKING:
    from .server import HTTPServerProtocol

__all__ = ["H2ServerConnection", "H2Exchange"]

log = Logger()

# RFC 9113 8.2.2: connection-specific fields must not appear in HTTP/2 messages.
_CONNECTION_SPECIFIC = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"http2-settings"]
)


class _RequestHeaders:
    """The part of twisted.web's C{Headers} that C{H2Stream} uses; h2 has already lower-cased every name."""

    __slots__ = ("byName",)

    def __init__(self) -> None:
        self.byName: Dict[bytes, List[bytes]] = {}

    def getRawHeaders(self, name: bytes, default: Optional[List[bytes]] = None) -> Optional[List[bytes]]:
        return self.byName.get(name.lower(), default)

    def setRawHeaders(self, name: bytes, values: Sequence[bytes]) -> None:
        self.byName[name.lower()] = list(values)


class _StreamRequest:
    """What an C{H2Stream} drives: collects the headers, then relays body and endings to the L{H2Exchange}."""

    __slots__ = ("requestHeaders", "exchange", "site")

    def __init__(self) -> None:
        self.requestHeaders = _RequestHeaders()
        self.exchange: Optional[H2Exchange] = None
        self.site = None

    def gotLength(self, length: Optional[int]) -> None:
        pass  # the Content-Length header itself is what counts (see H2ServerConnection._start)

    def parseCookies(self) -> None:
        pass

    def handleContentChunk(self, data: bytes) -> None:
        exchange = self.exchange
        # An empty DATA frame (often the one that carries END_STREAM) is no body: to a chunked upstream
        # request an empty chunk would be its end.
        if exchange is not None and data:
            exchange._bodyData(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange._bodyEnd()

    def connectionLost(self, reason: Failure) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange._streamLost()


class H2Exchange(Exchange):
    """
    One HTTP/2 stream as an L{Exchange}: the request side reads the stream, the response side writes frames.
    It is also the stream's producer (the stream pauses it when the client's flow-control window is used up).
    """

    __slots__ = ("stream", "h2", "_clientCongested")

    def __init__(
        self,
        h2conn: H2ServerConnection,
        stream: H2Stream,
        method: bytes,
        target: bytes,
        headers: Headers,
        hasBody: bool,
    ) -> None:
        owner = h2conn.owner
        super().__init__(owner, method, target, b"2", headers, True, False, hasBody, owner.clock.seconds())
        self.stream = stream
        self.h2 = h2conn
        self._clientCongested = False

    @property
    def congestedByClient(self) -> bool:
        return self._clientCongested

    @property
    def _active(self) -> bool:
        return self.stream.streamID in self.h2.streams

    # -- request side ----------------------------------------------------------------------------------------

    def pauseBody(self) -> None:
        self.stream.pauseProducing()

    def resumeBody(self) -> None:
        if not self.stream.producing and self._active:
            self.stream.resumeProducing()

    def sendContinue(self) -> None:
        # Twisted's stream already answered an C{Expect: 100-continue} when the headers arrived.
        self._continueSent = True

    def _streamLost(self) -> None:
        """The client reset the stream, or the connection went away."""
        if not self._finished:
            self._finished = True
            if self.onClientGone is not None:
                self.onClientGone()
            self.h2.owner.factory._logExchange(self, aborted=True)
            self._unlink()

    # -- response side (frames) ------------------------------------------------------------------------------

    def writeHead(
        self,
        code: int,
        headers: Sequence[Tuple[bytes, bytes]] | Headers,
        *,
        reason: Optional[bytes] = None,
        length: Optional[int] = None,
        noBody: bool = False,
    ) -> None:
        if self._headSent:
            raise RuntimeError("response head already sent")
        self._headSent = True
        self.code = code
        if self.method == b"HEAD" or code in (204, 304) or 100 <= code < 200:
            noBody = True
        self._noBody = noBody
        if isinstance(headers, Headers):
            fields = [(lname, v) for lname, _, v in headers.items if lname not in _CONNECTION_SPECIFIC]
        else:
            fields = [(n.lower(), v) for n, v in headers if n.lower() not in _CONNECTION_SPECIFIC]
        # (Not on a 304 either: HTTP/2 clients check a Content-Length against the DATA frames they get.)
        if length is not None and code not in (204, 304) and not 100 <= code < 200:
            fields.append((b"content-length", b"%d" % length))
        if not self._active:
            return
        self.h2.writeHeaders(b"HTTP/2", b"%d" % code, reason, fields, self.stream.streamID)
        if not noBody:
            self.stream.registerProducer(self, True)

    def write(self, data: bytes) -> None:
        if self._finished or self._noBody or not data:
            return
        self.bytesSent += len(data)
        if self._active:
            self.stream.write(data)

    def finish(self, trailers: Optional[Sequence[Tuple[bytes, bytes]]] = None) -> None:
        if self._finished:
            return
        self._finished = True
        if self._active:
            if self.stream.producer is not None:
                self.stream.unregisterProducer()
            self.stream.requestDone(None)
        self.h2.owner.factory._logExchange(self, aborted=False)
        self._unlink()

    def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._active:
            if self.stream.producer is not None:
                self.stream.unregisterProducer()
            # Our side cannot complete the response (the client going away never gets here: its stream is gone).
            # INTERNAL_ERROR, not Twisted's default NO_ERROR, which clients may take as a complete response.
            self.h2.resetStream(self.stream.streamID, ErrorCodes.INTERNAL_ERROR)
        self.h2.owner.factory._logExchange(self, aborted=True)
        self._unlink()

    def startTunnel(self, receive) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("upgrades are not carried over HTTP/2")

    # IPushProducer, registered on the stream: the client's flow-control window.
    def pauseProducing(self) -> None:
        self._clientCongested = True
        producer = self.responseProducer
        if producer is not None:
            producer.pauseReading()

    def resumeProducing(self) -> None:
        self._clientCongested = False
        producer = self.responseProducer
        if producer is not None:
            producer.resumeReading()

    def stopProducing(self) -> None:
        pass


class H2ServerConnection(H2Connection):
    """
    Twisted's HTTP/2 connection, with each stream handed to the handler when its headers are in.

    Owned by the L{HTTPServerProtocol} that accepted the connection: that protocol stays the transport's protocol
    and producer and relays to this one, so the listener, the connection tracking and draining are shared with
    HTTP/1.1.
    """

    def __init__(self, owner: HTTPServerProtocol) -> None:
        super().__init__(reactor=owner.clock)
        self.owner = owner
        self.handler = owner.handler
        self.limits = owner.limits
        self.factory = owner.factory
        self.site = None
        self.requestFactory = self._newRequest
        self.timeOut = owner.limits.keepAliveTimeout
        self.callLater = owner.clock.callLater
        self._draining = False
        # Advertised in our first SETTINGS frame; HPACK refuses a larger header list (h2 counts 32 bytes of
        # overhead per field, RFC 9113 6.5.2, so the decoder gets that margin).
        limits = owner.limits
        self.conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.maxHeaderBytes,
            },
        )
        # The decoder takes up to twice the limit, so that a header list somewhat over it is decoded (keeping the
        # connection's HPACK state) and refused on its stream with a 431 (L{_start}), as over HTTP/1.1; past that,
        # h2 ends the whole connection.
        self.conn.decoder.max_header_list_size = 2 * limits.maxHeaderBytes + 32 * limits.maxHeaderCount

    def _newRequest(self, stream: H2Stream, queued: bool = False) -> _StreamRequest:
        return _StreamRequest()

    # -- streams ---------------------------------------------------------------------------------------------

    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        super()._requestReceived(event)
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._start(stream, ended=event.stream_ended is not None)

    def _start(self, stream: H2Stream, ended: bool) -> None:
        request: _StreamRequest = stream._request
        byName = request.requestHeaders.byName
        limits = self.limits
        method = stream.command or b""
        target = stream.path or b""
        fields: List[Tuple[bytes, bytes]] = []
        # Counted as HTTP/1.1 counts its header lines (HTTPServerProtocol.on_header).
        headerBytes = sum(len(lname) + len(v) + 4 for lname, values in byName.items() for v in values)
        hosts = byName.pop(b"host", [])
        if hosts:
            fields.append((b"host", hosts[0]))
        for lname, values in byName.items():
            if lname == b"cookie" and len(values) > 1:
                # RFC 9113 8.2.3: cookie crumbs are joined again for an HTTP/1.1 hop.
                fields.append((b"cookie", b"; ".join(values)))
            else:
                fields.extend([(lname, v) for v in values])
        headers = Headers(fields)
        length = headers.get(b"content-length")
        exchange = H2Exchange(self, stream, method, target, headers, not ended and length != b"0")
        request.exchange = exchange
        # Malformed requests (RFC 9113 8.1.1) get a 400 on their stream, as HTTP/1.1 does, and never reach an
        # upstream: C{:method} and C{:path} become the upstream request line, C{:authority} X-Forwarded-Host.
        # (h2 itself refuses CR, LF and NUL in any field, and names that are not lower-case tokens.)
        error = None
        if method == b"CONNECT":
            error = (405, "CONNECT is not supported")
        elif method not in REQUEST_METHODS:
            error = (400, "invalid request method")
        elif len(target) > limits.maxUrlBytes:
            error = (414, "request target too long")
        elif not validTarget(target):
            error = (400, "invalid request target")
        elif len(fields) > limits.maxHeaderCount or headerBytes > limits.maxHeaderBytes:
            error = (431, "request headers too large")
        elif not hosts or any(h != hosts[0] for h in hosts):
            error = (400, "missing :authority" if not hosts else "conflicting :authority and Host")
        elif hosts[0] and not validHost(hosts[0]):
            error = (400, "invalid :authority")
        else:
            expect = headers.get(b"expect")
            if expect is not None and expect.lower() != b"100-continue":
                error = (417, "unsupported Expect value")
        if error is not None:
            exchange.discardBody()
            exchange.sendError(*error)
            return
        try:
            self.handler.handleRequest(exchange)
        except Exception:
            log.failure("request handler raised")
            if not exchange.finished:
                exchange.discardBody()
                exchange.sendError(500, "internal error")

    # A stream we have finished (and Twisted has forgotten) may still get frames from the client.
    def _requestDataReceived(self, event: h2.events.DataReceived) -> None:
        if event.stream_id in self.streams:
            super()._requestDataReceived(event)
        else:
            # Keep the connection window open: these bytes are read and dropped.
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self._tryToWriteControlData()

    def _requestEnded(self, event: h2.events.StreamEnded) -> None:
        if event.stream_id in self.streams:
            super()._requestEnded(event)

    def _requestAborted(self, event: h2.events.StreamReset) -> None:
        if event.stream_id in self.streams:
            super()._requestAborted(event)

    def resetStream(self, streamID: int, code: ErrorCodes) -> None:
        """RST_STREAM with C{code} (Twisted's C{abortRequest} always sends NO_ERROR), and forget the stream."""
        self.conn.reset_stream(streamID, error_code=code)
        if self._tryToWriteControlData():
            self._requestDone(streamID)

    def _requestDone(self, streamID: int) -> None:
        super()._requestDone(streamID)
        if self._draining and not self.streams:
            self._goAway()

    # -- connection ------------------------------------------------------------------------------------------

    def timeoutConnection(self) -> None:
        if self.streams:
            # Long-lived streams (watches, SSE) are timed by the forwarder, not by the connection's idle clock.
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()

    def drain(self) -> None:
        """Close once the streams in progress are done (a GOAWAY would stop h2 from sending their frames)."""
        self._draining = True
        if not self.streams:
            self._goAway()

    def _goAway(self) -> None:
        if self.transport is None or self.transport.disconnecting:
            return
        self.conn.close_connection()
        self._tryToWriteControlData()
        self.owner.loseConnection()
