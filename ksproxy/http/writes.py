"""
Writing through to the socket, batched per reactor turn (the hot path's biggest saving; bench/RESULTS.md).

C{transport.write} only buffers: the bytes leave one reactor turn later, after registering the socket for
writability and unregistering it again.  Protocols that use L{BatchedWriter} queue what they write during a
turn and send it at the turn's end in one C{sendmsg} per connection, when Twisted's own buffer is empty; what
the socket does not take goes to the transport, so Twisted's accounting (producers, close after flush) holds.
"""

from __future__ import annotations

import socket
import sys
from typing import Any, List, Optional

from twisted.internet import tcp
from twisted.logger import Logger

__all__ = [
    "BatchedWriter",
    "awaitingReply",
    "directSocket",
    "flushOut",
    "noDelay",
    "outbox",
    "sendNow",
    "sendSequenceNow",
]

_log = Logger()

# Linux copies TCP_NODELAY from a listening socket to the sockets it accepts.
_INHERITS_NODELAY = sys.platform.startswith("linux")


def directSocket(transport: object) -> Optional[socket.socket]:
    """
    The socket under a plain TCP transport, for L{sendNow}; None for anything else (TLS, test transports),
    which then always goes through C{transport.write}.
    """
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return transport.socket
    return None


def noDelay(transport: Any) -> None:
    """
    TCP_NODELAY on a TCP connection (no Nagle delay for the last small segment of a response).  On Linux it is
    set once on the listening socket, whose accepted sockets inherit it, instead of once per connection.
    """
    port = getattr(transport, "server", None)  # tcp.Server: the Port that accepted it
    if _INHERITS_NODELAY and isinstance(port, tcp.Port):
        if port.__dict__.get("_ksproxyNoDelay"):
            return
        try:
            port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            port._ksproxyNoDelay = True  # type: ignore[attr-defined]
        except (OSError, AttributeError):
            pass
    if hasattr(transport, "setTcpNoDelay"):
        try:
            transport.setTcpNoDelay(True)
        except OSError:
            pass


def _mustBuffer(transport: Any, sock: Optional[socket.socket]) -> bool:
    """Bytes must go through Twisted's buffer: TLS, bytes already queued there, or a closing connection."""
    return (
        sock is None
        or bool(transport._tempDataLen)
        or bool(transport.dataBuffer)
        or transport.disconnecting
        or not transport.connected
        or transport._writeDisconnected
    )


def sendNow(transport: Any, sock: Optional[socket.socket], data: bytes) -> None:
    """
    Write C{data} on C{transport}, sending it on the socket at once when the transport has nothing buffered.

    C{transport.write} only buffers: the bytes go out one reactor turn later, after registering the socket for
    writability and before unregistering it again (two C{epoll.modify} and one more I/O event per write).
    Sending at once is what C{doWrite} would have done; whatever the socket does not take goes to
    C{transport.write}, so Twisted's buffer accounting (producer pause, close after flush) still sees it.
    """
    if _mustBuffer(transport, sock):
        transport.write(data)
        return
    try:
        sent = sock.send(data)  # type: ignore[union-attr]
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # EPIPE, ECONNRESET...: let the transport find out in its own way (it reports the loss).
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def sendSequenceNow(transport: Any, sock: Optional[socket.socket], chunks: List[bytes]) -> None:
    """L{sendNow} for several buffers: one C{sendmsg} (gathered, not joined)."""
    if _mustBuffer(transport, sock):
        transport.writeSequence(chunks)
        return
    try:
        sent = sock.sendmsg(chunks)  # type: ignore[union-attr]
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.writeSequence(chunks)
        return
    rest = _unsent(chunks, sent)
    if rest:
        transport.writeSequence(rest)


class _Outbox:
    """
    Bytes written on plain TCP connections during one reactor turn, sent at its end: each connection's writes of
    the turn go out in one C{sendmsg}, without the writability registration C{transport.write} does, and the
    sends of a turn go out together, so the peers wake once for all of them rather than once per send.

    The end of the turn is one C{callLater(0)} for all connections, or, on L{ksproxy.reactor.KsproxyReactor}
    (C{flushesOutbox}), the reactor's own call after each batch of I/O events and each round of timers: no
    DelayedCall at all.
    """

    def __init__(self) -> None:
        self.owners: List[Any] = []

    def add(self, owner: Any, reactor: Any) -> None:
        if not self.owners and not getattr(reactor, "flushesOutbox", False):
            reactor.callLater(0, self.flush)
        self.owners.append(owner)

    def flush(self) -> None:
        owners, self.owners = self.owners, []
        for owner in owners:
            try:
                owner._flushOut()
            except Exception:
                # One connection's failure must not strand what the others queued.
                _log.failure("sending queued response bytes failed")


outbox = _Outbox()


class _AwaitingReply:
    """
    Set (C{soon = True}) by whoever just sent a request whose answer is worth a short spin to catch: on
    L{ksproxy.reactor.KsproxyReactor} with C{busyPoll}, the next poll that finds nothing keeps polling for a
    moment instead of sleeping.  Elsewhere, nothing reads it.
    """

    soon = False


awaitingReply = _AwaitingReply()


def flushOut(owner: Any) -> None:
    """Send what C{owner} (a protocol with C{_out}, C{_sock} and C{transport}) queued in this turn."""
    out = owner._out
    if out:
        owner._out = []
        if len(out) == 1:
            sendNow(owner.transport, owner._sock, out[0])
        elif len(out) > 64:
            sendNow(owner.transport, owner._sock, b"".join(out))
        else:
            sendSequenceNow(owner.transport, owner._sock, out)


def _unsent(chunks: List[bytes], sent: int) -> List[bytes]:
    for i, chunk in enumerate(chunks):
        n = len(chunk)
        if sent < n:
            return [chunk[sent:], *chunks[i + 1 :]] if sent else chunks[i:]
        sent -= n
    return []


class BatchedWriter:
    """
    Mixin for a protocol: C{_writeOut(chunks)} queues for the end of this reactor turn on plain TCP and writes at
    once otherwise.  The protocol sets C{_sock} (L{directSocket}) when connected and keeps C{_out} (a list).
    """

    _sock: Optional[socket.socket] = None
    _out: List[bytes]
    transport: Any

    def _writeOut(self, chunks: List[bytes]) -> None:
        if self._sock is None:
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:
                self.transport.writeSequence(chunks)
            return
        out = self._out
        if not out:
            outbox.add(self, self.transport.reactor)
        out.extend(chunks)

    def _flushOut(self) -> None:
        flushOut(self)
