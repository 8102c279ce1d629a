"""The reactor `ksproxy run` installs (ksproxy/reactor.py): same behaviour as Twisted's epoll reactor."""

from __future__ import annotations

import select
import socket
import unittest as pyunittest

from twisted.internet import defer, protocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

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


class _SpyPoller:
    """Records the epoll calls made for each descriptor; passes everything on to the real poller."""

    def __init__(self, real) -> None:  # type: ignore[no-untyped-def]
        self.real = real
        self.calls = []

    def register(self, fd, flags):  # type: ignore[no-untyped-def]
        self.calls.append(("register", fd))
        return self.real.register(fd, flags)

    def modify(self, fd, flags):  # type: ignore[no-untyped-def]
        self.calls.append(("modify", fd))
        return self.real.modify(fd, flags)

    def unregister(self, fd):  # type: ignore[no-untyped-def]
        self.calls.append(("unregister", fd))
        return self.real.unregister(fd)

    def poll(self, *args):  # type: ignore[no-untyped-def]
        return self.real.poll(*args)

    def close(self) -> None:
        self.real.close()

    def fileno(self) -> int:
        return self.real.fileno()


@pyunittest.skipUnless(HAS_EPOLL, "epoll is Linux-only")
class FastCloseTests(TestCase):
    """
    Accepted connections close at the end of the turn when nothing is left to write: no epoll registration
    for writability, no extra poll; everything that makes the close not clean takes Twisted's path instead.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        from ksproxy.reactor import KsproxyReactor

        if not isinstance(reactor, KsproxyReactor):
            raise SkipTest("the suite runs on another reactor (KSPROXY_TEST_REACTOR)")

    def serve(self, onData):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        from ksproxy.reactor import Server

        record = {"lost": [], "fds": [], "transports": []}

        class Probe(protocol.Protocol):
            def connectionMade(self) -> None:
                record["transports"].append(self.transport)
                record["fds"].append(self.transport.fileno())

            def dataReceived(self, data: bytes) -> None:
                onData(self, data)

            def connectionLost(self, reason: object) -> None:
                record["lost"].append(reason)

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Probe), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        spy = _SpyPoller(reactor._poller)
        self.patch(reactor, "_poller", spy)
        record["spy"] = spy
        record["port"] = port.getHost().port
        self.assertIs(port.transport, Server)
        return record

    @defer.inlineCallbacks
    def test_cleanCloseSkipsTheWritabilityRoundTrip(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor
        from twisted.internet.error import ConnectionDone

        def answer(proto, data):  # type: ignore[no-untyped-def]
            proto.transport.socket.send(b"bye:" + data)  # written through, as ksproxy's sendNow does
            proto.transport.loseConnection()
            proto.transport.loseConnection()  # twice is harmless

        record = self.serve(answer)
        got = yield _exchange(reactor, record["port"], b"hi", expect=1 << 20)
        self.assertEqual(got, b"bye:hi")  # and then EOF: _exchange reads until the server closes
        self.assertEqual(len(record["lost"]), 1)
        self.assertTrue(record["lost"][0].check(ConnectionDone))
        fd = record["fds"][0]
        # Registered for reading once when accepted; nothing after: closing the socket left the epoll set.
        self.assertEqual([c for c in record["spy"].calls if c[1] == fd], [("register", fd)])
        self.assertNotIn(fd, reactor._selectables)
        self.assertNotIn(fd, reactor._reads)
        self.assertNotIn(fd, reactor._writes)

    @defer.inlineCallbacks
    def test_bytesWrittenAfterLoseConnectionStillLeave(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        def answer(proto, data):  # type: ignore[no-untyped-def]
            proto.transport.loseConnection()
            proto.transport.write(b"late ")
            proto.transport.writeSequence([b"but ", b"complete"])

        record = self.serve(answer)
        got = yield _exchange(reactor, record["port"], b"hi", expect=1 << 20)
        self.assertEqual(got, b"late but complete")
        self.assertEqual(len(record["lost"]), 1)
        self.assertNotIn(record["fds"][0], reactor._selectables)

    @defer.inlineCallbacks
    def test_abortAfterLoseConnectionWins(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor
        from twisted.internet.error import ConnectionAborted

        def answer(proto, data):  # type: ignore[no-untyped-def]
            proto.transport.loseConnection()
            proto.transport.abortConnection()

        record = self.serve(answer)
        got = yield _exchange(reactor, record["port"], b"hi", expect=1 << 20)
        self.assertEqual(got, b"")
        yield _turns(reactor, 2)
        self.assertEqual(len(record["lost"]), 1)
        self.assertTrue(record["lost"][0].check(ConnectionAborted))

    @defer.inlineCallbacks
    def test_aProducerRegisteredAfterLoseConnectionIsResumedFirst(self):  # type: ignore[no-untyped-def]
        """As Twisted's doWrite does: a pull producer gets its turn before the close."""
        from twisted.internet import reactor

        class Once:
            def __init__(self, transport) -> None:  # type: ignore[no-untyped-def]
                self.transport = transport

            def resumeProducing(self) -> None:
                self.transport.write(b"produced")
                self.transport.unregisterProducer()

            def stopProducing(self) -> None:
                pass

        def answer(proto, data):  # type: ignore[no-untyped-def]
            proto.transport.loseConnection()
            proto.transport.registerProducer(Once(proto.transport), False)

        record = self.serve(answer)
        got = yield _exchange(reactor, record["port"], b"hi", expect=1 << 20)
        self.assertEqual(got, b"produced")
        self.assertEqual(len(record["lost"]), 1)

    @defer.inlineCallbacks
    def test_manyClosesLeaveNoBookkeepingBehind(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        from ksproxy.reactor import Server

        def answer(proto, data):  # type: ignore[no-untyped-def]
            proto.transport.socket.send(data)
            proto.transport.loseConnection()

        record = self.serve(answer)
        before = set(reactor._selectables)
        for i in range(20):
            got = yield _exchange(reactor, record["port"], b"n%d" % i, expect=1 << 20)
            self.assertEqual(got, b"n%d" % i)
        self.assertEqual(len(record["lost"]), 20)
        left = {fd: s for fd, s in reactor._selectables.items() if fd not in before and isinstance(s, Server)}
        self.assertEqual(left, {})

    @defer.inlineCallbacks
    def test_readsAndThePeersCloseGoThroughTheOneFrameRead(self):  # type: ignore[no-untyped-def]
        """Server.doRead (recv and dataReceived in one frame): data, then the peer's FIN as a clean close."""
        from twisted.internet import reactor
        from twisted.internet.error import ConnectionDone

        received = []
        record = self.serve(lambda proto, data: received.append(data))
        got = yield _exchange(reactor, record["port"], b"x" * 100_000, expect=1)  # closes after its timeout
        self.assertEqual(got, b"")
        yield _turns(reactor, 2)
        self.assertEqual(b"".join(received), b"x" * 100_000)
        self.assertEqual(len(record["lost"]), 1)
        self.assertTrue(record["lost"][0].check(ConnectionDone))

    @defer.inlineCallbacks
    def test_anUnreadBodyStillEndsWithTheEndOfTheStream(self):  # type: ignore[no-untyped-def]
        """
        Answered and closed before the client's body was read: the client reads the answer and then the end of
        the stream (shutdown() before close(), as Twisted does), not a bare reset that can cost it the answer.
        """
        import threading

        from twisted.internet import reactor, threads

        closed = threading.Event()

        def answer(proto, data):  # type: ignore[no-untyped-def]
            proto.transport.socket.send(b"answer")
            proto.transport.loseConnection()

        record = self.serve(answer)
        port = record["port"]

        def client():  # type: ignore[no-untyped-def]
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"x" * 300_000)  # far more than one read: most of it is never read
                assert closed.wait(5), "the server never closed"
                got, end = b"", None
                try:
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            end = "EOF"
                            break
                        got += chunk
                except ConnectionResetError:
                    end = "reset"
                return got, end

        lost = record["lost"]
        watcher = threads.deferToThread(client)
        yield _until(reactor, lambda: lost)
        closed.set()
        got, end = yield watcher
        self.assertEqual((got, end), (b"answer", "EOF"))

    def test_adoptedPortsAcceptFastClosingConnections(self) -> None:
        """`--workers` hands the listening socket to its workers: adopted ports get the same transport."""
        from twisted.internet import reactor

        from ksproxy.reactor import Server

        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.setblocking(False)
        port = reactor.adoptStreamPort(listener.fileno(), socket.AF_INET, protocol.Factory.forProtocol(protocol.Protocol))
        self.addCleanup(port.stopListening)
        self.assertIs(port.transport, Server)


@defer.inlineCallbacks
def _until(reactor, condition, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Turn the reactor until C{condition()} holds (or fail after C{timeout} seconds)."""
    from twisted.internet import task

    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met in time")
        yield task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


def _turns(reactor, n: int) -> defer.Deferred:  # type: ignore[no-untyped-def]
    """Fire after C{n} more reactor turns."""
    from twisted.internet import task

    return task.deferLater(reactor, 0.01 * n, lambda: None)
