"""
The compiled route table: immutable once built, looked up once per request.

Lookup cost does not grow with the number of rules.  JSBundle links and APIService group/versions are dict
lookups; ReverseProxy matchers and APIService nonResourceURLs live in a segment trie (L{_Trie}) that is walked
along the request's segments, collecting only the rules that match on the way; the winner is the candidate
with the smallest sort key, computed at compile time.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attrs

from ksproxy.model.types import Asset, Resource
from ksproxy.paths import PathPattern, RequestPath, globMatch

__all__ = ["Route", "Conflict", "RouteTable"]

KIND_BUNDLE = "bundle"
KIND_PROXY = "proxy"
KIND_APISERVICE = "apiservice"

STAGE_BUNDLE = "jsbundle"
STAGE_PROXY = "reverseproxy"
STAGE_GROUPVERSION = "apiservice"
STAGE_NONRESOURCE = "nonresourceurl"
_STAGES = (STAGE_BUNDLE, STAGE_PROXY, STAGE_GROUPVERSION, STAGE_NONRESOURCE)

_ANY = b"*"
# Shared by every node that has no children (or entries) of a kind: never written to; a node gets a dict of
# its own when it first needs one.  Most nodes of a large table use one or two of their containers.
_EMPTY: Dict[Any, Any] = {}


def _lengths(heads: Dict[str, Any]) -> Tuple[int, ...]:
    if len(heads) == 1:
        for head in heads:
            return (len(head),)
    return tuple(sorted({len(h) for h in heads}))


@attrs.frozen
class Route:
    """
    What a request is served by.

    @ivar kind: "bundle", "proxy" or "apiservice".
    @ivar matcher: what matched, for logs: the pattern, the link, C{/kapis/<g>/<v>} or C{/apis/<g>/<v>}.
    @ivar servable: False means answer 503 (SPEC 8) without falling through to later stages.
    @ivar method: the matcher's method ("*" for any; always "*" for bundles and APIServices).
    @ivar asset: for a bundle route, the asset served at this link (None for the bundle's main link).
    """

    kind: str
    name: str
    resource: Resource = attrs.field(repr=False)
    matcher: str
    servable: bool
    reason: str = ""
    method: str = "*"
    asset: Optional[Asset] = attrs.field(default=None, repr=False)
    # "<kind>/<name>", what the access log calls the route: built once, not per request.
    label: str = attrs.field(init=False, repr=False, eq=False)

    @label.default
    def _label(self) -> str:
        return f"{self.kind}/{self.name}"

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "kind": self.kind,
            "resourceKind": self.resource.kind,
            "name": self.name,
            "matcher": self.matcher,
            "method": self.method,
            "servable": self.servable,
        }
        if self.reason:
            d["reason"] = self.reason
        endpoint = getattr(self.resource, "upstream", None) or getattr(self.resource, "endpoint", None)
        if endpoint is not None:
            d["upstream"] = endpoint.origin
        if self.asset is not None:
            d["asset"] = True
        return d


@attrs.frozen
class Conflict:
    """Two objects claimed an identical matcher: C{name} lost to C{winner} and is not served for it."""

    kind: str  # the resource kind: "ReverseProxy", "JSBundle" or "APIService"
    name: str
    winner: str
    matcher: str
    method: str = "*"

    @property
    def message(self) -> str:
        what = self.matcher if self.method == "*" else f"{self.method} {self.matcher}"
        return (
            f"{self.kind}/{self.name}: matcher {what} is also claimed by {self.kind}/{self.winner}, which takes "
            f"precedence; {self.name} is not served for it"
        )


@attrs.frozen
class _Entry:
    """A route in a trie with its precedence key (smaller wins) and what explain() shows of the key."""

    sortKey: Tuple[Any, ...]
    route: Route
    pattern: PathPattern = attrs.field(repr=False)
    creationTimestamp: str = ""


class _Node:
    """
    One trie node: the rules whose pattern segments so far led here.

    @ivar literal: children by exact segment text.
    @ivar globs: children whose segment is a glob, indexed by the literal head in front of its first "*";
        C{globLengths} are the distinct head lengths, so a lookup tries only those prefixes of the segment.
    @ivar terminal: method -> entry, for patterns (without a trailing "*") that end here.
    @ivar stems: literal partial last segment of a trailing-"*" pattern -> (method -> entry), with
        C{stemLengths}; C{globStems} the same for partial segments that contain a "*".
    """

    __slots__ = (
        "literal",
        "globs",
        "globLengths",
        "terminal",
        "stems",
        "stemLengths",
        "globStems",
        "globStemLengths",
    )

    def __init__(self) -> None:
        self.literal: Dict[str, _Node] = _EMPTY
        self.globs: Dict[str, List[Tuple[Tuple[str, ...], _Node]]] = _EMPTY
        self.globLengths: Tuple[int, ...] = ()
        self.terminal: Dict[bytes, _Entry] = _EMPTY
        self.stems: Dict[str, Dict[bytes, _Entry]] = _EMPTY
        self.stemLengths: Tuple[int, ...] = ()
        self.globStems: Dict[str, List[Tuple[Tuple[str, ...], Dict[bytes, _Entry]]]] = _EMPTY
        self.globStemLengths: Tuple[int, ...] = ()

    def finish(self) -> None:
        """Work out the head lengths of this node and every node under it (iteratively: tries can be deep)."""
        stack = [self]
        while stack:
            node = stack.pop()
            if node.stems:
                node.stemLengths = _lengths(node.stems)
            if node.globStems:
                node.globStemLengths = _lengths(node.globStems)
            if node.literal:
                stack.extend(node.literal.values())
            if node.globs:
                node.globLengths = _lengths(node.globs)
                for items in node.globs.values():
                    stack.extend(child for _, child in items)


def _pick(entries: Dict[bytes, _Entry], method: bytes, out: List[_Entry]) -> None:
    e = entries.get(method)
    if e is not None:
        out.append(e)
    if method != _ANY:
        e = entries.get(_ANY)
        if e is not None:
            out.append(e)


class _Trie:
    """Patterns by segment; see L{_Node}."""

    def __init__(self) -> None:
        self.root = _Node()

    def slot(self, pattern: PathPattern) -> Dict[bytes, _Entry]:
        """The method -> entry dict for C{pattern}, created if needed (identical patterns share it)."""
        node = self.root
        ms = pattern.matchers
        last = len(ms) - 1 if pattern.isPrefix else len(ms)
        for m in ms[:last]:
            if m.__class__ is str:
                literal = node.literal
                child = literal.get(m)  # type: ignore[arg-type]
                if child is None:
                    if literal is _EMPTY:
                        literal = node.literal = {}
                    child = literal[m] = _Node()  # type: ignore[index]
            else:
                if node.globs is _EMPTY:
                    node.globs = {}
                items = node.globs.setdefault(m[0], [])
                for pieces, existing in items:
                    if pieces == m:
                        child = existing
                        break
                else:
                    child = _Node()
                    items.append((m, child))  # type: ignore[arg-type]
            node = child
        if not pattern.isPrefix:
            if node.terminal is _EMPTY:
                node.terminal = {}
            return node.terminal
        stem = ms[-1]
        if stem.__class__ is str:
            if node.stems is _EMPTY:
                node.stems = {}
            return node.stems.setdefault(stem, {})  # type: ignore[arg-type]
        pieces = tuple(stem) + ("",)  # "a*b" as a prefix is the glob "a*b*"
        if node.globStems is _EMPTY:
            node.globStems = {}
        items2 = node.globStems.setdefault(pieces[0], [])
        for existing, slot in items2:
            if existing == pieces:
                return slot
        slot = {}
        items2.append((pieces, slot))
        return slot

    def finish(self) -> None:
        self.root.finish()

    def collect(self, segments: Tuple[str, ...], method: bytes, out: List[_Entry]) -> int:
        """Append every entry that matches to C{out}; return the number of nodes visited."""
        n = len(segments)
        visited = 0
        stack = [(self.root, 0)]
        while stack:
            node, i = stack.pop()
            visited += 1
            if i == n:
                if node.terminal:
                    _pick(node.terminal, method, out)
                continue
            seg = segments[i]
            ls = len(seg)
            if node.stemLengths:
                for length in node.stemLengths:
                    if length > ls:
                        break
                    entries = node.stems.get(seg[:length])
                    if entries is not None:
                        _pick(entries, method, out)
            if node.globStemLengths:
                for length in node.globStemLengths:
                    if length > ls:
                        break
                    for pieces, entries in node.globStems.get(seg[:length], ()):
                        if globMatch(pieces, seg):
                            _pick(entries, method, out)
            child = node.literal.get(seg)
            if child is not None:
                stack.append((child, i + 1))
            if node.globLengths:
                for length in node.globLengths:
                    if length > ls:
                        break
                    for pieces, gchild in node.globs.get(seg[:length], ()):
                        if globMatch(pieces, seg):
                            stack.append((gchild, i + 1))
        return visited

    def entries(self) -> List[_Entry]:
        """Every entry, for describe()."""
        out: List[_Entry] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.extend(node.terminal.values())
            for slot in node.stems.values():
                out.extend(slot.values())
            for items in node.globStems.values():
                for _, slot in items:
                    out.extend(slot.values())
            stack.extend(node.literal.values())
            for gitems in node.globs.values():
                stack.extend(child for _, child in gitems)
        out.sort(key=lambda e: e.sortKey)
        return out


_KEY_REASONS = (
    "an exact path beats a glob",
    "a longer literal prefix wins",
    "a specific method beats '*'",
    "the older creationTimestamp wins",
    "names are compared last",
)


class RouteTable:
    """
    An immutable, compiled route table (build it with L{ksproxy.routing.compileTable}).  Order per request
    (SPEC 2): JSBundle links, ReverseProxy matchers, APIService group/version, APIService nonResourceURLs.
    """

    __slots__ = ("generation", "conflicts", "_bundles", "_proxies", "_kapis", "_apis", "_nonResource")

    def __init__(
        self,
        generation: int,
        bundles: Dict[Tuple[str, ...], Route],
        proxies: _Trie,
        kapis: Dict[Tuple[str, str], Route],
        apis: Dict[Tuple[str, str], Route],
        nonResource: _Trie,
        conflicts: Tuple[Conflict, ...] = (),
    ) -> None:
        self.generation = generation
        self.conflicts = conflicts
        self._bundles = bundles
        self._proxies = proxies
        self._kapis = kapis
        self._apis = apis
        self._nonResource = nonResource
        proxies.finish()
        nonResource.finish()

    def __repr__(self) -> str:
        return f"<RouteTable generation={self.generation} conflicts={len(self.conflicts)}>"

    def _groupVersion(self, segments: Tuple[str, ...]) -> Optional[Route]:
        if len(segments) >= 3:
            first = segments[0]
            if first == "kapis":
                return self._kapis.get((segments[1], segments[2]))
            if first == "apis":
                return self._apis.get((segments[1], segments[2]))
        return None

    def lookup(self, method: bytes, path: RequestPath) -> Optional[Route]:
        """The route that serves C{method} on C{path}, or None (then: default upstream or 404)."""
        segments = path.segments
        route = self._bundles.get(segments)
        if route is not None:
            return route
        found: List[_Entry] = []
        self._proxies.collect(segments, method, found)
        if found:
            return min(found, key=_sortKey).route
        route = self._groupVersion(segments)
        if route is not None:
            return route
        self._nonResource.collect(segments, method, found)
        if found:
            return min(found, key=_sortKey).route
        return None

    def explain(self, method: bytes, path: RequestPath) -> Dict[str, Any]:
        """Which rule wins for this request and why, with every candidate of every stage (for /debug)."""
        segments = path.segments
        candidates: List[Dict[str, Any]] = []
        visited = 0
        winner: Optional[Dict[str, Any]] = None
        why = "no route matches"

        bundle = self._bundles.get(segments)
        if bundle is not None:
            candidates.append(dict(bundle.describe(), stage=STAGE_BUNDLE))

        def fromTrie(trie: _Trie, stage: str) -> List[_Entry]:
            nonlocal visited
            found: List[_Entry] = []
            visited += trie.collect(segments, method, found)
            found.sort(key=_sortKey)
            for e in found:
                candidates.append(dict(e.route.describe(), stage=stage, rank=_rank(e)))
            return found

        proxies = fromTrie(self._proxies, STAGE_PROXY)
        gv = self._groupVersion(segments)
        if gv is not None:
            candidates.append(dict(gv.describe(), stage=STAGE_GROUPVERSION))
        nonResource = fromTrie(self._nonResource, STAGE_NONRESOURCE)

        if candidates:
            winner = candidates[0]
            stage = winner["stage"]
            same = [c for c in candidates if c["stage"] == stage]
            if len(same) > 1:
                ranked = proxies if stage == STAGE_PROXY else nonResource
                why = _whyFirst(ranked[0], ranked[1])
            elif len(candidates) > 1:
                why = f"the {stage} stage comes first (order: {', '.join(_STAGES)})"
            else:
                why = "the only candidate"
            if not winner["servable"]:
                why += "; it is not servable, so the answer is 503 (no fall-through)"
        return {
            "generation": self.generation,
            "method": method.decode("latin-1"),
            "path": path.rawPath.decode("latin-1"),
            "segments": list(segments),
            "winner": winner,
            "why": why,
            "candidates": candidates,
            "visited": visited,
        }

    def describe(self) -> List[Dict[str, Any]]:
        """The whole table in lookup order, as JSON-able data."""
        out: List[Dict[str, Any]] = []
        for _, route in sorted(self._bundles.items(), key=lambda kv: kv[1].matcher):
            out.append(dict(route.describe(), stage=STAGE_BUNDLE))
        for e in self._proxies.entries():
            out.append(dict(e.route.describe(), stage=STAGE_PROXY, rank=_rank(e)))
        gvs = sorted(list(self._kapis.values()) + list(self._apis.values()), key=lambda r: r.matcher)
        for route in gvs:
            out.append(dict(route.describe(), stage=STAGE_GROUPVERSION))
        for e in self._nonResource.entries():
            out.append(dict(e.route.describe(), stage=STAGE_NONRESOURCE, rank=_rank(e)))
        return out


def _sortKey(e: _Entry) -> Tuple[Any, ...]:
    return e.sortKey


def _rank(e: _Entry) -> Dict[str, Any]:
    return {
        "exact": e.pattern.isExact,
        "literalLength": e.pattern.literalLength,
        "method": e.route.method,
        "creationTimestamp": e.creationTimestamp,
        "name": e.route.name,
    }


def _whyFirst(a: _Entry, b: _Entry) -> str:
    for i, reason in enumerate(_KEY_REASONS):
        if a.sortKey[i] != b.sortKey[i]:
            return f"{reason} (over {b.route.resource.kind}/{b.route.name} {b.route.matcher})"
    return f"declared first (over {b.route.resource.kind}/{b.route.name} {b.route.matcher})"
