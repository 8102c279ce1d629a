"""
One access-log event per finished request (SPEC 10): route, upstream, status, bytes, duration, generation.

Events go through twisted.logger under the namespace C{ksproxy.access} with structured fields, so the text
observer prints one line and the JSON observer (L{ksproxy.logfmt.jsonLogObserver}) prints the fields.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.logger import Logger

from .http.server import Exchange

__all__ = ["AccessLog"]

_log = Logger(namespace="ksproxy.access")

_FORMAT = (
    '{client} "{method} {target} HTTP/{version}" {code} {bytes} {ms:.1f}ms '
    "route={route} upstream={upstream} gen={generation}{aborted}"
)


class AccessLog:
    """Called by the server factory for every finished (or aborted) exchange."""

    def __init__(self, clock, enabled: bool = True, observe: Optional[Callable[[Exchange, bool, float], None]] = None):
        self.clock = clock
        self.enabled = enabled
        # Extra per-request observer (metrics); gets the exchange, whether it was aborted, and its duration.
        self.observe = observe

    def __call__(self, exchange: Exchange, aborted: bool) -> None:
        duration = self.clock.seconds() - exchange.startedAt
        if self.observe is not None:
            self.observe(exchange, aborted, duration)
        if not self.enabled:
            return
        _log.info(
            _FORMAT,
            client=exchange.clientAddress,
            method=exchange.method.decode("latin-1"),
            target=exchange.target.decode("latin-1"),
            version=exchange.version.decode("latin-1"),
            code=exchange.code or "-",
            bytes=exchange.bytesSent,
            ms=duration * 1000.0,
            route=exchange.route,
            upstream=exchange.upstreamName,
            generation=exchange.generation,
            aborted=" aborted" if aborted else "",
        )
