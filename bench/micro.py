"""
The Python cost of one proxied request, in process: no sockets, no reactor, no other programs.

A real gateway (route table, Gateway, HTTPServerProtocol, ProxyCall, pooled UpstreamConnection, metrics) is
driven over in-memory transports: a 1 KiB GET like wrk's comes in, the request head goes to the upstream
connection, nginx's 1 KiB answer comes back, the response goes to the client.  What it leaves out is what the
wrk benchmark adds (syscalls, epoll, the reactor loop), so the figure is a floor, not a throughput.

Use it for A/B comparisons of hot-path changes on a noisy machine: CPU time of this process only, best of
several rounds.  Under callgrind the instruction count per request is exact and repeatable:

    .venv/bin/python bench/micro.py                        # µs of CPU per request (best of 7 rounds)
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/micro.py --callgrind
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from ksproxy.accesslog import AccessLog  # noqa: E402
from ksproxy.http.server import HTTPServerFactory  # noqa: E402
from ksproxy.http.upstream import UpstreamConnection, UpstreamPool  # noqa: E402
from ksproxy.metrics import install as installMetrics  # noqa: E402
from ksproxy.proxy.dispatch import Gateway, ServedState  # noqa: E402
from ksproxy.reconcile import Reconciler  # noqa: E402
from ksproxy.routing import compileTable  # noqa: E402
from ksproxy.sources.inventory import SourceDocument  # noqa: E402

# What wrk sends, and what nginx answers (the headers of nginx 1.22), in reads of at most 64 KiB as Twisted
# reads a socket.
REQUEST = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:18088\r\n\r\n"
READ_SIZE = 65536


def response(size: int) -> list:
    head = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 16:00:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
        b"Last-Modified: Thu, 03 Dec 2026 15:00:00 GMT\r\nConnection: keep-alive\r\n"
        b'ETag: "6750a0b0-400"\r\nAccept-Ranges: bytes\r\n\r\n' % size
    )
    whole = head + b"x" * size
    return [whole[i : i + READ_SIZE] for i in range(0, len(whole), READ_SIZE)]


MANIFEST = {
    "apiVersion": "extensions.kubesphere.io/v1alpha1",
    "kind": "ReverseProxy",
    "metadata": {"name": "all"},
    "spec": {"matcher": {"path": "/*", "method": "*"}, "upstream": {"url": "http://127.0.0.1:18081"}},
}


class _Pool(UpstreamPool):
    """Connections over in-memory transports, handed out at once."""

    def connect(self, endpoint):  # type: ignore[no-untyped-def]
        conn = UpstreamConnection(self, endpoint.key)
        conn.makeConnection(StringTransport())
        self.active += 1
        self.upstream = conn
        return defer.succeed(conn)


def build():  # type: ignore[no-untyped-def]
    clock = task.Clock()
    pool = _Pool(clock)
    gateway = Gateway(clock, ServedState(compileTable((), generation=0).table, {}, 0, False), pool)
    reconciler = Reconciler(clock, gateway)
    reconciler.inventory.replaceAll([SourceDocument("micro#1", MANIFEST)], [])
    reconciler.ready = True
    reconciler.rebuild()
    factory = HTTPServerFactory(gateway, clock, accessLog=AccessLog(clock, enabled=False))
    installMetrics(reconciler, gateway, pool, None, factory)
    client = factory.buildProtocol(None)
    wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    client.makeConnection(wire)
    return client, wire, pool


def run(n: int, client, wire, pool, reads: list) -> None:  # type: ignore[no-untyped-def]
    receive = client.dataReceived
    for _ in range(n):
        receive(REQUEST)
        upstream = pool.upstream
        upstream.transport.clear()
        for data in reads:
            upstream.dataReceived(data)
        wire.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--callgrind", action="store_true", help="one round of --requests, for an instruction count")
    ap.add_argument("--size", type=int, default=1024, help="response body bytes (1048576 for the 1 MiB case)")
    args = ap.parse_args()
    reads = response(args.size)
    client, wire, pool = build()
    client.dataReceived(REQUEST)
    for data in reads:
        pool.upstream.dataReceived(data)
    answer = wire.value()
    if not (answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + b"x" * args.size)):
        sys.exit(f"unexpected answer: {answer[:300]!r}")
    if pool.idleCount() != 1:
        sys.exit("the upstream connection did not go back to the pool")
    wire.clear()
    run(100, client, wire, pool, reads)  # warm: caches are filled
    if args.callgrind:
        run(args.requests, client, wire, pool, reads)
        return
    best = None
    for _ in range(args.rounds):
        started = time.process_time()
        run(args.requests, client, wire, pool, reads)
        spent = time.process_time() - started
        best = spent if best is None else min(best, spent)
    perRequest = best * 1e6 / args.requests
    print(f"{perRequest:.2f} us of CPU per proxied request of {args.size} bytes "
          f"(best of {args.rounds} rounds of {args.requests})")


if __name__ == "__main__":
    main()
