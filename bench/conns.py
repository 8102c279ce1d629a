"""
The whole cost of proxied requests over real loopback sockets, in one process: accept, read, route, forward,
answer, close.  Where bench/micro.py leaves out the sockets and the reactor, this keeps them, so it covers
what a `Connection: close` request adds (accepting, the transport, timers, closing).

The client, the gateway and a minimal upstream all run on one KsproxyReactor in this process; the client
starts the next request as soon as one ends, on --parallel connections.  Client and upstream cost the same
in an A and a B run, so the difference between two trees is the gateway's.  Use it for A/B comparisons on a
noisy machine; under callgrind the instruction count per request is exact and repeatable:

    .venv/bin/python bench/conns.py --close                  # µs of CPU per request, this process
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/conns.py --close --callgrind
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ksproxy.reactor import install  # noqa: E402

reactor = install()

from twisted.internet import protocol  # noqa: E402

from ksproxy.accesslog import AccessLog  # noqa: E402
from ksproxy.http.server import HTTPServerFactory  # noqa: E402
from ksproxy.http.upstream import UpstreamPool  # noqa: E402
from ksproxy.metrics import install as installMetrics  # noqa: E402
from ksproxy.proxy.dispatch import Gateway, ServedState  # noqa: E402
from ksproxy.reconcile import Reconciler  # noqa: E402
from ksproxy.routing import compileTable  # noqa: E402
from ksproxy.sources.inventory import SourceDocument  # noqa: E402

BODY = b"x" * 1024
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 16:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Thu, 03 Dec 2026 15:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6750a0b0-400"\r\nAccept-Ranges: bytes\r\n\r\n' + BODY
)


class Upstream(protocol.Protocol):
    """Answers each request head with nginx's 1 KiB answer (wrk's requests have no body)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(ANSWER * data.count(b"\r\n\r\n"))
        if b"Connection: close" in data:  # only ever sent straight to it (--direct)
            self.transport.loseConnection()


class Client(protocol.Protocol):
    """One request per connection (--close) or back-to-back requests on one connection."""

    def connectionMade(self) -> None:
        self.got = 0
        self.factory.send(self)

    def dataReceived(self, data: bytes) -> None:
        self.got += len(data)
        if not self.factory.close and self.got >= self.factory.expect:
            self.got -= self.factory.expect
            self.factory.done(self)

    def connectionLost(self, reason: object) -> None:
        if self.factory.close:
            if self.got != self.factory.expect:
                reactor.stop()
                raise SystemExit(f"incomplete answer: {self.got} bytes of {self.factory.expect}")
            self.factory.done(self)
            self.factory.next()


class Load(protocol.ClientFactory):
    protocol = Client

    def __init__(self, port: int, requests: int, parallel: int, close: bool) -> None:
        self.port, self.left, self.close = port, requests, close
        self.inFlight = 0
        self.parallel = parallel
        self.request = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n" % (
            port, b"Connection: close\r\n" if close else b"")
        self.expect = 0  # the size of one answer (probe)
        self.completed = 0
        self.total = requests

    def start(self) -> None:
        for _ in range(self.parallel if self.close else 1):
            self.next()
        if not self.close:
            for _ in range(self.parallel - 1):
                reactor.connectTCP("127.0.0.1", self.port, self)

    def next(self) -> None:
        if self.left <= 0:
            if self.completed >= self.total:
                reactor.stop()
            return
        self.left -= 1
        reactor.connectTCP("127.0.0.1", self.port, self)

    def send(self, client: Client) -> None:
        client.transport.write(self.request)

    def done(self, client: Client) -> None:
        self.completed += 1
        if self.close:
            return  # the server closes; connectionLost starts the next
        if self.left > 0:
            self.left -= 1
            self.send(client)
        elif self.completed >= self.total:
            reactor.stop()


def gateway(upstreamPort: int):  # type: ignore[no-untyped-def]
    pool = UpstreamPool(reactor)
    gw = Gateway(reactor, ServedState(compileTable((), generation=0).table, {}, 0, False), pool)
    reconciler = Reconciler(reactor, gw)
    manifest = {
        "apiVersion": "extensions.kubesphere.io/v1alpha1",
        "kind": "ReverseProxy",
        "metadata": {"name": "all"},
        "spec": {"matcher": {"path": "/*", "method": "*"},
                 "upstream": {"url": f"http://127.0.0.1:{upstreamPort}"}},
    }
    reconciler.inventory.replaceAll([SourceDocument("conns#1", manifest)], [])
    reconciler.ready = True
    reconciler.rebuild()
    factory = HTTPServerFactory(gw, reactor, accessLog=AccessLog(reactor, enabled=False))
    installMetrics(reconciler, gw, pool, None, factory)
    return factory


def measure(port: int, requests: int, parallel: int, close: bool) -> float:
    load = Load(port, requests, parallel, close)
    load.expect = probe(port, load.request)
    started = time.process_time()
    reactor.callWhenRunning(load.start)
    reactor.run(installSignalHandlers=False)
    return time.process_time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--parallel", type=int, default=10, help="connections in flight")
    ap.add_argument("--close", action="store_true", help="Connection: close on every request")
    ap.add_argument("--callgrind", action="store_true", help="one run, for an instruction count")
    ap.add_argument("--direct", action="store_true",
                    help="the client straight to the upstream: what to subtract to get the gateway's share")
    args = ap.parse_args()
    upstream = reactor.listenTCP(0, protocol.Factory.forProtocol(Upstream), interface="127.0.0.1")
    if args.direct:
        port = upstream.getHost().port
    else:
        listener = reactor.listenTCP(0, gateway(upstream.getHost().port), interface="127.0.0.1", backlog=1024)
        port = listener.getHost().port
    spent = measure(port, args.requests, args.parallel, args.close)
    if not args.callgrind:
        print(f"{spent * 1e6 / args.requests:.1f} us of CPU per request (client, gateway and upstream; "
              f"{'Connection: close' if args.close else 'keep-alive'}, {args.parallel} connections, "
              f"{args.requests} requests)")


def probe(port: int, request: bytes) -> int:
    """The size of one answer, from one request made before the reactor runs (which is turned by hand)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request)
    sock.setblocking(False)
    got = b""
    deadline = time.monotonic() + 5
    while not got.endswith(BODY) and time.monotonic() < deadline:
        reactor.iterate(0.01)
        try:
            got += sock.recv(65536)
        except BlockingIOError:
            pass
    sock.close()
    for _ in range(5):
        reactor.iterate(0.01)
    if not got.startswith(b"HTTP/1.1 200 OK") or not got.endswith(BODY):
        sys.exit(f"unexpected answer: {got[:300]!r}")
    return len(got)


if __name__ == "__main__":
    main()
