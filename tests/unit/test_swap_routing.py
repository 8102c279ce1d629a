"""Tests for the lean trie nodes of L{ksproxy.routing.table}: shared empty containers are never written."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ksproxy.model.types import Endpoint, Matcher, ObjectMeta, ReverseProxy
from ksproxy.paths import parseTarget
from ksproxy.routing import compileTable
from ksproxy.routing import table as tableModule


def proxy(name: str, *paths: str) -> ReverseProxy:
    return ReverseProxy(
        meta=ObjectMeta(name=name),
        matchers=tuple(Matcher(path=p, method="*") for p in paths),
        upstream=Endpoint("http", "up.example", 80),
    )


class LazyNodeTests(SynchronousTestCase):
    def test_sharedEmptyStaysEmpty(self) -> None:
        resources = [
            proxy("a", "/a/*", "/a/exact", "/a/x*y/z", "/a/*/b*"),
            proxy("b", "/b/c/d", "/b/c/*"),
            proxy("c", "*"),
        ] + [proxy(f"r{i}", f"/r/{i}/*") for i in range(100)]
        table = compileTable(resources, generation=1).table
        self.assertEqual(tableModule._EMPTY, {})
        cases = {
            "/a/q": "a",
            "/a/exact": "a",
            "/a/x1y/z": "a",
            "/a/k/bee": "a",
            "/b/c/d": "b",
            "/b/c/e": "b",
            "/r/42/x": "r42",
            "/zzz": "c",
        }
        for path, name in cases.items():
            route = table.lookup(b"GET", parseTarget(path.encode()))
            self.assertEqual(route.name if route else None, name, path)
        self.assertEqual(tableModule._EMPTY, {})
