"""
Each top-level manifest of ../shared/examples-real, loaded on its own the way the file source loads it,
routes as its authors intended: every ReverseProxy matcher reaches that proxy, every APIService answers for
its group/version, every JSBundle link serves that bundle; nothing is rejected and nothing conflicts.
"""

from __future__ import annotations

import os

import pytest

from ksproxy.cli import loadReport
from ksproxy.model.types import APIService, JSBundle, ReverseProxy
from ksproxy.paths import parseTarget

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL = os.path.join(os.path.dirname(ROOT), "shared", "examples-real")

FILES = sorted(f for f in os.listdir(REAL) if f.endswith(".yaml")) if os.path.isdir(REAL) else []


def _concrete(pattern: str) -> str:
    """A request path that the matcher pattern is meant to catch."""
    if pattern.endswith("*"):
        return pattern[:-1] + ("x" if not pattern.endswith("/*") else "x/y")
    return pattern.replace("*", "x")


@pytest.mark.skipif(not FILES, reason="../shared/examples-real is not beside this checkout")
@pytest.mark.parametrize("name", FILES)
def test_routesAsIntended(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / name).write_bytes(open(os.path.join(REAL, name), "rb").read())
    report = loadReport(str(tmp_path))
    snap = report.snapshot
    assert not snap.sourceErrors
    assert not [r for r in snap.records.values() if r.rejection is not None]
    assert not report.compiled.conflicts
    table = report.compiled.table
    for resource in snap.resources:
        if isinstance(resource, ReverseProxy):
            for matcher in resource.matchers:
                method = b"GET" if matcher.method == "*" else matcher.method.encode()
                route = table.lookup(method, parseTarget(_concrete(matcher.path).encode()))
                assert route is not None and route.name == resource.meta.name, (matcher, route)
        elif isinstance(resource, APIService):
            for prefix in ("/kapis", "/apis"):
                path = f"{prefix}/{resource.group}/{resource.version}/things".encode()
                route = table.lookup(b"GET", parseTarget(path))
                assert route is not None and route.name == resource.meta.name
            for url in resource.nonResourceURLs:
                route = table.lookup(b"GET", parseTarget(_concrete(url).encode()))
                assert route is not None and route.name == resource.meta.name
        elif isinstance(resource, JSBundle):
            route = table.lookup(b"GET", parseTarget(resource.link.encode()))
            assert route is not None and route.kind == "bundle" and route.name == resource.meta.name
