"""
Compile resources into a L{RouteTable}: pure, deterministic, done once per change.

Precedence (SPEC 2) among ReverseProxy matchers, and among nonResourceURLs: exact path over glob; longer
literal prefix; specific method over C{*}; older C{metadata.creationTimestamp} (missing sorts last); name.

Identical matchers (the same pattern and method; the same bundle link; the same APIService group/version or
nonResourceURL) are conflicts: one object keeps the matcher, every other one is reported in a L{Conflict}
and is not served for it (its other matchers still are).  The keeper is chosen by: servable first (a
disabled or broken object must not block a working one: our choice, the SPEC is silent), then the older
creationTimestamp, then the name.

Bundle links are decoded text like patterns (a query part is ignored), compared with the request's decoded
segments.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Tuple

import attrs

from ksproxy.model.types import APIService, JSBundle, Resource, ReverseProxy
from ksproxy.paths import compilePattern
from ksproxy.routing.table import (
    KIND_APISERVICE,
    KIND_BUNDLE,
    KIND_PROXY,
    Conflict,
    Route,
    RouteTable,
    _Entry,
    _Trie,
)

__all__ = ["CompileResult", "compileTable"]

_MISSING_TIMESTAMP = "~"  # sorts after every RFC 3339 timestamp


@attrs.frozen
class CompileResult:
    table: RouteTable
    conflicts: Tuple[Conflict, ...]


def _always(resource: Resource) -> Tuple[bool, str]:
    return (True, "")


def _linkSegments(link: str) -> Tuple[str, ...]:
    path = link.strip().partition("?")[0]
    if not path.startswith("/"):
        path = "/" + path
    return tuple(path[1:].split("/"))


def compileTable(
    resources: Iterable[Resource],
    *,
    generation: int,
    isServable: Callable[[Resource], Tuple[bool, str]] = _always,
) -> CompileResult:
    """
    Build the route table for C{resources}.  C{isServable} is asked once per resource (SPEC 8: accepted,
    references resolved, state not Disabled...); an unservable resource keeps its routes, which answer 503.
    A matcher that does not compile (the parser should have rejected it) is reported as a conflict with
    C{winner} "" and skipped.
    """
    # Conflict order: servable first, then older, then name; the first to claim a matcher keeps it.
    ranked: List[Tuple[Tuple[int, str, str, int], Resource, bool, str]] = []
    for seq, resource in enumerate(resources):
        if not isinstance(resource, (JSBundle, ReverseProxy, APIService)):
            raise TypeError(f"not a resource: {resource!r}")
        servable, reason = isServable(resource)
        ts = resource.meta.creationTimestamp or _MISSING_TIMESTAMP
        ranked.append(((0 if servable else 1, ts, resource.meta.name, seq), resource, servable, reason))
    ranked.sort(key=lambda item: item[0])

    conflicts: List[Conflict] = []
    bundles: Dict[Tuple[str, ...], Route] = {}
    proxies = _Trie()
    kapis: Dict[Tuple[str, str], Route] = {}
    apis: Dict[Tuple[str, str], Route] = {}
    nonResource = _Trie()
    order = 0

    def addToTrie(
        trie: _Trie, resource: Resource, kind: str, pattern: str, method: str, servable: bool, reason: str
    ) -> None:
        nonlocal order
        name = resource.meta.name
        try:
            compiled = compilePattern(pattern)
        except ValueError as e:
            conflicts.append(Conflict(resource.kind, name, "", f"{pattern} (invalid: {e})", method))
            return
        slot = trie.slot(compiled)
        mkey = method.encode("ascii")
        existing = slot.get(mkey)
        if existing is not None:
            if existing.route.resource is not resource:
                conflicts.append(Conflict(resource.kind, name, existing.route.name, compiled.source, method))
            return
        ts = resource.meta.creationTimestamp
        order += 1
        route = Route(kind, name, resource, compiled.source, servable, reason, method)
        sortKey = (
            0 if compiled.isExact else 1,
            -compiled.literalLength,
            1 if method == "*" else 0,
            ts or _MISSING_TIMESTAMP,
            name,
            order,
        )
        slot[mkey] = _Entry(sortKey, route, compiled, ts)

    for _, resource, servable, reason in ranked:
        name = resource.meta.name
        if isinstance(resource, JSBundle):
            links = [(resource.link, None)] + [(a.link, a) for a in resource.assets]
            for link, asset in links:
                key = _linkSegments(link)
                existing = bundles.get(key)
                if existing is not None:
                    if existing.resource is not resource:
                        conflicts.append(Conflict(resource.kind, name, existing.name, link.strip()))
                    continue
                bundles[key] = Route(KIND_BUNDLE, name, resource, link.strip(), servable, reason, "*", asset)
        elif isinstance(resource, ReverseProxy):
            for m in resource.matchers:
                method = m.method.upper() if m.method else "*"
                addToTrie(proxies, resource, KIND_PROXY, m.path, method, servable, reason)
        else:
            gv = (resource.group, resource.version)
            existing = kapis.get(gv)
            if existing is not None:
                conflicts.append(Conflict(resource.kind, name, existing.name, f"/kapis/{gv[0]}/{gv[1]}"))
            else:
                kapis[gv] = Route(
                    KIND_APISERVICE, name, resource, f"/kapis/{gv[0]}/{gv[1]}", servable, reason
                )
                apis[gv] = Route(KIND_APISERVICE, name, resource, f"/apis/{gv[0]}/{gv[1]}", servable, reason)
            for url in resource.nonResourceURLs:
                addToTrie(nonResource, resource, KIND_APISERVICE, url, "*", servable, reason)

    result = tuple(conflicts)
    table = RouteTable(generation, bundles, proxies, kapis, apis, nonResource, result)
    return CompileResult(table, result)
