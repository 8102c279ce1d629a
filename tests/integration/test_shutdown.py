"""
Graceful operation on real sockets: stopping the service (what SIGTERM does under twistd) drains in-flight requests
up to the grace period while refusing new connections; route-table swaps never cut a request or a tunnel.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.integration.faulty import ScriptedUpstream, answerOK, hang, slowOK, upgradeEcho
from tests.integration.gateway import RunningGateway
from tests.util import CLIENT_TIMEOUT, eventually, httpRequest

PROXY = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: {name}}}
spec:
  matcher: {{path: /{name}/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{port}'}}
---
"""


def proxy(name: str, port: int) -> str:
    return PROXY.format(name=name, port=port)


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


def _refused(port: int) -> bool:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1.0)
    except ConnectionRefusedError:
        return True
    s.close()
    return False


class Tunnel:
    """A blocking client socket that upgrades, then sends and receives raw bytes (each step in a thread)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket

    def _open(self, path: str) -> bytes:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    def _echo(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            got += chunk
        return got

    def open(self, path: str) -> defer.Deferred:
        return threads.deferToThread(self._open, path)

    def echo(self, payload: bytes) -> defer.Deferred:
        return threads.deferToThread(self._echo, payload)

    def close(self) -> None:
        self.sock.close()


class DrainTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.slow = ScriptedUpstream(slowOK(0.4))
        self.hang = ScriptedUpstream(hang)
        self.fast = ScriptedUpstream(answerOK)
        manifests = proxy("slow", self.slow.listen()) + proxy("hang", self.hang.listen())
        manifests += proxy("fast", self.fast.listen())
        self.gw = RunningGateway({"all.yaml": manifests}, ["--drain-grace", "1s"])
        yield self.gw.start()
        self.stopped = False

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        if not self.stopped:
            yield self.gw.stop()
        for up in (self.slow, self.hang, self.fast):
            yield up.cleanup()

    def waitFor(self, condition, timeout: float = 3.0):  # type: ignore[no-untyped-def]
        return eventually(condition, timeout=timeout)

    @defer.inlineCallbacks
    def test_inFlightRequestCompletesAndNewConnectionsAreRefused(self):  # type: ignore[no-untyped-def]
        inflight = httpRequest(self.gw.port, "GET", "/slow/x")
        yield self.waitFor(lambda: self.slow.heads)
        stopping = self.gw.stop()
        self.stopped = True
        # The listening socket closes within a few reactor turns, well before the request finishes.
        deadline = time.monotonic() + 1.0
        while not (yield threads.deferToThread(_refused, self.gw.port)):
            self.assertLess(time.monotonic(), deadline, "still accepting connections")
            yield sleep(0.02)
        self.assertNoResult(stopping)
        status, headers, body = yield inflight
        self.assertEqual((status, body), (200, b"slow"))
        # The last response on a draining connection says so.
        self.assertIn(("Connection", "close"), headers)
        started = time.monotonic()
        yield stopping
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(self.gw.service.factory.connections, set())

    @defer.inlineCallbacks
    def test_graceOverCutsWhatIsLeft(self):  # type: ignore[no-untyped-def]
        inflight = httpRequest(self.gw.port, "GET", "/hang/x")
        inflight.addErrback(lambda f: f.value)  # the connection is cut: http.client raises
        yield self.waitFor(lambda: self.hang.heads)
        started = time.monotonic()
        yield self.gw.stop()
        self.stopped = True
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 2.0)
        result = yield inflight
        self.assertIsInstance(result, Exception)
        self.assertEqual(self.gw.service.factory.connections, set())

    @defer.inlineCallbacks
    def test_idleKeepAliveConnectionsCloseAtOnce(self):  # type: ignore[no-untyped-def]
        def idleThenRead(port: int) -> bytes:
            s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
            try:
                s.sendall(b"GET /fast/x HTTP/1.1\r\nHost: gw\r\n\r\n")
                data = b""
                while not data.endswith(b"ok"):
                    data += s.recv(4096)
                reactor.callFromThread(ready.callback, None)
                return s.recv(4096)  # b"" once the server closes the idle connection
            finally:
                s.close()

        ready: defer.Deferred = defer.Deferred()
        reading = threads.deferToThread(idleThenRead, self.gw.port)
        yield ready
        started = time.monotonic()
        yield self.gw.stop()
        self.stopped = True
        self.assertLess(time.monotonic() - started, 0.5)
        rest = yield reading
        self.assertEqual(rest, b"")


class SwapTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        # Slower than a file-source rebuild (a poll interval or two), so the swap lands mid-request.
        self.slow = ScriptedUpstream(slowOK(1.5))
        self.echo = ScriptedUpstream(upgradeEcho)
        self.manifests = proxy("slow", self.slow.listen()) + proxy("ws", self.echo.listen())
        self.gw = RunningGateway({"all.yaml": self.manifests})
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        yield self.slow.cleanup()
        yield self.echo.cleanup()

    @defer.inlineCallbacks
    def swap(self, extra: str):  # type: ignore[no-untyped-def]
        generation = self.gw.reconciler.generation
        self.gw.write("all.yaml", self.manifests + extra)
        yield self.gw.waitForGeneration(generation + 1)

    @defer.inlineCallbacks
    def test_swapDuringAnInFlightRequest(self):  # type: ignore[no-untyped-def]
        inflight = httpRequest(self.gw.port, "GET", "/slow/x")
        deadline = time.monotonic() + 3
        while not self.slow.heads:
            self.assertLess(time.monotonic(), deadline)
            yield sleep(0.01)
        yield self.swap(proxy("other", self.echo.portNumber))
        self.assertEqual(inflight.called, False)
        status, _, body = yield inflight
        self.assertEqual((status, body), (200, b"slow"))
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/other/x")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_tunnelSurvivesSwaps(self):  # type: ignore[no-untyped-def]
        tunnel = Tunnel(self.gw.port)
        try:
            head = yield tunnel.open("/ws/socket")
            self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
            got = yield tunnel.echo(b"before")
            self.assertEqual(got, b"before")
            for i in range(2):
                # Other routes come and go, and the slow route's upstream changes; the tunnel's route stays.
                yield self.swap(proxy(f"other{i}", self.slow.portNumber))
                got = yield tunnel.echo(b"after %d" % i)
                self.assertEqual(got, b"after %d" % i)
            self.assertEqual(len(self.echo.connections), 1)
        finally:
            tunnel.close()
