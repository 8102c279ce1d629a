"""
The request handler: everything that happens between "headers are in" and "bytes go upstream".

For each request (SPEC 2): read the live table once, normalise the path, strip spoofed identity headers, find
the route, authenticate and authorise (bundles and public paths excepted), then serve a bundle or build the
upstream request (directives, header rules, forwarding headers, identity) and hand it to a L{ProxyCall}.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..auth import (
    ANONYMOUS,
    Decision,
    Identity,
    addIdentityHeaders,
    stripIdentityHeaders,
    stripImpersonationHeaders,
)
from ..bundles import JS_CONTENT_TYPE, BundleContent, bundleResponse, contentTypeFor
from ..directives import RequestView, applyHeaderRules, applyRequestDirectives
from ..http.headers import Headers
from ..http.server import Exchange
from ..http.upstream import UpstreamPool
from ..model.types import APIService, Endpoint, EndpointSource, JSBundle, ReverseProxy, UpstreamTimeouts
from ..paths import BadPath, RequestPath, parseTarget
from ..routing import Route
from .forward import HOP_BY_HOP, ProxyCall, Timeouts, UpstreamRequest, connectionNamed

__all__ = ["Gateway", "ServedState"]

log = Logger()

_RETRY_AFTER = (b"Retry-After", b"5")

_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"
_FORWARDING = frozenset([_XFF, _XFP, _XFH, b"host"])

# The Host header for each upstream, computed once (IDNA encoding is not free); bounded by a reset.
_hostHeaders: dict = {}


def _hostHeader(endpoint: Endpoint) -> bytes:
    value = _hostHeaders.get(endpoint)
    if value is None:
        if len(_hostHeaders) > 50_000:
            _hostHeaders.clear()
        value = _hostHeaders[endpoint] = endpoint.hostport.encode("idna")
    return value


class ServedState:
    """
    What one generation serves: the route table and the bundle bytes resolved for it.  Replaced as a whole, by
    one assignment, so a request never sees a table from one generation and bundles from another.
    """

    __slots__ = ("table", "bundles", "generation", "ready")

    def __init__(self, table, bundles, generation: int, ready: bool) -> None:
        self.table = table
        # (bundle name, link) -> BundleContent, or an error message when its reference does not resolve.
        self.bundles = bundles
        self.generation = generation
        self.ready = ready


class Gateway:
    """
    The L{ksproxy.http.server.IRequestHandler} of the proxy listeners.

    @ivar state: the live L{ServedState}; replaced (never mutated) by the reconciler.
    """

    def __init__(
        self,
        clock,
        state: ServedState,
        pool: UpstreamPool,
        *,
        timeouts: Timeouts = Timeouts(),
        health=None,
        gate=None,
        fetchedBundle: Optional[Callable[[Endpoint, bytes], Optional[BundleContent]]] = None,
        defaultUpstream: Optional[Endpoint] = None,
        defaultUpstreamHeaders: Callable[[Headers, Identity], None] | None = None,
        trustedProxies: Sequence[str] = (),
    ) -> None:
        self.clock = clock
        self.state = state
        self.pool = pool
        self.timeouts = timeouts
        self.health = health
        self.gate = gate
        self.fetchedBundle = fetchedBundle
        self.defaultUpstream = defaultUpstream
        self.defaultUpstreamHeaders = defaultUpstreamHeaders
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in trustedProxies]
        # Added to every forwarded request; seeing it come back means a route points at ksproxy itself.
        self.viaToken = b"ksproxy-" + os.urandom(4).hex().encode("ascii")
        self._via = b"1.1 " + self.viaToken
        self._timeouts: Dict[UpstreamTimeouts, Timeouts] = {}

    # -- entry point ----------------------------------------------------------------------------------------

    def handleRequest(self, exchange: Exchange) -> None:
        state = self.state
        exchange.generation = state.generation
        try:
            path = parseTarget(exchange.target)
        except BadPath as e:
            exchange.discardBody()
            exchange.sendError(400, f"bad request path: {e}")
            return
        headers = exchange.headers
        if _needsScreening(headers):
            # SPEC 7.3: before anything else, so no rule or route ever sees a client's claim of identity; the
            # same for impersonation, which only ksproxy may ask of a kube-apiserver.
            stripIdentityHeaders(headers)
            stripImpersonationHeaders(headers)
            _dropUnderscoreNames(headers)
            for via in headers.getAll(b"via"):
                if self.viaToken in via:
                    exchange.discardBody()
                    exchange.sendError(508, "request loop: a route leads back to this ksproxy", reason="LoopDetected")
                    return
        route = state.table.lookup(exchange.method, path)
        if route is not None and route.kind == "bundle":
            self._serveBundle(exchange, state, route)
            return
        gate = self.gate
        if gate is None:
            self._route(exchange, path, route, ANONYMOUS)
            return
        decision = gate.check(exchange.method, path, headers)
        if isinstance(decision, Deferred):
            decision.addCallback(self._decided, exchange, path, route)
            decision.addErrback(self._gateFailed, exchange)
        else:
            self._decided(decision, exchange, path, route)

    def _decided(self, decision: Decision, exchange: Exchange, path: RequestPath, route: Optional[Route]) -> None:
        if exchange.finished:
            return
        if decision.code != 200:
            extra = [(b"WWW-Authenticate", decision.wwwAuthenticate)] if decision.wwwAuthenticate else []
            if decision.code == 503:
                extra.append(_RETRY_AFTER)
            exchange.discardBody()
            exchange.sendError(decision.code, decision.message, extra)
            return
        self._route(exchange, path, route, decision.identity or ANONYMOUS)

    def _gateFailed(self, failure, exchange: Exchange) -> None:
        log.failure("authentication or authorisation failed", failure)
        if not exchange.finished:
            exchange.discardBody()
            exchange.sendError(503, "authentication service unavailable", [_RETRY_AFTER])

    def _route(self, exchange: Exchange, path: RequestPath, route: Optional[Route], identity: Identity) -> None:
        if route is None:
            if self.defaultUpstream is not None and _isKubeAPIPath(path):
                self._forwardDefault(exchange, path, identity)
                return
            exchange.discardBody()
            if not self.state.ready:
                # Starting: the table may not hold this route yet; "not found" would be a lie.
                exchange.sendError(503, "ksproxy is starting: routes are not loaded yet", [_RETRY_AFTER])
                return
            exchange.sendError(404, f"no route for {path.rawPath.decode('latin-1')}")
            return
        exchange.route = route.label
        if not route.servable:
            exchange.discardBody()
            exchange.sendError(503, f"{route.resource.kind} {route.name} is not available: {route.reason}", [_RETRY_AFTER])
            return
        resource = route.resource
        if isinstance(resource, ReverseProxy):
            self._forwardReverseProxy(exchange, path, resource, identity)
        elif isinstance(resource, APIService):
            self._forwardAPIService(exchange, path, resource, identity)
        else:  # pragma: no cover - the table only holds the three kinds
            exchange.discardBody()
            exchange.sendError(500, f"unexpected route kind {route.kind}")

    # -- bundles --------------------------------------------------------------------------------------------

    def _serveBundle(self, exchange: Exchange, state: ServedState, route: Route) -> None:
        exchange.route = route.label
        exchange.discardBody()
        if not route.servable:
            exchange.sendError(503, f"JSBundle {route.name} is not available: {route.reason}", [_RETRY_AFTER])
            return
        bundle: JSBundle = route.resource  # type: ignore[assignment]
        # Everything below comes from the route's own bundle (the conflict winner), never from whatever
        # else claims the same link: its resolved bytes by (name, link), its source, its content type.
        asset = route.asset
        link = asset.link if asset is not None else bundle.link
        content = state.bundles.get((bundle.meta.name, link))
        if content is None and self.fetchedBundle is not None:
            source = asset.source if asset is not None else bundle.source
            if isinstance(source, EndpointSource):
                contentType = (
                    contentTypeFor(asset.link, asset.mimeType) if asset is not None else JS_CONTENT_TYPE
                )
                content = self.fetchedBundle(source.endpoint, contentType)
                if content is None:
                    exchange.sendError(503, f"JSBundle {route.name}: content not fetched yet", [_RETRY_AFTER])
                    return
        if content is None or isinstance(content, str):
            exchange.sendError(503, f"JSBundle {route.name}: {content or 'content unavailable'}", [_RETRY_AFTER])
            return
        code, headers, body = bundleResponse(content, exchange.method, exchange.headers, main=asset is None)
        if code == 405:
            exchange.sendError(405, f"method {exchange.method.decode('latin-1')} is not allowed on a bundle", headers)
            return
        length = None
        framed = []
        for name, value in headers:
            if name == b"Content-Length":
                length = int(value)
            else:
                framed.append((name, value))
        exchange.cork()
        exchange.writeHead(code, framed, length=length, noBody=code == 304)
        exchange.write(body)
        exchange.finish()

    # -- forwarding -----------------------------------------------------------------------------------------

    def _timeoutsFor(self, overrides: Optional[UpstreamTimeouts]) -> Timeouts:
        """The gateway's timeouts with a resource's per-upstream overrides (computed once per distinct value)."""
        if overrides is None:
            return self.timeouts
        merged = self._timeouts.get(overrides)
        if merged is None:
            changes = {k: v for k, v in attrs.asdict(overrides).items() if v is not None}
            merged = self._timeouts[overrides] = attrs.evolve(self.timeouts, **changes)
        return merged

    def _upstreamDown(self, exchange: Exchange, endpoint: Endpoint) -> bool:
        health = self.health
        if health is not None and health.isDown(endpoint.key):
            exchange.discardBody()
            exchange.sendError(503, f"upstream {endpoint.origin} is down (failing health checks)", [_RETRY_AFTER])
            return True
        return False

    def _forwardingHeaders(self, exchange: Exchange, endpoint: Endpoint) -> Tuple[Headers, Optional[bytes], bytes]:
        """Hop-by-hop removal, Host, X-Forwarded-*; returns the headers, the Upgrade value, the client's Host."""
        # One pass to learn, one to rewrite: the result is what stripping hop-by-hop headers, adding the Upgrade
        # pair and then setting X-Forwarded-For/-Proto/-Host and Host one by one would give (each set replaces
        # the first occurrence in place, or appends), without a scan per step.
        headers = exchange.headers
        items = headers.items
        wantUpgrade = exchange.upgrade
        upgrade = None
        clientHost = None
        named = None
        for item in items:
            lname = item[0]
            if lname == b"host":
                if clientHost is None:
                    clientHost = item[2]
            elif lname == b"connection":
                named = connectionNamed(headers)
            elif lname == b"upgrade" and wantUpgrade and upgrade is None:
                upgrade = item[2]
        clientHost = clientHost or b""
        drop = HOP_BY_HOP | named if named else HOP_BY_HOP
        trusted = self._isTrusted(exchange.clientAddress)
        client = exchange.clientAddress.encode("latin-1")
        seenXff = seenXfp = seenXfh = seenHost = False
        out = []
        for item in items:
            lname = item[0]
            if lname in drop:
                continue
            if lname in _FORWARDING:
                if lname == _XFF:
                    if seenXff:
                        continue
                    seenXff = True
                    item = [_XFF, b"X-Forwarded-For", item[2] + b", " + client if item[2] else client]
                elif lname == _XFP:
                    if not trusted:
                        if seenXfp:
                            continue
                        item = [_XFP, b"X-Forwarded-Proto", b"https" if exchange.secure else b"http"]
                    seenXfp = True
                elif lname == _XFH:
                    if not trusted and clientHost:
                        if seenXfh:
                            continue
                        item = [_XFH, b"X-Forwarded-Host", clientHost]
                    seenXfh = True
                else:
                    if seenHost:
                        continue
                    seenHost = True
                    item = [b"host", b"Host", _hostHeader(endpoint)]
            out.append(item)
        if upgrade is not None:
            out.append([b"connection", b"Connection", b"Upgrade"])
            out.append([b"upgrade", b"Upgrade", upgrade])
        if not seenXff:
            out.append([_XFF, b"X-Forwarded-For", client])
        if not seenXfp:
            out.append([_XFP, b"X-Forwarded-Proto", b"https" if exchange.secure else b"http"])
        if not seenXfh and clientHost:
            out.append([_XFH, b"X-Forwarded-Host", clientHost])
        if not seenHost:
            out.append([b"host", b"Host", _hostHeader(endpoint)])
        headers.items = out
        return headers, upgrade, clientHost

    def _isTrusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def _forwardReverseProxy(self, exchange: Exchange, path: RequestPath, rp: ReverseProxy, identity: Identity) -> None:
        endpoint = rp.upstream
        exchange.upstreamName = endpoint.origin
        if self._upstreamDown(exchange, endpoint):
            return
        headers, upgrade, clientHost = self._forwardingHeaders(exchange, endpoint)
        directives = rp.directives
        method, rawPath, query = exchange.method, path.rawPath, path.query
        rewriteResponse = None
        if directives.active:
            view = RequestView(method=method, host=clientHost, rawPath=rawPath, query=query, headers=headers)
            try:
                applyRequestDirectives(directives, view)
            except BadPath as e:
                # The client's bytes would have built a ".." into the rewritten path (directives module doc).
                exchange.discardBody()
                exchange.sendError(400, f"bad request path: {e}")
                return
            method, rawPath, query = view.method, view.rawPath, view.query
            if directives.headerDown:
                rules = directives.headerDown

                def rewriteResponse(h: Headers) -> None:
                    applyHeaderRules(rules, h, view)

        if directives.authProxy:
            if directives.headerUp:
                # The identity goes over any header rule (SPEC 4.2, docs/resources.md): a rule must not set
                # X-Remote-User or add a group next to the one ksproxy authenticated.
                stripIdentityHeaders(headers)
            addIdentityHeaders(headers, identity)
        if rp.upstreamPathPrefix and endpoint.path not in ("", "/"):
            rawPath = endpoint.path.rstrip("/").encode("utf-8") + rawPath
        target = rawPath if query is None else rawPath + b"?" + query
        headers.add(b"Via", self._via)
        request = UpstreamRequest(endpoint, method, target, headers, rewriteResponse, upgrade)
        ProxyCall(exchange, request, self.pool, self.clock, self._timeoutsFor(rp.timeouts), self.health).start()

    def _forwardAPIService(self, exchange: Exchange, path: RequestPath, api: APIService, identity: Identity) -> None:
        endpoint = api.endpoint
        exchange.upstreamName = endpoint.origin
        if self._upstreamDown(exchange, endpoint):
            return
        headers, upgrade, _ = self._forwardingHeaders(exchange, endpoint)
        addIdentityHeaders(headers, identity)
        headers.add(b"Via", self._via)
        request = UpstreamRequest(endpoint, exchange.method, path.target, headers, None, upgrade)
        ProxyCall(exchange, request, self.pool, self.clock, self._timeoutsFor(api.timeouts), self.health).start()

    def _forwardDefault(self, exchange: Exchange, path: RequestPath, identity: Identity) -> None:
        endpoint = self.defaultUpstream
        assert endpoint is not None
        exchange.route = "default"
        exchange.upstreamName = endpoint.origin
        if self._upstreamDown(exchange, endpoint):
            return
        headers, upgrade, _ = self._forwardingHeaders(exchange, endpoint)
        if self.defaultUpstreamHeaders is not None:
            self.defaultUpstreamHeaders(headers, identity)
        headers.add(b"Via", self._via)
        request = UpstreamRequest(endpoint, exchange.method, path.target, headers, None, upgrade)
        ProxyCall(exchange, request, self.pool, self.clock, self.timeouts, self.health).start()


# Header names that handleRequest must look at more closely: identity and impersonation claims, names with "_",
# and Via (loop detection).  The usual request has none, and is screened in one pass.
_SCREENED_PREFIXES = (b"x-remote-", b"impersonate-", b"via")


def _needsScreening(headers: Headers) -> bool:
    for item in headers.items:
        name = item[0]
        if name.startswith(_SCREENED_PREFIXES) or b"_" in name:
            return True
    return False


def _dropUnderscoreNames(headers: Headers) -> None:
    """
    Headers whose names hold "_" are dropped, as nginx does by default: CGI-style upstreams read
    C{X_Remote_User} and C{X-Remote-User} as the same variable, which would smuggle identity past SPEC 7.3.
    """
    items = headers.items
    for item in items:
        if b"_" in item[0]:
            headers.items = [i for i in items if b"_" not in i[0]]
            return


def _isKubeAPIPath(path: RequestPath) -> bool:
    first = path.segments[0] if path.segments else ""
    return first in ("api", "apis")
