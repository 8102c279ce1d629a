"""
The operational listener (SPEC 10): /healthz, /readyz, /metrics, /debug/routes, /debug/explain.

Not on the hot path, so plain twisted.web resources.  It listens on 127.0.0.1 by default: /debug shows every
route and upstream.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List

from twisted.web import resource, server

from .http.upstream import UpstreamPool
from .paths import BadPath, parseTarget
from .proxy.dispatch import Gateway
from .reconcile import BuildReport, Reconciler

__all__ = ["adminSite", "describeReport"]


def _json(request: server.Request, data: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8") + b"\n"


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, render: Callable[[server.Request], bytes]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: server.Request) -> bytes:
        return self._render(request)

    render_HEAD = render_GET


def describeReport(report: BuildReport, health=None) -> Dict[str, Any]:
    """The state of every object, as /debug/routes and `ksproxy routes` show it."""
    snap = report.snapshot
    objects: List[Dict[str, Any]] = []
    conflicts = {(c.kind, c.name): c for c in report.compiled.conflicts}
    for (kind, name), record in sorted(snap.records.items()):
        entry: Dict[str, Any] = {"kind": kind, "name": name, "origin": record.origin}
        if record.rejection is not None:
            entry["rejected"] = str(record.rejection)
            entry["servingLastGood"] = record.current is not None
        if (kind, name) in conflicts:
            entry["conflict"] = conflicts[(kind, name)].message
        reason = report.unservable.get((kind, name))
        entry["servable"] = record.current is not None and reason is None
        if reason:
            entry["reason"] = reason
        if record.warnings:
            entry["warnings"] = list(record.warnings)
        upstream = _upstreamOf(record.current)
        if upstream is not None:
            entry["upstream"] = upstream.origin
            if health is not None:
                entry["upstreamHealthy"] = not health.isDown(upstream.key)
                entry["upstreamHealth"] = _healthWord(health, upstream.key)
        objects.append(entry)
    return {
        "generation": report.generation,
        "builtSeconds": round(report.seconds, 6),
        "objects": objects,
        "routes": report.compiled.table.describe(),
        "conflicts": [c.message for c in report.compiled.conflicts],
        "duplicates": list(snap.duplicates),
        "skipped": list(snap.skipped),
        "sourceErrors": [e.message for e in snap.sourceErrors],  # each starts with its path already
    }


def _healthWord(health, key: tuple) -> str:  # type: ignore[no-untyped-def]
    """"up", "down", "unknown" (checker running, no result yet) or "unchecked" (no healthCheck)."""
    if health.isDown(key):
        return "down"
    state = health.upstreamHealthy(key)
    if state is None:
        return "unknown" if key in getattr(health, "_byUpstream", {}) else "unchecked"
    return "up"


def _upstreamOf(resource_):  # type: ignore[no-untyped-def]
    if resource_ is None:
        return None
    return getattr(resource_, "upstream", None) or getattr(resource_, "endpoint", None)


def adminSite(
    reconciler: Reconciler,
    gateway: Gateway,
    pool: UpstreamPool,
    metrics=None,
    draining: Callable[[], bool] = lambda: False,
) -> server.Site:
    """
    The admin site.  C{metrics} is a L{ksproxy.metrics.Metrics} (or any resource) served at /metrics; without
    it /metrics answers 404.  C{draining} says whether the proxy listeners are draining (then /readyz is 503,
    so a load balancer stops sending new work).
    """
    root = resource.Resource()

    def healthz(request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok\n"

    def readyz(request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        if draining():
            request.setResponseCode(503)
            return b"not ready: shutting down, draining in-flight requests\n"
        if reconciler.ready and gateway.state.ready:
            return b"ok\n"
        request.setResponseCode(503)
        return b"not ready: the source has not delivered its first complete snapshot\n"

    def routes(request: server.Request) -> bytes:
        report = reconciler.report
        if report is None:
            return _json(request, {"generation": 0, "objects": [], "routes": []})
        data = describeReport(report, gateway.health)
        data["ready"] = reconciler.ready
        data["upstreamConnections"] = {"open": pool.active, "idle": pool.idleCount()}
        health = gateway.health
        data["healthCheckers"] = health.describe() if health is not None else []
        return _json(request, data)

    def explain(request: server.Request) -> bytes:
        args = request.args
        method = (args.get(b"method") or [b"GET"])[0].upper()
        target = (args.get(b"path") or [b"/"])[0]
        try:
            path = parseTarget(target)
        except BadPath as e:
            return _json(request, {"error": f"bad path: {e}"}, 400)
        return _json(request, gateway.state.table.explain(method, path))

    root.putChild(b"healthz", _Leaf(healthz))
    root.putChild(b"readyz", _Leaf(readyz))
    debug = resource.Resource()
    debug.putChild(b"routes", _Leaf(routes))
    debug.putChild(b"explain", _Leaf(explain))
    root.putChild(b"debug", debug)
    if metrics is not None:
        root.putChild(b"metrics", metrics.resource() if hasattr(metrics, "resource") else metrics)
    site = server.Site(root)
    site.displayTracebacks = False
    return site
