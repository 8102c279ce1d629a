"""
ksproxy against upstreams that refuse, hang, cut responses short, answer slowly, go stale and flap, on real
sockets; plus many rebuilds of a running gateway with health checks, which must not leak checkers or connections.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Dict, List, Tuple

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ksproxy.model.types import Endpoint
from tests.integration.faulty import (
    ScriptedProtocol,
    ScriptedUpstream,
    answerOK,
    closeIdleSoon,
    closeMidBody,
    hang,
    slowHead,
    staleOnSecond,
)
from tests.integration.gateway import RunningGateway
from tests.util import CLIENT_TIMEOUT, eventually, httpRequest, readUntilClosed

PROXY = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: {name}}}
spec:
  matcher: {{path: /{name}/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{port}'}}
  directives: {{stripPathPrefix: /{name}}}
{extra}
---
"""

CHECKED = "  healthCheck: {{url: /healthz, interval: {interval}, timeout: {timeout}, fall: 1}}"


def proxy(name: str, port: int, extra: str = "") -> str:
    return PROXY.format(name=name, port=port, extra=extra)


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


def _untilClosed(port: int, request: bytes) -> bytes:
    """Send C{request}, then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(request)
        return readUntilClosed(s)


def _sendAllThenRead(port: int, path: str, size: int) -> bytes:
    """POST C{size} bytes, all of them, then read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (path.encode(), size))
        block = b"x" * 65536
        for _ in range(size // len(block)):
            s.sendall(block)
        return readUntilClosed(s)


def _keepAlive(port: int, paths: List[str]) -> List[Tuple[int, bytes]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        out = []
        for path in paths:
            conn.request("GET", path)
            resp = conn.getresponse()
            out.append((resp.status, resp.read()))
        return out
    finally:
        conn.close()


def _readAll(port: int, request: bytes) -> Tuple[bytes, bool]:
    """Send C{request}, read until the server closes: (bytes, whether the connection was cut by a reset or
    closed before the response said it was complete)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    chunks = []
    try:
        s.sendall(request)
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return b"".join(chunks), True
            if not chunk:
                data = b"".join(chunks)
                head, _, body = data.partition(b"\r\n\r\n")
                return data, b"Content-Length: 100" in head and len(body) < 100
            chunks.append(chunk)
    finally:
        s.close()


class FaultTests(TestCase):
    """One gateway, one misbehaving upstream per route; short timeouts so each test stays well under a second."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstreams: Dict[str, ScriptedUpstream] = {
            "hang": ScriptedUpstream(hang),
            "midbody": ScriptedUpstream(closeMidBody),
            "slowok": ScriptedUpstream(
                slowHead(
                    [(0.05, b"HTTP/1.1 200 OK\r\n"), (0.1, b"Content-Length: 4\r\n"), (0.15, b"\r\nslow")]
                )
            ),
            "tooslow": ScriptedUpstream(
                slowHead([(0.05, b"HTTP/1.1 200 OK\r\n"), (1.5, b"Content-Length: 0\r\n\r\n")])
            ),
            "stale": ScriptedUpstream(staleOnSecond),
            "closeidle": ScriptedUpstream(closeIdleSoon),
            "early": ScriptedUpstream(answerOK),  # answers on the request head, body or not
        }
        manifests = "".join(proxy(name, up.listen()) for name, up in self.upstreams.items())
        # A port nothing listens on: bound, then closed.
        refused = ScriptedUpstream(answerOK)
        refusedPort = refused.listen()
        yield refused.kill()
        manifests += proxy("refused", refusedPort)
        self.gw = RunningGateway(
            {"faults.yaml": manifests},
            ["--response-header-timeout", "400ms", "--connect-timeout", "1s", "--idle-timeout", "1s"],
        )
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        for up in self.upstreams.values():
            yield up.cleanup()

    @defer.inlineCallbacks
    def test_anAnswerBeforeTheBodyIsInSaysTheConnectionCloses(self):  # type: ignore[no-untyped-def]
        """
        The upstream answers a POST whose body has not arrived yet: that answer must carry C{Connection: close}
        and the connection end after it.  It once said keep-alive and then closed, so a client's next request
        went into a closed connection (a broken pipe, or a lost POST).
        """
        got = yield threads.deferToThread(
            _untilClosed, self.gw.port, b"POST /early/x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
        )
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), got)
        self.assertIn(b"connection: close", head.lower())
        self.assertEqual(body, b"ok")

    @defer.inlineCallbacks
    def test_aClientStillSendingItsBodyGetsTheEarlyAnswer(self):  # type: ignore[no-untyped-def]
        """
        The upstream answers before the body is in, and the client goes on sending its 8 MiB body before it
        reads (what most clients do): the gateway must keep reading and dropping the rest for a while after its
        answer (a lingering close, RFC 9112 9.6).  It once closed at once, with the body unread, so the kernel
        reset the connection and the client saw a broken pipe instead of the answer.
        """
        got = yield threads.deferToThread(_sendAllThenRead, self.gw.port, "/early/x", 8 << 20)
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), got[:200])
        self.assertIn(b"connection: close", head.lower())
        self.assertEqual(body, b"ok")

    @defer.inlineCallbacks
    def test_refusedIsAFast502(self):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        status, headers, body = yield httpRequest(self.gw.port, "GET", "/refused/x")
        self.assertEqual(status, 502)
        self.assertLess(time.monotonic() - started, 1.0)
        doc = json.loads(body)
        self.assertEqual((doc["kind"], doc["code"]), ("Status", 502))
        self.assertIn("refused", doc["message"])

    @defer.inlineCallbacks
    def test_acceptAndHangIs504AfterTheHeaderTimeout(self):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        status, _, body = yield httpRequest(self.gw.port, "GET", "/hang/x")
        elapsed = time.monotonic() - started
        self.assertEqual(status, 504)
        self.assertEqual(json.loads(body)["code"], 504)
        self.assertGreaterEqual(elapsed, 0.39)
        self.assertLess(elapsed, 2.0)
        self.assertEqual(len(self.upstreams["hang"].heads), 1)
        # The hung upstream connection was dropped, not pooled.
        yield sleep(0.05)
        self.assertEqual(self.upstreams["hang"].connections, set())

    @defer.inlineCallbacks
    def test_closeMidBodyIsAnIncompleteResponse(self):  # type: ignore[no-untyped-def]
        data, cut = yield threads.deferToThread(
            _readAll, self.gw.port, b"GET /midbody/x HTTP/1.1\r\nHost: gw\r\n\r\n"
        )
        # The connection was cut (a reset may even swallow what was already sent); never a complete response.
        self.assertTrue(cut)
        head, _, body = data.partition(b"\r\n\r\n")
        if head:
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
            self.assertIn(b"Content-Length: 100", head)
        self.assertLess(len(body), 100)
        # http.client notices too.
        yield self.assertFailure(
            httpRequest(self.gw.port, "GET", "/midbody/y"), http.client.IncompleteRead, ConnectionResetError
        )

    @defer.inlineCallbacks
    def test_slowHeadersWithinTheLimit(self):  # type: ignore[no-untyped-def]
        status, _, body = yield httpRequest(self.gw.port, "GET", "/slowok/x")
        self.assertEqual((status, body), (200, b"slow"))

    @defer.inlineCallbacks
    def test_headersSlowerThanTheLimitAre504(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/tooslow/x")
        self.assertEqual(status, 504)

    @defer.inlineCallbacks
    def test_staleKeepAliveConnectionIsRetriedForGET(self):  # type: ignore[no-untyped-def]
        up = self.upstreams["stale"]
        results = yield threads.deferToThread(_keepAlive, self.gw.port, ["/stale/1", "/stale/2", "/stale/3"])
        self.assertEqual([s for s, _ in results], [200, 200, 200])
        # 1 on a fresh connection; 2 on the pooled one (dropped), then retried on a fresh one; 3 likewise.
        self.assertEqual(len(up.heads), 5)

    @defer.inlineCallbacks
    def test_staleKeepAliveConnectionIsNotRetriedForPOST(self):  # type: ignore[no-untyped-def]
        up = self.upstreams["stale"]
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/stale/1")
        self.assertEqual(status, 200)
        status, _, body = yield httpRequest(self.gw.port, "POST", "/stale/2", body=b"data")
        self.assertEqual(status, 502)
        self.assertEqual(len(up.heads), 2)  # sent once, never twice

    @defer.inlineCallbacks
    def test_idleConnectionClosedByTheUpstream(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/closeidle/1")
        self.assertEqual(status, 200)
        yield sleep(0.2)
        self.assertEqual(self.gw.service.pool.idleCount(), 0)
        status, _, _ = yield httpRequest(self.gw.port, "GET", "/closeidle/2")
        self.assertEqual(status, 200)


class FlapTests(TestCase):
    """An upstream with a health check, killed and revived under load."""

    interval = 0.3

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstream = ScriptedUpstream(answerOK)
        port = self.upstream.listen()
        extra = CHECKED.format(interval=f"{int(self.interval * 1000)}ms", timeout="200ms")
        self.gw = RunningGateway({"flap.yaml": proxy("flap", port, extra)})
        yield self.gw.start()
        self.health = self.gw.service.gateway.health
        self.key = Endpoint("http", "127.0.0.1", port).key
        self.connects: List[object] = []
        self.gw.service.pool.onConnect = self.connects.append

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        yield self.upstream.cleanup()

    def isDown(self) -> bool:
        return self.health.isDown(self.key)

    def waitFor(self, condition, timeout: float = 3.0):  # type: ignore[no-untyped-def]
        return eventually(condition, timeout=timeout)

    @defer.inlineCallbacks
    def test_fast503WhileDownAndBackWithinOneInterval(self):  # type: ignore[no-untyped-def]
        results: List[Tuple[int, float]] = []
        stop: List[bool] = []

        @defer.inlineCallbacks
        def load():  # type: ignore[no-untyped-def]
            while not stop:
                started = time.monotonic()
                status, _, _ = yield httpRequest(self.gw.port, "GET", "/flap/x")
                results.append((status, time.monotonic() - started))

        loads = [load() for _ in range(3)]
        yield self.waitFor(lambda: any(s == 200 for s, _ in results))
        self.assertEqual(len(self.health.checkers), 1)

        yield self.upstream.kill()
        yield self.waitFor(self.isDown)
        # Down: 503 with Retry-After at once, and no connection attempt to the upstream.
        connectsBefore = len(self.connects)
        for _ in range(5):
            started = time.monotonic()
            status, headers, body = yield httpRequest(self.gw.port, "GET", "/flap/y")
            self.assertEqual(status, 503)
            self.assertLess(time.monotonic() - started, 0.5)
            self.assertIn("retry-after", {k.lower() for k, _ in headers})
            self.assertIn("down", json.loads(body)["message"])
        self.assertEqual(len(self.connects), connectsBefore)
        described = self.health.describe()
        self.assertEqual([d["state"] for d in described], ["down"])

        self.upstream.listen()  # the same port again
        revived = time.monotonic()
        while True:
            status, _, _ = yield httpRequest(self.gw.port, "GET", "/flap/z")
            if status == 200:
                break
            self.assertEqual(status, 503)
            self.assertLess(time.monotonic() - revived, 3.0)
            yield sleep(0.01)
        # Within one check interval (plus scheduling slack on a busy machine).
        self.assertLess(time.monotonic() - revived, self.interval + 0.5)
        stop.append(True)
        yield defer.gatherResults(loads)
        statuses = {s for s, _ in results}
        self.assertLessEqual(statuses, {200, 502, 503})
        # No hung request: every answer came quickly even while the upstream was gone.
        self.assertLess(max(d for _, d in results), 1.0)
        self.assertEqual(len(self.health.checkers), 1)
        self.assertFalse(self.isDown())


class RebuildChurnTests(TestCase):
    """Hundreds of rebuilds of a live gateway: checkers and pooled connections stay bounded, requests succeed."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstreams = [ScriptedUpstream(answerOK) for _ in range(3)]
        self.ports = [u.listen() for u in self.upstreams]
        self.gw = RunningGateway({"base.yaml": proxy("base", self.ports[0])})
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        for up in self.upstreams:
            yield up.cleanup()

    def raw(self, name: str, port: int, interval: str) -> dict:
        return {
            "apiVersion": "extensions.kubesphere.io/v1alpha1",
            "kind": "ReverseProxy",
            "metadata": {"name": name},
            "spec": {
                "matcher": {"path": f"/{name}/*", "method": "*"},
                "upstream": {"url": f"http://127.0.0.1:{port}"},
                "directives": {"stripPathPrefix": f"/{name}"},
                "healthCheck": {"url": "/healthz", "interval": interval, "timeout": "1s"},
            },
        }

    @defer.inlineCallbacks
    def test_manyRebuilds(self):  # type: ignore[no-untyped-def]
        service = self.gw.service
        reconciler = self.gw.reconciler
        health = service.gateway.health
        pool = service.pool
        inventory = reconciler.inventory
        rebuilds = 1000
        for n in range(rebuilds):
            # Routes come and go over three upstreams; every 50th rebuild changes the check interval.
            interval = f"{10 + (n // 50) % 2}s"
            for j in range(4):
                port = self.ports[(n + j) % 3]
                if (n + j) % 5 == 0:
                    inventory.delete("ReverseProxy", f"r{j}")
                else:
                    inventory.upsert(self.raw(f"r{j}", port, interval), origin="test")
            reconciler.rebuild()
            wanted = {(ep, check) for (ep, check) in health.checkers}
            self.assertEqual(len(wanted), len(health.checkers))
            self.assertLessEqual(len(health.checkers), 3)
            if n % 100 == 0:
                served = [r for r in reconciler.report.snapshot.resources if r.meta.name.startswith("r")]
                if served:
                    status, _, _ = yield httpRequest(self.gw.port, "GET", f"/{served[0].meta.name}/x")
                    self.assertEqual(status, 200)
                self.assertLessEqual(pool.active, 3)
                self.assertLessEqual(pool.idleCount(), 3)
        self.assertGreaterEqual(reconciler.rebuilds, rebuilds)
        # Exactly the checkers the last table needs.
        live = {
            (r.upstream.key, r.healthCheck) for r in reconciler.report.snapshot.resources if r.healthCheck
        }
        self.assertEqual(set(health.checkers), live)
        self.assertTrue(all(c.running for c in health.checkers.values()))
        # Timers on the reactor: a few per checker and connection, not per rebuild.
        self.assertLess(len(reactor.getDelayedCalls()), 50)


class BadResponseTests(TestCase):
    """Upstream answers ksproxy refuses to relay: each a 502 that says why, never a broken client stream."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        def reply(data: bytes):  # type: ignore[no-untyped-def]
            def script(proto: ScriptedProtocol, head: bytes) -> None:
                proto.transport.write(data)

            return script

        self.upstreams: Dict[str, ScriptedUpstream] = {
            "garbage": ScriptedUpstream(reply(b"NOT HTTP AT ALL\r\n\r\n")),
            "twocl": ScriptedUpstream(
                reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")
            ),
            "hugehead": ScriptedUpstream(reply(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")),
            # Under the old fixed limit (256 KiB), over --max-header-bytes (64 KiB by default).
            "bighead": ScriptedUpstream(reply(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")),
            # A valid head, then a bad chunk size in the same read: nothing has reached the client yet.
            "badchunk": ScriptedUpstream(
                reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n")
            ),
            "switch": ScriptedUpstream(
                reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
            ),
            "status600": ScriptedUpstream(reply(b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok")),
            "gzipchunked": ScriptedUpstream(
                reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            ),
        }
        manifests = "".join(proxy(name, up.listen()) for name, up in self.upstreams.items())
        self.gw = RunningGateway({"bad.yaml": manifests})
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        for up in self.upstreams.values():
            yield up.cleanup()

    @defer.inlineCallbacks
    def test_each(self):  # type: ignore[no-untyped-def]
        for name, fragment in [
            ("garbage", "malformed response"),
            ("twocl", "malformed response"),
            ("hugehead", "malformed response"),
            ("bighead", "response headers larger than 65536 bytes"),
            ("badchunk", "malformed response after its headers"),
            ("switch", "switched protocols without an upgrade request"),
            ("status600", "status code 600 outside 100-599"),
            ("gzipchunked", "Transfer-Encoding other than chunked: gzip, chunked"),
        ]:
            status, _, body = yield httpRequest(self.gw.port, "GET", f"/{name}/x")
            self.assertEqual(status, 502, name)
            self.assertIn(fragment, json.loads(body)["message"], name)
        # The connections that carried the oversized head and the refused heads are closed, not pooled.
        for name in ("bighead", "status600", "gzipchunked"):
            yield eventually(lambda name=name: not self.upstreams[name].connections)
        self.assertEqual(self.gw.service.pool.idleCount(), 0)
