"""
One access-log event per finished request (SPEC 10): route, upstream, status, bytes, duration, generation.

Events go through twisted.logger under the namespace C{ksproxy.access} with structured fields, so the text
observer prints one line and the JSON observer (L{ksproxy.logfmt.jsonLogObserver}) prints the fields.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from twisted.logger import Logger

from .http.server import Exchange

__all__ = ["AccessLog"]

_log = Logger(namespace="ksproxy.access")

# (exchange, aborted, duration in seconds)
Observer = Callable[[Exchange, bool, float], None]

_FORMAT = (
    '{client} "{method} {target} HTTP/{version}" {code} {bytes} {ms:.1f}ms '
    "route={route} upstream={upstream} gen={generation}{aborted}"
)


class AccessLog:
    """
    Called by the server factory for every finished (or aborted) exchange.  Observers (metrics) see every
    exchange even when the log line itself is turned off (C{--no-access-log}).
    """

    def __init__(self, clock, enabled: bool = True, observe: Optional[Observer] = None):
        self.clock = clock
        self.enabled = enabled
        self.observers: List[Observer] = [observe] if observe is not None else []

    def addObserver(self, observer: Observer) -> None:
        """Also call C{observer(exchange, aborted, duration)} for every exchange."""
        self.observers.append(observer)

    def __call__(self, exchange: Exchange, aborted: bool) -> None:
        duration = self.clock.seconds() - exchange.startedAt
        for observer in self.observers:
            try:
                observer(exchange, aborted, duration)
            except Exception:
                _log.failure("access log observer failed")
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
