"""
Helpers for integration tests: a recording upstream on 127.0.0.1, and blocking clients run in a thread so the
reactor keeps serving while the test waits.  Every socket has a timeout, so nothing can hang a test run.
"""

from __future__ import annotations

import http.client
import socket
from typing import Dict, List, Optional, Tuple

from twisted.internet import defer, threads
from twisted.web import resource, server

CLIENT_TIMEOUT = 10.0


class Recorded:
    def __init__(self, request: server.Request, body: bytes) -> None:
        self.method = request.method
        self.uri = request.uri
        self.headers: List[Tuple[bytes, bytes]] = [
            (k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs
        ]
        self.body = body

    def header(self, name: bytes) -> Optional[bytes]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def headerAll(self, name: bytes) -> List[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class RecordingUpstream(resource.Resource):
    """Answers every request with 200 and a JSON-ish echo line, and records exactly what it received."""

    isLeaf = True

    def __init__(self, name: str = "upstream") -> None:
        super().__init__()
        self.name = name
        self.requests: List[Recorded] = []
        self.responseHeaders: Dict[bytes, List[bytes]] = {}
        self.body: Optional[bytes] = None
        self.code = 200

    def render(self, request: server.Request) -> bytes:
        body = request.content.read()
        self.requests.append(Recorded(request, body))
        request.setResponseCode(self.code)
        for k, vs in self.responseHeaders.items():
            request.responseHeaders.setRawHeaders(k, vs)
        if self.body is not None:
            return self.body
        return b"%s %s %s" % (self.name.encode(), request.method, request.uri)

    @property
    def last(self) -> Recorded:
        return self.requests[-1]


def listenUpstream(reactor, res: resource.Resource):  # type: ignore[no-untyped-def]
    site = server.Site(res)
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, port.getHost().port


def _httpRequest(port: int, method: str, path: str, headers: Dict[str, str], body: Optional[bytes]):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheaders(), data
    finally:
        conn.close()


def httpRequest(
    port: int, method: str, path: str, headers: Optional[Dict[str, str]] = None, body: Optional[bytes] = None
) -> defer.Deferred[Tuple[int, List[Tuple[str, str]], bytes]]:
    """One HTTP/1.1 request through a real socket (in a thread): (status, headers, body)."""
    return threads.deferToThread(_httpRequest, port, method, path, dict(headers or {}), body)


def _raw(port: int, data: bytes, readUntilClose: bool) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    try:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not readUntilClose and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)
    finally:
        s.close()


def rawRequest(port: int, data: bytes, readUntilClose: bool = True) -> defer.Deferred[bytes]:
    """Send raw bytes, return what came back (until the server closes, or the first head if asked)."""
    return threads.deferToThread(_raw, port, data, readUntilClose)


@defer.inlineCallbacks
def eventually(condition, what: str = "condition", timeout: float = 5.0, steady: int = 1, step: float = 0.01):  # type: ignore[no-untyped-def]
    """
    Poll on the running reactor until C{condition()} holds C{steady} times in a row; fail after C{timeout}
    seconds.  The one bounded wait for integration tests whose condition has no event to hook.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    seen = 0
    while True:
        seen = seen + 1 if condition() else 0
        if seen >= steady:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield deferLater(reactor, step, lambda: None)


def capturedLog(case, namespace: Optional[str] = None, level=None) -> List[str]:  # type: ignore[no-untyped-def]
    """
    The formatted log events emitted until the end of the test C{case} (from C{namespace} and at C{level},
    when given): a list that fills as they come.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    lines: List[str] = []

    def observe(event: dict) -> None:
        if (namespace is None or event.get("log_namespace") == namespace) and (
            level is None or event.get("log_level") == level
        ):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def readUntilClosed(sock: socket.socket) -> bytes:
    """Read from a blocking socket until the server closes it (the socket's timeout bounds each read)."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
