"""
Tests for the direct reading of common-shape objects in L{ksproxy.model.parse} (issue 7: a 10,000-object swap
in under a second) and for L{ksproxy.sources.inventory.contentKey}: every input gives exactly what the full
parse (views, memos) gives, messages and rejections included.
"""

from __future__ import annotations

import copy
import datetime
import random
from types import MappingProxyType
from typing import Any, Dict, List

import pytest

from ksproxy.model import parse
from ksproxy.model._fields import Cache
from ksproxy.model.parse import ParseResult, parseResource
from ksproxy.sources.inventory import contentKey

API = "extensions.kubesphere.io/v1alpha1"


def proxy(i: int = 1) -> Dict[str, Any]:
    """The shape of the bench's objects (and of most hand-written ReverseProxy manifests)."""
    return {
        "apiVersion": API,
        "kind": "ReverseProxy",
        "metadata": {"name": f"r-{i}"},
        "spec": {
            "matcher": {"path": f"/r/{i}/*", "method": "*"},
            "upstream": {"url": "http://127.0.0.1:9"},
            "directives": {"stripPathPrefix": f"/r/{i}", "headerDown": [f"X-Gen {i}"]},
        },
    }


def clearCaches() -> None:
    for memo in (parse._ENDPOINTS, parse._METADATA, parse._MATCHERS, parse._DIRECTIVES, parse._PLAIN_UPSTREAMS):
        memo.clear()
    parse._PLAIN_MATCHERS.clear()
    parse._PLAIN_METADATA.clear()
    parse._RULES.clear()


def fullParse(raw: Any, monkeypatch: pytest.MonkeyPatch) -> ParseResult:
    """The parse with every direct reading turned off and cold memos."""
    with monkeypatch.context() as m:
        m.setattr(parse, "_plainReverseProxy", lambda *a: None)
        m.setattr(parse, "_plainMetadata", lambda *a: None)
        m.setattr(parse, "_plainMatchers", lambda *a: None)
        m.setattr(parse, "_plainDirectives", lambda *a: None)
        clearCaches()
        return parseResource(copy.deepcopy(raw))


def assertSame(have: ParseResult, want: ParseResult) -> None:
    assert have == want
    assert (have.warnings, have.notes, have.skipped) == (want.warnings, want.notes, want.skipped)
    assert str(have.rejection) == str(want.rejection)


def variant(**changes: Any) -> Dict[str, Any]:
    """proxy(1) with C{changes} applied: dotted paths to values (C{...} deletes)."""
    raw = proxy(1)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = raw
        for key in parents:
            target = target.setdefault(key, {})
        if value is ...:
            target.pop(last, None)
        else:
            target[last] = value
    return raw


