"""
Requests leave no reference cycles behind: every object a request or a connection creates (exchange, proxy call,
parser, upstream connection, exception tracebacks) is freed by reference counting when it ends.

Two reasons.  The cycle collector would otherwise run for every few requests and walk the garbage of hundreds
(CPU on the hot path).  And the live route table is frozen out of the collector's sight after each build
(L{ksproxy.routing.background}): a cycle that was alive at that moment and dies later is never collected, so
the objects that live across a freeze (connections, exchanges in flight) must not die in cycles.

With the collector off and C{gc.DEBUG_SAVEALL}, whatever a collection finds unreachable stays in C{gc.garbage}
instead of being freed: after a variety of exchanges, none of it may be ours.
"""

from __future__ import annotations

import gc
import http.client
import os
import socket
import types
from collections import Counter
from typing import Any, List, Tuple

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

import ksproxy
from ksproxy.http.upstream import _OneShotFactory
from tests.integration.faulty import (
    ScriptedUpstream,
    answerOK,
    closeIdleSoon,
    closeMidBody,
    hang,
    staleOnSecond,
)
from tests.integration.gateway import RunningGateway
from tests.integration.test_faults import proxy
from tests.util import CLIENT_TIMEOUT, eventually

BUNDLE = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: JSBundle
metadata: {name: inline}
spec:
  raw: ZXhwb3J0IGRlZmF1bHQge307Cg==
---
"""

_OURS = os.path.dirname(ksproxy.__file__)


def _ours(obj: Any) -> bool:
    """Whether C{obj} was made by ksproxy's code (or is a parser it owns)."""
    if isinstance(obj, types.FrameType):
        return obj.f_code.co_filename.startswith(_OURS)
    if isinstance(obj, types.TracebackType):
        return obj.tb_frame.f_code.co_filename.startswith(_OURS)
    if isinstance(obj, types.MethodType):
        return _ours(obj.__self__)
    if isinstance(obj, types.FunctionType):
        return obj.__code__.co_filename.startswith(_OURS)
    if isinstance(obj, _OneShotFactory):
        # Twisted's connector and its endpoint's wrapping factory refer to each other, with ours inside; ours
        # lets go of the connection it carries (buildProtocol, or a failed attempt), so nothing more is held.
        return obj.protocol is not None
    module = type(obj).__module__ or ""
    return module.startswith(("ksproxy", "httptools"))


def _exchange(port: int, request: bytes, abortAfter: int = 0) -> bytes:
    """Send C{request} on a fresh connection; read until the server closes (or C{abortAfter} bytes, then cut)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    got = b""
    try:
        s.sendall(request)
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
            if abortAfter and len(got) >= abortAfter:
                break
    finally:
        s.close()
    return got


def _keepAlive(port: int, requests: List[Tuple[str, str, bytes]]) -> List[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        statuses = []
        for method, path, body in requests:
            conn.request(method, path, body=body or None)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        return statuses
    finally:
        conn.close()


class NoCycleTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstreams = {
            name: ScriptedUpstream(script)
            for name, script in (
                ("ok", answerOK),
                ("hang", hang),
                ("midbody", closeMidBody),
                ("stale", staleOnSecond),
                ("closeidle", closeIdleSoon),
            )
        }
        manifests = BUNDLE + "".join(proxy(name, up.listen()) for name, up in self.upstreams.items())
        refused = ScriptedUpstream(answerOK)
        refusedPort = refused.listen()
        yield refused.kill()
        manifests += proxy("refused", refusedPort)
        self.gw = RunningGateway({"all.yaml": manifests}, ["--response-header-timeout", "300ms"])
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        for up in self.upstreams.values():
            yield up.cleanup()

    def _collectorOff(self) -> None:
        # Frozen objects (what lived when a table was built) are out of the collector's sight, cycles or not.
        gc.unfreeze()
        gc.collect()
        wasEnabled = gc.isenabled()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)

        def restore() -> None:
            gc.set_debug(0)
            del gc.garbage[:]
            if wasEnabled:
                gc.enable()

        self.addCleanup(restore)

    @defer.inlineCallbacks
    def test_requestsAndConnectionsLeaveNoCycles(self):  # type: ignore[no-untyped-def]
        port = self.gw.port
        self._collectorOff()
        statuses = yield threads.deferToThread(
            _keepAlive,
            port,
            [
                ("GET", "/ok/a", b""),
                ("POST", "/ok/b", b"x" * 1000),  # a body with a length
                ("HEAD", "/ok/c", b""),
                ("GET", "/nowhere", b""),  # no route: 404
                ("GET", "/refused/d", b""),  # connect refused: 502
                ("GET", "/hang/e", b""),  # response header timeout: 504
                ("GET", "/stale/f", b""),
                ("GET", "/stale/g", b""),  # a pooled connection gone stale: retried
                ("GET", "/closeidle/h", b""),  # the upstream closes its idle connection afterwards
                ("GET", "/dist/inline.js", b""),  # wherever the bundle is, the answer is ours
            ],
        )
        self.assertEqual(statuses[:6], [200, 200, 200, 404, 502, 504])
        # Chunked upload, Connection: close (the last request of a connection), a malformed request, a response
        # cut short by the upstream, and a client that goes away while its upstream hangs.
        yield threads.deferToThread(
            _exchange,
            port,
            b"POST /ok/i HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
        )
        yield threads.deferToThread(_exchange, port, b"GET /ok/j HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        yield threads.deferToThread(_exchange, port, b"GET /ok/k HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        yield threads.deferToThread(_exchange, port, b"GET /midbody/l HTTP/1.1\r\nHost: t\r\n\r\n")
        client = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        client.sendall(b"GET /hang/m HTTP/1.1\r\nHost: t\r\n\r\n")
        yield eventually(lambda: len(self.upstreams["hang"].heads) >= 2, "the hanging upstream saw the request")
        client.close()
        factory = self.gw.service.factory
        yield eventually(lambda: not factory.connections, "every client connection closed on the server side")
        yield eventually(lambda: not self.upstreams["closeidle"].connections, "the idle upstream connection closed")

        # A build window may have frozen objects meanwhile (the file source frees what a reload replaced a
        # poll later): unfrozen, their cycles show too.
        gc.unfreeze()
        gc.collect()
        ours = [obj for obj in gc.garbage if _ours(obj)]
        kinds = Counter(
            f"{type(obj).__name__} {getattr(getattr(obj, 'f_code', getattr(obj, '__code__', None)), 'co_name', '')}".strip()
            for obj in ours
        )
        self.assertEqual(ours, [], f"left for the cycle collector: {dict(kinds)}")
