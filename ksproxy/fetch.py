"""
Small out-of-band HTTP requests (bundle URL sources, health checks) through treq, with an upstream's own TLS
settings.  Not the proxy path: that one is L{ksproxy.http.upstream}.
"""

from __future__ import annotations

from typing import Dict, Optional

import treq
from twisted.internet import defer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .http.upstream import tlsCreator
from .model.types import Endpoint, TLSSettings

__all__ = ["OutOfBandClient", "FetchError"]


class FetchError(Exception):
    """A fetch failed: a status other than expected, too large, or a transport error (in the message)."""


@implementer(IPolicyForHTTPS)
class _EndpointPolicy:
    def __init__(self, tls: TLSSettings) -> None:
        self._tls = tls
        self._cache: Dict[bytes, object] = {}

    def creatorForNetloc(self, hostname: bytes, port: int):  # type: ignore[no-untyped-def]
        creator = self._cache.get(hostname)
        if creator is None:
            creator = self._cache[hostname] = tlsCreator(hostname.decode("idna"), self._tls)
        return creator


class OutOfBandClient:
    """One treq client per distinct TLS setting, sharing a small persistent pool each."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._clients: Dict[TLSSettings, treq.client.HTTPClient] = {}
        self._pools: Dict[TLSSettings, HTTPConnectionPool] = {}

    def _client(self, tls: TLSSettings) -> treq.client.HTTPClient:
        client = self._clients.get(tls)
        if client is None:
            pool = HTTPConnectionPool(self.reactor, persistent=True)
            pool.maxPersistentPerHost = 2
            pool.cachedConnectionTimeout = 30
            self._pools[tls] = pool
            client = self._clients[tls] = treq.client.HTTPClient(
                Agent(self.reactor, contextFactory=_EndpointPolicy(tls), pool=pool)
            )
        return client

    def url(self, endpoint: Endpoint, target: Optional[str] = None) -> str:
        """The URL for C{target} (a path, or an absolute URL) on C{endpoint}; default: the endpoint's own path."""
        if target and "://" in target:
            return target
        path = target if target is not None else (endpoint.path or "/")
        return endpoint.origin + path

    @defer.inlineCallbacks
    def get(self, endpoint: Endpoint, target: Optional[str] = None, *, timeout: float = 10.0, maxBytes: int = 32 << 20):
        """GET and return (code, body); the body is capped at C{maxBytes}."""
        client = self._client(endpoint.tls)
        response = yield client.get(self.url(endpoint, target), timeout=timeout, allow_redirects=False)
        chunks = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > maxBytes:
                raise FetchError(f"response larger than {maxBytes} bytes")
            chunks.append(data)

        yield treq.collect(response, collect)
        return response.code, b"".join(chunks)

    @defer.inlineCallbacks
    def fetchBytes(self, endpoint: Endpoint):  # type: ignore[no-untyped-def]
        """A bundle URL source: the body of a 200, or a L{FetchError}."""
        code, body = yield self.get(endpoint)
        if code != 200:
            raise FetchError(f"{self.url(endpoint)} answered {code}")
        return body

    def close(self) -> defer.Deferred[None]:
        return defer.gatherResults([p.closeCachedConnections() for p in self._pools.values()]).addCallback(
            lambda _: None
        )
