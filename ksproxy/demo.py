"""
A small upstream for trying ksproxy out: it answers every request with a JSON description of what it
received (method, path, query, headers, body size), serves a demo front-end bundle at /bundles/demo.js and
has /healthz.  `python -m ksproxy.demo --port 8081`.
"""

from __future__ import annotations

import argparse
import json

from twisted.internet import reactor
from twisted.web import resource, server

__all__ = ["EchoUpstream", "main"]

DEMO_BUNDLE = b"""// served by the demo upstream through a JSBundle URL source
export default { name: 'demo-from-url', routes: [] };
"""


class EchoUpstream(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        if request.path == b"/healthz":
            request.setHeader(b"Content-Type", b"text/plain")
            return b"ok\n"
        if request.path == b"/bundles/demo.js":
            request.setHeader(b"Content-Type", b"application/javascript")
            return DEMO_BUNDLE
        body = request.content.read()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Demo-Upstream", b"yes")
        return (
            json.dumps(
                {
                    "method": request.method.decode("latin-1"),
                    "uri": request.uri.decode("latin-1"),
                    "headers": {
                        k.decode("latin-1"): [v.decode("latin-1") for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()
                    },
                    "bodyBytes": len(body),
                },
                indent=2,
                sort_keys=True,
            ).encode("utf-8")
            + b"\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args()
    site = server.Site(EchoUpstream())
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(args.port, site, interface=args.interface)
    print(f"demo upstream on http://{args.interface}:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
