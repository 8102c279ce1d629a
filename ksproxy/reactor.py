"""
The epoll reactor without a log context around every I/O event.

Twisted's C{EPollReactor.doPoll} runs each ready descriptor's C{doRead}/C{doWrite} through
C{log.callWithLogger}, which asks the selectable for its C{logPrefix()}, copies the current context dict and
pushes it on the context stack, twice nested: about 8 µs per event on this project's benchmark machine, a
tenth of the CPU of a proxied 1 KiB request (bench/RESULTS.md).  The only thing that context buys is the
C{system} field of legacy C{twisted.python.log} events emitted during the callback; ksproxy logs through
C{twisted.logger} with its own namespaces, so this reactor calls C{_doReadOrWrite} directly.  Everything
else, including the "log and disconnect" handling of an exception from application code, is Twisted's own.

Its TCP ports accept connections as L{Server}, which closes without the writability round trip: Twisted's
C{loseConnection} with an empty write buffer still unregisters for reading, registers for writing, waits for
the next poll, writes nothing and unregisters again before its C{shutdown} and C{close} (six system calls and
a reactor turn per closed connection).

Installed by C{ksproxy run} on Linux, by C{twistd --reactor=ksproxy ...} (the plugin in
C{twisted/plugins/ksproxy_reactor.py}), or by calling L{install} before anything imports the global reactor.
"""

from __future__ import annotations

import errno
import socket
import sys
from time import monotonic
from typing import Any, List, Optional

from twisted.internet import address, main, tcp
from twisted.internet.epollreactor import EPOLLIN, EPollReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python import log
from twisted.python.failure import Failure

from .http.writes import awaitingReply, outbox
from .workers import OneAcceptPerWakeUp

__all__ = ["KsproxyReactor", "Server", "SharedPort", "install"]

_log = Logger()

# After this many busy-polls in a row that caught nothing, only every SPIN_RETRY_EVERY-th one is tried.
SPIN_MISSES = 8
SPIN_RETRY_EVERY = 16

# One Failure for every clean close, as Twisted's own loseConnection default does (building one costs µs).
_CONNECTION_DONE = Failure(main.CONNECTION_DONE)


def _readNothing() -> None:
    return None


class Server(tcp.Server):
    """
    An accepted TCP connection whose C{loseConnection}, when nothing is buffered, closes at the end of the
    current reactor turn without waiting for writability: what Twisted's C{doWrite} would do one turn later
    with an empty buffer, minus the epoll registrations and the empty C{send}.

    Anything that makes the close not clean falls back to Twisted's path at the end of the turn: bytes
    written after C{loseConnection} (they are flushed first), a producer registered since (it is resumed
    first, as C{doWrite} does), an C{abortConnection} (it wins), a half-close.

    It also formats its log prefix and repr only when asked: Twisted's constructor builds both strings for
    every connection.
    """

    def __init__(self, sock: Any, protocol: Any, client: Any, server: Any, sessionno: int, reactor: Any) -> None:
        # tcp.Server.__init__, minus the two strings.
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    @property  # type: ignore[override]
    def logstr(self) -> str:
        protocol = self.__dict__.get("protocol")  # gone after connectionLost
        prefix = self._getLogPrefix(protocol) if protocol is not None else "-"
        return f"{prefix},{self.sessionno},{self.hostname}"

    def __repr__(self) -> str:
        protocol = self.__dict__.get("protocol")
        name = type(protocol).__name__ if protocol is not None else "-"
        return f"<{name} #{self.sessionno} on {getattr(self.server, '_realPortNumber', None)}>"

    def doRead(self) -> Any:
        # tcp.Connection.doRead and _dataReceived in one frame (this runs for every read).
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def loseConnection(self, _connDone: Failure = _CONNECTION_DONE) -> None:
        if (
            self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._writeDisconnecting
            and self.producer is None
            and not self.dataBuffer
            and not self._tempDataLen
        ):
            self.disconnecting = 1
            # As stopReading would: nothing more is read, even from events of this same poll.
            self.doRead = _readNothing  # type: ignore[method-assign]
            self.reactor._closeAtEndOfTurn(self)
            return
        super().loseConnection()

    def _closeNow(self) -> None:
        if self.disconnected or self._aborting or not self.connected:
            return  # lost or aborted meanwhile
        if self.dataBuffer or self._tempDataLen or self.producer is not None:
            # Written to, or given a producer, after loseConnection: Twisted's way (doWrite closes when done).
            self.stopReading()
            self.startWriting()
            return
        # Closing the descriptor removes it from the epoll set: only the reactor's bookkeeping needs updating.
        # Twisted's shutdown() before close() stays: when the client's bytes were not all read (a body we
        # answered without reading), close() alone sends only a reset, and the client sees ECONNRESET instead
        # of the end of the response; with shutdown() first it sees the FIN before the reset.
        self.reactor._forgetDescriptor(self)
        self.connectionLost(_CONNECTION_DONE)