CASES: List[Dict[str, Any]] = [
    proxy(1),
    variant(metadata__namespace=""),
    variant(metadata__namespace="ns"),
    variant(metadata__name="Bad_Name"),
    variant(metadata__name="a" * 64 + ".b"),
    variant(metadata__labels={"a": "b"}),
    variant(metadata__labels={"a": 1}),
    variant(metadata__labels={"kubesphere.io/reverse-proxy-target": "ks-console"}),
    variant(metadata__generation=-1),
    variant(metadata__generation=True),
    variant(metadata__generation=3, metadata__uid="u", metadata__resourceVersion="7"),
    variant(metadata__creationTimestamp=datetime.datetime(2024, 1, 2, 3, 4, 5)),
    variant(metadata__annotations={"x": 1}, metadata__bogus=1),
    variant(spec__matcher={"path": "/a?b"}),
    variant(spec__matcher={"path": "relative"}),
    variant(spec__matcher={"path": "/a", "method": "g e t"}),
    variant(spec__matcher={"path": "/a", "method": None}),
    variant(spec__matcher={"path": "/a", "method": ""}),
    variant(spec__matcher={"path": "/a", "bogus": 1}),
    variant(spec__matcher=[{"path": "/a"}, {"path": "/a"}]),
    variant(spec__matcher=[{"path": "/a"}, {"path": "/b#"}]),
    variant(spec__matcher=[]),
    variant(spec__directives=None),
    variant(spec__directives={"method": "", "stripPathPrefix": "", "stripPathSuffix": ""}),
    variant(spec__directives={"method": "post", "stripPathSuffix": ".json", "authProxy": True}),
    variant(spec__directives={"stripPathPrefix": "no-slash"}),
    variant(spec__directives={"headerDown": ["bad header rule {"]}),
    variant(spec__directives={"headerUp": ["X-A b", 1]}),
    variant(spec__directives={"rewrite": ["/a/* /b"], "replace": ["a b"], "pathRegexp": ["^/x(.*) /y$1"]}),
    variant(spec__directives={"replace": [], "uriSubstring": ["a b"]}),
    variant(spec__directives={"wrapTransport": True}),
    variant(spec__directives={"authProxy": "yes"}),
    variant(spec__header={"down": ["X-A b"]}),
    variant(spec__rewrite=["/a/* /b"]),
    variant(spec__upstream={"url": "http://h/base?q#f"}),
    variant(spec__upstream={"url": "http://h/base", "prependPath": True}),
    variant(spec__upstream={"url": "http://h", "prependPath": "yes"}),
    variant(spec__upstream={"url": ""}),
    variant(spec__upstream={"url": "ftp://h"}),
    variant(spec__upstream={"url": 1}),
    variant(spec__upstream={"backend": "http://h"}),
    variant(spec__healthCheck={"interval": "1s"}),
    variant(status={"state": "Disabled"}),
    variant(status={"state": "Availble"}, spec__matcher={"path": "/a?b"}),
    variant(status={"enabled": False, "state": "Available"}),
    variant(status="nope"),
    variant(bogus=1),
    variant(kind="Other"),
    variant(spec="nope"),
    variant(metadata="nope"),
]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_sameAsFullParse(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold and warm, each case gives exactly what the full parse gives."""
    raw = CASES[index]
    want = fullParse(raw, monkeypatch)
    clearCaches()
    assertSame(parseResource(copy.deepcopy(raw)), want)
    for other in CASES:
        parseResource(copy.deepcopy(other))
    assertSame(parseResource(copy.deepcopy(raw)), want)


VALUES: List[Any] = [
    None, "", "x", "GET", 0, -1, True, 1.5, [], {}, ["X-A b"], ["-X-*", "+X-B {host}"], [1], "/p/*", "/p q",
    "http://h:8080/p?q", "https://[::1]:8443", {"path": "/x"}, [{"path": "/x", "method": "put"}],
]  # fmt: skip


def test_mutations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random one- and two-field changes of the common shape, in a fixed order (memos warm), match."""
    rnd = random.Random(7)
    where = {
        "metadata": ["name", "namespace", "uid", "generation", "labels", "annotations", "bogus"],
        "spec": ["matcher", "upstream", "directives", "header", "rewrite", "bogus"],
        "upstream": ["url", "prependPath", "backend", "caBundle", "bogus"],
        "directives": ["method", "stripPathPrefix", "stripPathSuffix", "headerUp", "headerDown", "replace",
                       "authProxy", "changeOrigin", "bogus"],
        "matcher": ["path", "method", "bogus"],
    }  # fmt: skip
    cases = []
    for i in range(300):
        raw = proxy(i % 7)
        for _ in range(rnd.choice((1, 2))):
            section = rnd.choice(sorted(where))
            target = raw if section == "metadata" else raw["spec"]
            if section not in ("metadata", "spec"):
                target = target.get(section)
            elif section == "metadata":
                target = raw["metadata"]
            if isinstance(target, dict):
                target[rnd.choice(where[section])] = copy.deepcopy(rnd.choice(VALUES))
        cases.append(raw)
    expected = [fullParse(raw, monkeypatch) for raw in cases]
    clearCaches()
    for _ in range(2):
        for raw, want in zip(cases, expected):
            assertSame(parseResource(copy.deepcopy(raw)), want)


def test_benchShapeIsReadDirectly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common shape never builds a view (what made the 10,000-object parse slow)."""
    clearCaches()
    parseResource(proxy(1))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a Fields view was built")

    monkeypatch.setattr(parse.Fields, "__init__", refuse)
    result = parseResource(proxy(2))
    assert result.accepted and result.obj.directives.stripPathPrefix == "/r/2"


def test_compilesEachBadPatternOnce(monkeypatch: pytest.MonkeyPatch) -> None:
    import ksproxy.paths

    seen: List[str] = []

    def compilePattern(pattern: str) -> Any:
        seen.append(pattern)
        raise ValueError("made up")

    monkeypatch.setattr(ksproxy.paths, "compilePattern", compilePattern)
    clearCaches()
    result = parseResource(variant(spec__matcher={"path": "/nope", "method": "GET"}))
    assert (result.rejection.field, result.rejection.message) == ("spec.matcher.path", "made up")
    assert seen == ["/nope"]


class TestCache:
    def test_generations(self) -> None:
        cache = Cache(limit=2)
        for key in ("a", "b", "c"):
            cache.put(key, key.upper())
        # c rotated {a, b} to the previous generation: still found, and carried over when used (b's carry-over
        # rotates {c, a} out, c is carried over again).
        assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == ("A", "B", "C", 4)
        # d rotates {b, c} out: a, in neither generation any more, is gone.
        cache.put("d", "D")
        assert (cache.get("a"), cache.get("c"), cache.get("d")) == (None, "C", "D")

    def test_clear(self) -> None:
        cache = Cache()
        cache.put("a", 1)
        cache.clear()
        assert (cache.get("a"), len(cache)) == (None, 0)


class TestContentKey:
    def test_equalContentEqualKey(self) -> None:
        assert contentKey(proxy(1)) == contentKey(copy.deepcopy(proxy(1)))
        assert len(contentKey(proxy(1))) == 32

    @pytest.mark.parametrize(
        "a,b",
        [
            (1, "1"),
            (1, True),
            (1, 1.0),
            (0.0, -0.0),
            (b"x", bytearray(b"x")),
            ([1], (1,)),
            (None, ""),
            ({"a": 1}, {"a": [1]}),
        ],
    )
    def test_typesAreTold(self, a: Any, b: Any) -> None:
        assert contentKey({"spec": {"v": a}}) != contentKey({"spec": {"v": b}})

    def test_unpicklableFallsBackToRepr(self) -> None:
        """What does not pickle is still keyed (by its repr), and apart from what does."""
        proxied = MappingProxyType({"a": 1})
        assert contentKey({"v": proxied}) == contentKey({"v": MappingProxyType({"a": 1})})
        assert contentKey({"v": proxied}) != contentKey({"v": {"a": 1}})
        loop: List[Any] = []
        loop.append(loop)
        assert contentKey({"v": loop}) == contentKey({"v": loop})

    def test_timestamps(self) -> None:
        """YAML timestamps (datetime) take part in the key."""
        one = datetime.datetime(2024, 1, 1)
        assert contentKey({"t": one}) != contentKey({"t": one + datetime.timedelta(seconds=1)})
