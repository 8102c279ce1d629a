"""
Gateway._forwardingHeaders rewrites the request headers in one pass; it must give exactly what the step-by-step
rules give (strip hop-by-hop headers, add the Upgrade pair, then set X-Forwarded-For/-Proto/-Host and Host, each
replacing the first occurrence in place or appending).  The reference below is those steps.
"""

from __future__ import annotations

import random
from typing import Optional, Tuple

import pytest

from ksproxy.http.headers import Headers
from ksproxy.model.types import Endpoint
from ksproxy.proxy.dispatch import Gateway
from ksproxy.proxy.forward import stripHopByHop

UP = Endpoint("http", "up.example", 8080)


class FakeExchange:
    def __init__(self, headers: Headers, upgrade: bool, secure: bool) -> None:
        self.headers = headers
        self.upgrade = upgrade
        self.secure = secure
        self.clientAddress = "10.0.0.1"


def reference(exchange: FakeExchange, endpoint: Endpoint, trusted: bool) -> Tuple[Headers, Optional[bytes], bytes]:
    headers = exchange.headers
    upgrade = headers.get(b"upgrade") if exchange.upgrade else None
    clientHost = headers.get(b"host") or b""
    stripHopByHop(headers)
    if upgrade is not None:
        headers.add(b"Connection", b"Upgrade")
        headers.add(b"Upgrade", upgrade)
    xff = headers.get(b"x-forwarded-for")
    client = exchange.clientAddress.encode("latin-1")
    headers.set(b"X-Forwarded-For", xff + b", " + client if xff else client)
    if not (trusted and b"x-forwarded-proto" in headers):
        headers.set(b"X-Forwarded-Proto", b"https" if exchange.secure else b"http")
    if not (trusted and b"x-forwarded-host" in headers) and clientHost:
        headers.set(b"X-Forwarded-Host", clientHost)
    headers.set(b"Host", endpoint.hostport.encode("idna"))
    return headers, upgrade, clientHost


NAMES = [b"Host", b"X-Forwarded-For", b"x-forwarded-proto", b"X-Forwarded-Host", b"Connection", b"Upgrade"]
NAMES += [b"Keep-Alive", b"A", b"TE", b"Transfer-Encoding"]
VALUES = [b"", b"v1", b"x-forwarded-for", b"close, A", b"X-Forwarded-Host, host", b"ws", b"keep-alive"]


@pytest.mark.parametrize("seed", range(4))
def test_onePassMatchesTheStepByStepRules(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(500):
        pairs = [(rnd.choice(NAMES), rnd.choice(VALUES)) for _ in range(rnd.randint(0, 8))]
        upgrade, secure, trusted = rnd.random() < 0.3, rnd.random() < 0.5, rnd.random() < 0.5
        gateway = Gateway.__new__(Gateway)
        gateway._isTrusted = lambda address, t=trusted: t  # type: ignore[method-assign]
        want, wantUpgrade, wantHost = reference(FakeExchange(Headers(pairs), upgrade, secure), UP, trusted)
        got, gotUpgrade, gotHost = gateway._forwardingHeaders(FakeExchange(Headers(pairs), upgrade, secure), UP)
        context = (pairs, upgrade, secure, trusted)
        assert [list(i) for i in got.items] == [list(i) for i in want.items], context
        assert (gotUpgrade, gotHost) == (wantUpgrade, wantHost), context


def test_screeningCatchesEveryHeaderTheStrippersRemove() -> None:
    """handleRequest skips the strippers when the one-pass screen finds nothing: it must find all they remove."""
    from ksproxy.auth import identity
    from ksproxy.http.headers import Headers
    from ksproxy.proxy.dispatch import _needsScreening

    names = [
        *identity._IDENTITY_NAMES,
        identity._IDENTITY_EXTRA + b"scopes",
        *identity._IMPERSONATE_NAMES,
        identity._IMPERSONATE_EXTRA + b"scopes",
        b"x_remote_user",
        b"via",
    ]
    for name in names:
        headers = Headers([(b"Accept", b"*/*"), (name.title(), b"v")])
        assert _needsScreening(headers), name
    assert not _needsScreening(Headers([(b"Accept", b"*/*"), (b"X-Request-Id", b"1"), (b"Host", b"h")]))
