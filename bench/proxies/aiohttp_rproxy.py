# ruff: noqa: UP031, UP032 - %-formatting kept, as in the reference harness this follows
"""A minimal *streaming* aiohttp reverse proxy (the "idiomatic asyncio" peer).

Usage: python aiohttp_rproxy.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT

* one shared ClientSession => pooled keep-alive connections to the upstream
  (no connection limit, so it never queues behind a pool cap),
* request and response bodies are streamed chunk by chunk with backpressure
  (await resp.write() waits for the client socket to drain),
* hop-by-hop headers are dropped in both directions,
* default asyncio event loop (no uvloop), access log off.
"""
import sys

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def main():
    listen_port = int(sys.argv[1])
    upstream = "http://%s:%d" % (sys.argv[2], int(sys.argv[3]))

    async def on_startup(app):
        app["session"] = ClientSession(
            connector=TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60),
            timeout=ClientTimeout(total=None, sock_connect=5, sock_read=60),
            auto_decompress=False,
            cookie_jar=DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def on_cleanup(app):
        await app["session"].close()

    async def handle(request):
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "host"
        ]
        data = request.content if request.body_exists else None
        async with request.app["session"].request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=0)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(
        app, host="127.0.0.1", port=listen_port, access_log=None, print=None, backlog=1024
    )


if __name__ == "__main__":
    main()
