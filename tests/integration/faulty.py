"""
Misbehaving upstreams on 127.0.0.1 for fault and shutdown tests: each request head goes to a script that decides
what to send back (nothing, half a body, a slow head, a 101 tunnel...).  The server can be killed (stop listening
and cut every connection) and revived on the same port, to flap.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Set

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ScriptedProtocol(Protocol):
    def __init__(self, server: ScriptedUpstream) -> None:
        self.server = server
        self.buffer = b""
        self.count = 0  # requests seen on this connection
        self.tunnel = False

    def connectionMade(self) -> None:
        self.server.connections.add(self)

    def connectionLost(self, reason: object = None) -> None:
        self.server.connections.discard(self)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)  # echo
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and not self.tunnel:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.count += 1
            self.server.heads.append(head)
            length = _contentLength(head)
            self.buffer = self.buffer[length:]  # tests send small bodies in one go
            self.server.script(self, head)

    def later(self, delay: float, data: bytes, close: bool = False) -> None:
        def send() -> None:
            if self.transport is not None and self.transport.connected:
                self.transport.write(data)
                if close:
                    self.transport.loseConnection()

        self.server.timers.append(reactor.callLater(delay, send))


def _contentLength(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class ScriptedUpstream(Factory):
    def __init__(self, script: Callable[[ScriptedProtocol, bytes], None]) -> None:
        self.script = script
        self.heads: List[bytes] = []
        self.connections: Set[ScriptedProtocol] = set()
        self.timers: list = []
        self.port: Optional[object] = None
        self.portNumber = 0

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        return ScriptedProtocol(self)

    def listen(self) -> int:
        self.port = reactor.listenTCP(self.portNumber, self, interface="127.0.0.1")
        self.portNumber = self.port.getHost().port  # type: ignore[attr-defined]
        return self.portNumber

    def kill(self) -> defer.Deferred:
        """Stop listening (new connections are refused) and cut every open connection."""
        for proto in list(self.connections):
            proto.transport.abortConnection()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)  # type: ignore[attr-defined]

    def cleanup(self) -> defer.Deferred:
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        return self.kill()


# -- scripts --------------------------------------------------------------------------------------------------


def answerOK(proto: ScriptedProtocol, head: bytes) -> None:
    proto.transport.write(OK)


def hang(proto: ScriptedProtocol, head: bytes) -> None:
    """Accept the request and never answer."""


def closeMidBody(proto: ScriptedProtocol, head: bytes) -> None:
    proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    proto.transport.loseConnection()


def slowHead(pieces: List[tuple]) -> Callable[[ScriptedProtocol, bytes], None]:
    """Send the response in (delay, bytes) pieces, each delay counted from the request."""

    def script(proto: ScriptedProtocol, head: bytes) -> None:
        for delay, data in pieces:
            proto.later(delay, data)

    return script


def staleOnSecond(proto: ScriptedProtocol, head: bytes) -> None:
    """Answer the first request of a connection with keep-alive, then drop the connection on the next one, as a
    server does whose idle timeout fired just as the request went out."""
    if proto.count == 1:
        proto.transport.write(OK)
    else:
        proto.transport.abortConnection()


def closeIdleSoon(proto: ScriptedProtocol, head: bytes) -> None:
    """Keep-alive response, then the server closes the idle connection shortly after."""
    proto.transport.write(OK)
    proto.later(0.05, b"", close=True)


def slowOK(delay: float) -> Callable[[ScriptedProtocol, bytes], None]:
    def script(proto: ScriptedProtocol, head: bytes) -> None:
        proto.later(delay, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")

    return script


def upgradeEcho(proto: ScriptedProtocol, head: bytes) -> None:
    """101 for an Upgrade request, then echo every byte; a plain OK otherwise."""
    if b"\r\nupgrade:" in head.lower():
        proto.tunnel = True
        proto.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        if proto.buffer:
            data, proto.buffer = proto.buffer, b""
            proto.transport.write(data)
    else:
        proto.transport.write(OK)
