"""
Writing through to the socket (writes.sendNow / sendSequenceNow, batched per reactor turn by writes._Outbox):
what the socket does not take, and every write made while the transport still holds bytes, must go to the
transport so Twisted's accounting sees it.
"""

from __future__ import annotations

import errno
from typing import List, Optional

import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport

from ksproxy.http.writes import _Outbox, _unsent, directSocket, flushOut, sendNow, sendSequenceNow


class FakeSocket:
    """Takes at most C{room} bytes per call, or raises C{error}."""

    def __init__(self, room: int = 1 << 30, error: Optional[OSError] = None) -> None:
        self.room = room
        self.error = error
        self.sent: List[bytes] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = bytes(data[: self.room])
        self.sent.append(taken)
        return len(taken)

    def sendmsg(self, buffers: List[bytes]) -> int:
        return self.send(b"".join(buffers))


class FakeTransport:
    """The FileDescriptor attributes sendNow looks at, and a record of what went through write()."""

    def __init__(self) -> None:
        self.dataBuffer = b""
        self._tempDataLen = 0
        self.disconnecting = False
        self.connected = True
        self._writeDisconnected = False
        self.written: List[bytes] = []

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.written.append(data)
        self._tempDataLen += len(data)

    def writeSequence(self, chunks: List[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)


def test_allSentGoesNowhereElse() -> None:
    t, s = FakeTransport(), FakeSocket()
    sendNow(t, s, b"hello")
    assert s.sent == [b"hello"]
    assert t.written == []


def test_partialSendHandsTheRestToTheTransport() -> None:
    t, s = FakeTransport(), FakeSocket(room=3)
    sendNow(t, s, b"hello world")
    assert s.sent == [b"hel"]
    assert t.written == [b"lo world"]
    # The transport now holds bytes: later writes queue behind them, never overtake them on the socket.
    sendNow(t, s, b"!")
    assert s.sent == [b"hel"]
    assert t.written == [b"lo world", b"!"]


@pytest.mark.parametrize(
    "error",
    [
        BlockingIOError(errno.EAGAIN, "again"),
        InterruptedError(errno.EINTR, "intr"),
        BrokenPipeError(errno.EPIPE, "pipe"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
    ],
)
def test_socketErrorsFallBackToTheTransport(error: OSError) -> None:
    t, s = FakeTransport(), FakeSocket(error=error)
    sendNow(t, s, b"data")
    assert t.written == [b"data"]


@pytest.mark.parametrize("attr, value", [("dataBuffer", b"x"), ("_tempDataLen", 1), ("disconnecting", True), ("connected", False), ("_writeDisconnected", True)])
def test_busyOrClosingTransportIsNotBypassed(attr: str, value: object) -> None:
    t, s = FakeTransport(), FakeSocket()
    setattr(t, attr, value)
    sendNow(t, s, b"data")
    sendSequenceNow(t, s, [b"a", b"b"])
    assert s.sent == []
    assert t.written == [b"data", b"a", b"b"]


def test_noSocketMeansTransportWrite() -> None:
    t = StringTransport()
    sendNow(t, None, b"head")
    sendSequenceNow(t, None, [b"a", b"b"])
    assert t.value() == b"headab"
    assert directSocket(t) is None


@pytest.mark.parametrize("room", [0, 1, 2, 3, 4, 5, 6, 7, 100])
def test_sequencePartialSendKeepsOrder(room: int) -> None:
    chunks = [b"ab", b"", b"cde", b"f"]
    t, s = FakeTransport(), FakeSocket(room=room)
    sendSequenceNow(t, s, chunks)
    assert b"".join(s.sent) + b"".join(t.written) == b"abcdef"
    assert b"".join(s.sent) == b"abcdef"[:room]


def test_unsent() -> None:
    assert _unsent([b"ab", b"cd"], 0) == [b"ab", b"cd"]
    assert _unsent([b"ab", b"cd"], 1) == [b"b", b"cd"]
    assert _unsent([b"ab", b"cd"], 2) == [b"cd"]
    assert _unsent([b"ab", b"cd"], 4) == []


class Owner:
    """What flushOut needs of a protocol: its queue, its socket and its transport."""

    def __init__(self, room: int = 1 << 30) -> None:
        self._out: List[bytes] = []
        self._sock = FakeSocket(room=room)
        self.transport = FakeTransport()

    def _flushOut(self) -> None:
        flushOut(self)


def test_outboxSendsEachOwnersTurnInOneCallAtTheEndOfTheTurn() -> None:
    clock = task.Clock()
    box = _Outbox()
    a, b = Owner(), Owner(room=4)
    for owner, chunks in ((a, [b"head", b"body"]), (b, [b"0123456789"])):
        box.add(owner, clock)
        owner._out.extend(chunks)
    assert len(clock.getDelayedCalls()) == 1  # one call for the whole turn
    assert a._sock.sent == [] and b._sock.sent == []
    clock.advance(0)
    assert a._sock.sent == [b"headbody"]  # one sendmsg for the turn's writes
    assert a.transport.written == []
    assert b._sock.sent == [b"0123"]
    assert b.transport.written == [b"456789"]  # the unsent rest, to the transport
    assert a._out == [] and b._out == [] and box.owners == []


def test_flushOutEarlyThenAgainInTheSameTurn() -> None:
    clock = task.Clock()
    box = _Outbox()
    a = Owner()
    box.add(a, clock)
    a._out.append(b"one")
    flushOut(a)  # e.g. before loseConnection
    box.add(a, clock)
    a._out.append(b"two")
    clock.advance(0)
    assert a._sock.sent == [b"one", b"two"]


def test_oneFailingConnectionDoesNotStrandTheOthers() -> None:
    from twisted.logger import globalLogPublisher

    box = _Outbox()
    flushed: List[str] = []
    events: List[dict] = []

    class Owner:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def _flushOut(self) -> None:
            if self.fail:
                raise RuntimeError("broken")
            flushed.append(self.name)

    clock = task.Clock()
    for owner in (Owner("a"), Owner("b", fail=True), Owner("c")):
        box.add(owner, clock)
    globalLogPublisher.addObserver(events.append)
    try:
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert flushed == ["a", "c"]
    assert any(e.get("log_failure") is not None for e in events)


def test_aFinishedResponseLeavesBeforeTheAccessLogRuns() -> None:
    """The client's latency: the response is sent when it is complete, not after the bookkeeping of the turn."""
    from ksproxy.http.server import HTTPServerFactory
    from ksproxy.http.writes import outbox

    class Handler:
        def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
            exchange.writeHead(200, [(b"Content-Type", b"text/plain")], length=2)
            exchange.write(b"ok")
            exchange.finish()

    class Transport(StringTransport):
        dataBuffer = b""
        _tempDataLen = 0
        _writeDisconnected = False
        connected = True
        reactor = task.Clock()  # the outbox's end of turn: a callLater(0) that this test never runs

    sock = FakeSocket()
    sentWhenLogged = []
    factory = HTTPServerFactory(
        Handler(), task.Clock(), accessLog=lambda exchange, aborted: sentWhenLogged.append(b"".join(sock.sent))
    )
    proto = factory.buildProtocol(None)
    proto.makeConnection(Transport())
    proto._sock = sock  # as on a plain TCP connection: writes are queued for the end of the turn
    try:
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        while proto in outbox.owners:  # the shared outbox: leave nothing of this test behind
            outbox.owners.remove(proto)
    assert len(sentWhenLogged) == 1
    assert sentWhenLogged[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sentWhenLogged[0].endswith(b"\r\n\r\nok")