class Port(tcp.Port):
    """
    A listening TCP port whose accepted connections are L{Server}s, with Twisted's accept loop minus its
    per-batch log buffering and generator.  Any error but "nothing more to accept" (EMFILE, ENOBUFS, EPERM...)
    goes to Twisted's own loop, which knows how to recover from each and what to log.
    """

    transport = Server

    def doRead(self) -> None:
        accept = self.socket.accept
        factory = self.factory
        buildAddr = self._buildAddr
        makeTransport = self.transport
        reactor = self.reactor
        accepted = 0
        try:
            for _ in range(self.numberAccepts):
                try:
                    skt, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                if len(addr) == 4:
                    # IPv6: keep the scope ID, as Twisted does.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = factory.buildProtocol(buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                sessionno = self.sessionno
                self.sessionno = sessionno + 1
                protocol.makeConnection(makeTransport(skt, protocol, addr, self, sessionno, reactor))
        except BaseException:
            _log.failure("accepting a connection on {port!r} failed", port=self)
        # Twisted's batch sizing: grow while the backlog keeps the loop busy, shrink to what was there.
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)


class SharedPort(OneAcceptPerWakeUp, Port):
    """
    This reactor's L{Port} for a socket shared with other workers (L{OneAcceptPerWakeUp}).

    Every idle worker is still woken for each connection and all but one find nothing to accept.
    C{EPOLLEXCLUSIVE} (nginx's choice) would wake one, but always the first idle worker registered: at light
    load every connection, long-lived ones included, would go to the same worker, to be unevenly loaded
    later.  With two workers the extra wake-ups cost nothing measurable (bench/RESULTS.md), so this port
    keeps the even spread.
    """


