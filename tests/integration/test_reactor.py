"""The reactor `ksproxy run` installs (ksproxy/reactor.py): same behaviour as Twisted's epoll reactor."""

from __future__ import annotations

import select
import socket
import unittest as pyunittest

from twisted.internet import defer, protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ksproxy.cli import _reactorArgs

HAS_EPOLL = hasattr(select, "epoll")


@pyunittest.skipUnless(HAS_EPOLL, "epoll is Linux-only")
class KsproxyReactorTests(TestCase):
    def test_suiteRunsOnIt(self) -> None:
        """tests/conftest.py installs it, so every integration test exercises it."""
        from twisted.internet import reactor

        from ksproxy.reactor import KsproxyReactor

        self.assertIsInstance(reactor, KsproxyReactor)

    @defer.inlineCallbacks
    def test_readsAndWrites(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        class Echo(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(data.upper())

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        answer = yield _exchange(reactor, port.getHost().port, b"hello")
        self.assertEqual(answer, b"HELLO")

    @defer.inlineCallbacks
    def test_anExceptionIsLoggedAndDisconnects(self):  # type: ignore[no-untyped-def]
        """As Twisted does: an exception from application code is logged and closes that connection only."""
        from twisted.internet import reactor

        lost = []

        class Broken(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                if data.startswith(b"boom"):
                    raise ZeroDivisionError("broken handler")
                self.transport.write(data)

            def connectionLost(self, reason: object) -> None:
                lost.append(reason)

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Broken), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        answer = yield _exchange(reactor, port.getHost().port, b"boom")
        self.assertEqual(answer, b"")  # closed without an answer
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(lost), 1)
        answer = yield _exchange(reactor, port.getHost().port, b"still serving")
        self.assertEqual(answer, b"still serving")


def _exchange(reactor, port: int, data: bytes, expect: int = 0) -> defer.Deferred:  # type: ignore[no-untyped-def]
    """Send C{data} from a blocking client thread; read until the server closes, goes quiet, or C{expect} bytes."""
    from twisted.internet import threads

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
            sock.settimeout(0.5)
            got = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                    if len(got) >= (expect or len(data)):
                        break
            except (TimeoutError, ConnectionResetError):
                pass
            return got

    return threads.deferToThread(client)


class ReactorChoiceTests(SynchronousTestCase):
    def test_default(self) -> None:
        self.patch_env(None)
        self.assertEqual(_reactorArgs(), ["--reactor=ksproxy"] if HAS_EPOLL else [])

    def test_override(self) -> None:
        self.patch_env("poll")
        self.assertEqual(_reactorArgs(), ["--reactor=poll"])
        self.patch_env("default")
        self.assertEqual(_reactorArgs(), [])

    def test_twistdFindsThePlugin(self) -> None:
        from twisted.application.reactors import getReactorTypes

        import ksproxy.cli

        ksproxy.cli._findPlugin()
        names = {r.shortName: r.moduleName for r in getReactorTypes()}
        self.assertEqual(names.get("ksproxy"), "ksproxy.reactor")

    def patch_env(self, value: object) -> None:
        import os

        if value is None:
            self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "KSPROXY_REACTOR"})
        else:
            self.patch(os, "environ", dict(os.environ, KSPROXY_REACTOR=value))


class NoDelayTests(TestCase):
    @defer.inlineCallbacks
    def test_everyAcceptedConnectionHasNoDelay(self):  # type: ignore[no-untyped-def]
        """Set on the listener once (Linux copies it to accepted sockets) or per connection: every one has it."""
        from twisted.internet import reactor

        from ksproxy.http.writes import noDelay

        seen = []

        class Probe(protocol.Protocol):
            def connectionMade(self) -> None:
                noDelay(self.transport)
                seen.append(self.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                self.transport.write(b"x")
                self.transport.loseConnection()

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Probe), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        for _ in range(3):
            answer = yield _exchange(reactor, port.getHost().port, b"")
            self.assertEqual(answer, b"x")
        self.assertEqual([bool(v) for v in seen], [True, True, True])


@pyunittest.skipUnless(HAS_EPOLL, "epoll is Linux-only")
class OutboxTests(TestCase):
    """On KsproxyReactor the write outbox is flushed by the reactor itself, after I/O events and after timers."""

    @defer.inlineCallbacks
    def test_writesFromTimersAndFromReadsLeaveWithoutADelayedCall(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        from ksproxy.http.writes import BatchedWriter, directSocket

        scheduled = []
        real = reactor.callLater

        def spy(delay, f, *a, **kw):  # type: ignore[no-untyped-def]
            scheduled.append(getattr(f, "__qualname__", repr(f)))
            return real(delay, f, *a, **kw)

        class Writer(BatchedWriter, protocol.Protocol):
            def connectionMade(self) -> None:
                self._out = []
                self._sock = directSocket(self.transport)

            def dataReceived(self, data: bytes) -> None:
                self._writeOut([b"read:", data])  # from an I/O event
                # ...and from a timer: the reactor flushes after its timers too, not only after I/O.
                reactor.callLater(0.01, self._writeOut, [b" timer"])

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Writer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.patch(reactor, "callLater", spy)
        expected = b"read:hello timer"
        answer = yield _exchange(reactor, port.getHost().port, b"hello", len(expected))
        self.assertEqual(answer, expected)
        self.assertNotIn("_Outbox.flush", scheduled)
