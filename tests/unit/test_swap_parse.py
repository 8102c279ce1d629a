"""
Tests for the memoized sub-parses of L{ksproxy.model.parse} (issue 7: a 10,000-object swap): the results,
warnings, notes and rejections are exactly those of a parse without memos, named after the object at hand.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List

from twisted.trial.unittest import SynchronousTestCase

from ksproxy.model import parse
from ksproxy.model._fields import Context, Invalid, Memo
from ksproxy.model.parse import parseResource

API = "extensions.kubesphere.io/v1alpha1"


def proxy(name: str, upstream: Dict[str, Any], path: str = "/p/*", **directives: Any) -> Dict[str, Any]:
    raw: Dict[str, Any] = {
        "apiVersion": API,
        "kind": "ReverseProxy",
        "metadata": {"name": name, "labels": {"app": "x"}},
        "spec": {"matcher": {"path": path, "method": "GET"}, "upstream": upstream},
    }
    if directives:
        raw["spec"]["directives"] = directives
    return raw


def apiService(name: str, **spec: Any) -> Dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "APIService",
        "metadata": {"name": name, "namespace": "oops"},
        "spec": {"group": "g.example.com", "version": "v1", **spec},
    }


def clearMemos() -> None:
    for memo in (
        parse._ENDPOINTS,
        parse._METADATA,
        parse._MATCHERS,
        parse._DIRECTIVES,
        parse._PLAIN_UPSTREAMS,
        parse._PLAIN_MATCHERS,
        parse._PLAIN_METADATA,
    ):
        memo.clear()
    parse._RULES.clear()


CASES: List[Dict[str, Any]] = [
    proxy("a", {"url": "http://up.example:8080/base?q=1#f", "extra": 1}, headerDown=["X-A b"]),
    proxy("b", {"url": "http://up.example:8080/base?q=1#f", "extra": 1}, headerDown=["X-A b"]),
    proxy("c", {"url": "http://up.example:8080", "caBundle": "bm90IGEgY2VydA=="}),
    proxy("d", {"url": "http://up.example:8080", "caBundle": "bm90IGEgY2VydA=="}),
    proxy("e", {"url": "ftp://nope"}),
    proxy("f", {"url": "ftp://nope"}),
    proxy("g", {"url": "http://up.example:8080"}, headerDown=["bad header rule {"]),
    proxy("h", {"url": "http://up.example:8080"}, headerDown=["bad header rule {"]),
    proxy("i", {"url": "http://up.example:8080", "port": True}, stripPathPrefix="/p", rewrite=["/p/* /q{path}"]),
    proxy("j", {"url": "http://up.example:8080", "port": 1}, stripPathPrefix="/p", rewrite=["/p/* /q{path}"]),
    proxy("k", {"service": {"namespace": "ns", "name": "svc", "url": "x"}}),
    proxy("l", {"service": {"namespace": "ns", "name": "svc", "url": "x"}}),
    proxy("m", {"url": "http://up.example:8080"}, path="relative"),
    proxy("n", {"url": "http://up.example:8080"}, path="relative"),
    apiService("s1", url="http://api.example:80/x", healthCheck={"interval": "1s", "timeout": "2s"}),
    apiService("s2", url="http://api.example:80/x", healthCheck={"interval": "1s", "timeout": "2s"}),
    apiService("s3", endpoint="http://api.example"),
    apiService("s4", url="http://api.example", endpoint="http://api.example"),
]


class MemoizedParseTests(SynchronousTestCase):
    def setUp(self) -> None:
        clearMemos()
        self.addCleanup(clearMemos)

    def uncached(self, raw: Dict[str, Any]) -> parse.ParseResult:
        clearMemos()
        return parseResource(copy.deepcopy(raw))

    def test_sameAsUncached(self) -> None:
        """Every case, parsed with memos warm from all the others (twice over), equals a cold parse."""
        expected = [self.uncached(raw) for raw in CASES]
        clearMemos()
        for _ in range(2):
            got = [parseResource(copy.deepcopy(raw)) for raw in CASES]
            for raw, want, have in zip(CASES, expected, got):
                name = raw["metadata"]["name"]
                self.assertEqual(have, want, name)
                self.assertEqual((have.warnings, have.notes), (want.warnings, want.notes), name)
                self.assertEqual(str(have.rejection), str(want.rejection), name)

    def test_messagesNameTheirObject(self) -> None:
        """A shared upstream's warning is replayed under each object's own name."""
        a, b = parseResource(CASES[0]), parseResource(CASES[1])
        self.assertTrue(a.warnings)
        self.assertEqual([w.replace("ReverseProxy/a", "ReverseProxy/b") for w in a.warnings], list(b.warnings))
        self.assertTrue(all("ReverseProxy/a" in w for w in a.warnings))

    def test_rejectionsNameTheirObject(self) -> None:
        e, f = parseResource(CASES[4]), parseResource(CASES[5])
        self.assertIsNone(e.obj)
        self.assertEqual((e.rejection.name, f.rejection.name), ("e", "f"))
        self.assertEqual(e.rejection.field, f.rejection.field)
        self.assertEqual(e.rejection.message, f.rejection.message)

    def test_sharedModelsAreShared(self) -> None:
        """Objects naming the same upstream and header rule share the (immutable) parsed values."""
        a, b = parseResource(CASES[0]).obj, parseResource(CASES[1]).obj
        self.assertIs(a.upstream, b.upstream)
        self.assertIs(a.directives.headerDown[0], b.directives.headerDown[0])

    def test_typesAreTold(self) -> None:
        """A memo key tells True from 1 (an unknown field's value does not matter, but its type might)."""
        i, j = parseResource(CASES[8]), parseResource(CASES[9])
        self.assertEqual(i.obj.upstream, j.obj.upstream)
        self.assertEqual(len(i.notes), len(j.notes))


class MemoTests(SynchronousTestCase):
    def test_generations(self) -> None:
        """A full generation becomes the previous one; its entries are carried over when used."""
        memo = Memo(limit=2)
        computed: List[str] = []
        ctx = Context(kind="K", name="n")

        def value(key: str) -> str:
            def compute(recorder: Any) -> str:
                computed.append(key)
                return key.upper()

            return memo.get(ctx, key, compute)

        for key in ("a", "b", "c", "a", "d", "e", "f", "a"):
            value(key)
        # a, b computed; c rotates {a, b} out to previous; a hit in previous; d rotates {c, a};
        # e hits nothing, f rotates {d, e}; a is in neither any more.
        self.assertEqual(computed, ["a", "b", "c", "d", "e", "f", "a"])

    def test_replaysMessagesAndErrors(self) -> None:
        memo = Memo()

        def compute(recorder: Any) -> None:
            recorder.warn("spec.x", "careful")
            recorder.note("spec.y", "noted")
            raise Invalid("spec.z", "wrong")

        for name in ("one", "two"):
            ctx = Context(kind="K", name=name)
            with self.assertRaises(Invalid) as caught:
                memo.get(ctx, "key", compute)
            self.assertEqual((caught.exception.field, caught.exception.message), ("spec.z", "wrong"))
            self.assertEqual(ctx.warnings, [f"K/{name}: spec.x: careful"])
            self.assertEqual(ctx.notes, [f"K/{name}: spec.y: noted"])