class KsproxyReactor(EPollReactor):
    """
    L{EPollReactor} whose poll loop dispatches events without C{log.callWithLogger}, and which sends what
    protocols queued in L{ksproxy.http.writes.outbox} after each batch of I/O events and each round of timers
    (on other reactors the outbox schedules a C{callLater(0)} per turn instead).  With L{busyPoll} set, it
    polls a little while for an upstream's answer before it sleeps.
    """

    flushesOutbox = True
    # Seconds to keep polling without sleeping for an upstream's answer (L{_busyWait}); 0 turns it off.
    # C{ksproxy run --busy-poll} sets it.
    busyPoll = 0.0
    _spinMisses = 0  # spins in a row that caught nothing
    _spinSkips = 0

    def __init__(self) -> None:
        self._closing: List[Server] = []
        super().__init__()

    # -- TCP: ports whose connections close without a writability round trip ----------------------------

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Port:
        p = Port(port, factory, backlog, interface, self)
        p.startListening()
        return p

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> Any:
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return super().adoptStreamPort(fileDescriptor, addressFamily, factory)
        p = Port._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        p.startListening()
        return p

    def adoptSharedStreamPort(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> SharedPort:
        """L{adoptStreamPort} for a listening socket shared with other processes: a L{SharedPort}."""
        p = SharedPort._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        p.startListening()
        return p

    def _closeAtEndOfTurn(self, transport: Server) -> None:
        self._closing.append(transport)

    def _forgetDescriptor(self, selectable: Any) -> None:
        """Drop C{selectable} from the bookkeeping, without an epoll call: its descriptor is about to close."""
        fd = selectable.fileno()
        self._reads.discard(fd)
        self._writes.discard(fd)
        self._selectables.pop(fd, None)

    def _endOfTurn(self) -> None:
        # Until both are empty: a flush can queue more (a write that fails over to the transport may call
        # back), a close runs protocol code that may write or close, and the next chance could be after a long
        # poll timeout.
        while outbox.owners or self._closing:
            while outbox.owners:
                outbox.flush()
            closing, self._closing = self._closing, []
            for transport in closing:
                try:
                    transport._closeNow()
                except Exception:
                    _log.failure("closing {transport!r} failed", transport=transport)

    # -- the loop --------------------------------------------------------------------------------------------

    def runUntilCurrent(self) -> None:
        super().runUntilCurrent()
        self._endOfTurn()

    def doPoll(self, timeout: Optional[float]) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        poll = self._poller.poll
        # As Twisted does: at most as many events as we track descriptors.
        n = len(self._selectables)
        try:
            if awaitingReply.soon and self.busyPoll and timeout != 0:
                awaitingReply.soon = False
                events = poll(0, n) or self._busyWait(timeout, n)
            else:
                events = poll(timeout, n)
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event != EPOLLIN:
                # Writability, hang-ups, errors: Twisted's own handling, which also logs application
                # exceptions and disconnects the selectable.
                dispatch(selectable, fd, event)
                continue
            # The common case, a plain read event: what _doReadOrWrite does for it, without the extra call.
            try:
                why = selectable.doRead() if selectable.fileno() != -1 else _NO_FILEDESC
            except BaseException:
                why = sys.exc_info()[1]
                log.err()
            if why:
                self._disconnectSelectable(selectable, why, True)
        self._endOfTurn()

    doIteration = doPoll

    def _busyWait(self, timeout: float, n: int) -> Any:
        """
        Poll without sleeping for up to L{busyPoll} seconds, then sleep in C{epoll_wait} as usual.

        Called when a turn ends with nothing to do right after a request went upstream
        (L{awaitingReply}): its answer usually comes within a few hundred microseconds, and caught by a
        spinning poll it costs no wake-up of a sleeping thread (tens of microseconds of latency at light
        load, on a VM).  Under load there is always an event and the first poll returns at once, so the
        spin only runs when the process would otherwise sleep.  Not after other turns: the next client
        request is not predictable, and spinning for it cost CPU for worse latency (bench/RESULTS.md).  An
        upstream slower than the spin makes every spin a loss, so after L{SPIN_MISSES} misses in a row it is
        tried only now and then.
        """
        poll = self._poller.poll
        if self._spinMisses >= SPIN_MISSES:
            # The answers have been slower than the spin (a slow upstream): spinning would only burn CPU.
            # Try again now and then, in case they got quicker.
            self._spinSkips += 1
            if self._spinSkips % SPIN_RETRY_EVERY:
                return poll(timeout, n)
        spin = self.busyPoll if timeout < 0 else min(self.busyPoll, timeout)
        now = monotonic()
        deadline = now + spin
        while now < deadline:
            events = poll(0, n)
            if events:
                self._spinMisses = 0
                return events
            now = monotonic()
        self._spinMisses += 1
        return poll(timeout if timeout < 0 else max(0.0, timeout - spin), n)


def install() -> KsproxyReactor:
    """Install L{KsproxyReactor} as Twisted's global reactor (before anything imports the default one)."""
    from twisted.internet.main import installReactor

    reactor = KsproxyReactor()
    installReactor(reactor)
    return reactor
