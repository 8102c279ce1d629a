"""--workers: a listening socket shared by the workers hands out connections one per wake-up."""

from __future__ import annotations

import os
import socket
from typing import List

from twisted.internet import defer, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.trial.unittest import TestCase

from ksproxy.workers import bindListening, inheritedEndpoint


class _Count(protocol.Protocol):
    def __init__(self, made: List[int]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.append(1)


class SharedListenerTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.shared = bindListening("tcp:0:interface=127.0.0.1")
        self.addCleanup(self.shared.close)
        self.clients: List[socket.socket] = []

    def tearDown(self) -> None:
        for c in self.clients:
            c.close()

    @defer.inlineCallbacks
    def _listen(self, endpoint):  # type: ignore[no-untyped-def]
        made: List[int] = []
        port = yield endpoint.listen(protocol.Factory.forProtocol(lambda: _Count(made)))
        self.addCleanup(port.stopListening)
        # The reactor must not accept behind the test's back: the test calls doRead itself, as the reactor
        # would on one wake-up.
        port.stopReading()
        return port, made

    def _connect(self, n: int) -> None:
        for _ in range(n):
            c = socket.create_connection(self.shared.getsockname()[:2], timeout=5)  # the kernel completes it
            self.clients.append(c)

    @defer.inlineCallbacks
    def test_oneConnectionPerWakeUp(self):  # type: ignore[no-untyped-def]
        """Three clients are waiting: each wake-up takes one, leaving the rest to the other workers."""
        port, made = yield self._listen(inheritedEndpoint(self.reactor, os.dup(self.shared.fileno())))
        self._connect(3)
        port.doRead()
        self.assertEqual(len(made), 1)
        port.doRead()
        self.assertEqual(len(made), 2)
        self.assertEqual(port.numberAccepts, 1)  # Twisted grows it after a full batch; not here

    @defer.inlineCallbacks
    def test_twoWorkersShareABurst(self):  # type: ignore[no-untyped-def]
        """Two listeners on one socket, woken in turn by a burst of four connections, get two each."""
        a, madeA = yield self._listen(inheritedEndpoint(self.reactor, os.dup(self.shared.fileno())))
        b, madeB = yield self._listen(inheritedEndpoint(self.reactor, os.dup(self.shared.fileno())))
        self._connect(4)
        for port in (a, b, a, b):
            port.doRead()
        self.assertEqual((len(madeA), len(madeB)), (2, 2))

    @defer.inlineCallbacks
    def test_twistedsOwnAdoptedPortTakesTheWholeBurst(self):  # type: ignore[no-untyped-def]
        """Why the port above exists: Twisted's adopted port drains the queue in one wake-up."""
        port, made = yield self._listen(
            AdoptedStreamServerEndpoint(self.reactor, os.dup(self.shared.fileno()), socket.AF_INET)
        )
        self._connect(3)
        port.doRead()
        self.assertEqual(len(made), 3)

    @defer.inlineCallbacks
    def test_theInheritedDescriptorIsClosed(self):  # type: ignore[no-untyped-def]
        """The port keeps its own duplicate; the inherited descriptor is not left open."""
        fd = os.dup(self.shared.fileno())
        yield self._listen(inheritedEndpoint(self.reactor, fd))
        self.assertRaises(OSError, os.fstat, fd)


class OtherReactorTests(TestCase):
    """On a reactor other than ksproxy's, the shared port still accepts one connection per wake-up."""

    @defer.inlineCallbacks
    def test_oneConnectionPerWakeUpOnTwistedsEpollReactor(self):  # type: ignore[no-untyped-def]
        from twisted.internet.epollreactor import EPollReactor

        other = EPollReactor()  # never run: the test calls doRead itself
        self.addCleanup(other._poller.close)
        shared = bindListening("tcp:0:interface=127.0.0.1")
        self.addCleanup(shared.close)
        made: List[int] = []
        port = yield inheritedEndpoint(other, os.dup(shared.fileno())).listen(
            protocol.Factory.forProtocol(lambda: _Count(made))
        )
        # Not stopListening: it finishes on a later turn of a reactor that never runs.
        self.addCleanup(port.socket.close)
        self.addCleanup(port.stopReading)
        clients = [socket.create_connection(shared.getsockname()[:2], timeout=5) for _ in range(3)]
        self.addCleanup(lambda: [c.close() for c in clients])
        port.doRead()
        self.assertEqual(len(made), 1)
        self.assertEqual(port.numberAccepts, 1)


class KsproxyReactorPortTests(TestCase):
    def test_theWorkersKeepTheFastPort(self) -> None:
        """On ksproxy's reactor the shared port is its own Port (the accept loop and the Server transport that
        closes without a writability round trip), not Twisted's."""
        from ksproxy.reactor import KsproxyReactor, Port, Server

        reactor = KsproxyReactor()  # never run
        self.addCleanup(reactor._poller.close)
        shared = bindListening("tcp:0:interface=127.0.0.1")
        self.addCleanup(shared.close)
        d = inheritedEndpoint(reactor, os.dup(shared.fileno())).listen(protocol.Factory())
        port = self.successResultOf(d)
        self.addCleanup(port.socket.close)
        self.addCleanup(port.stopReading)
        self.assertIsInstance(port, Port)
        self.assertIs(port.transport, Server)
        self.assertEqual(port.numberAccepts, 1)
