"""Tests for L{ksproxy.routing}: compiling the route table and looking requests up in it (SPEC 2)."""

import json

import pytest

from ksproxy.model.types import (
    APIService,
    Asset,
    Endpoint,
    JSBundle,
    Matcher,
    ObjectMeta,
    RawSource,
    ReverseProxy,
)
from ksproxy.paths import parseTarget
from ksproxy.routing import CompileResult, Conflict, Route, RouteTable, compileTable

UPSTREAM = Endpoint(scheme="http", host="upstream.example", port=8080)


def meta(name, ts=""):
    return ObjectMeta(name=name, creationTimestamp=ts)


def rp(name, *matchers, ts=""):
    """matchers: "PATH" or "METHOD PATH"."""
    ms = []
    for m in matchers:
        method, _, path = m.rpartition(" ")
        ms.append(Matcher(path=path, method=method or "*"))
    return ReverseProxy(meta=meta(name, ts), matchers=tuple(ms), upstream=UPSTREAM)


def bundle(name, link, *assets, ts=""):
    return JSBundle(
        meta=meta(name, ts),
        source=RawSource(b"x"),
        link=link,
        linkDefaulted=False,
        assets=tuple(Asset(link=a, source=RawSource(b"a")) for a in assets),
    )


def apisvc(name, group, version, *urls, ts=""):
    return APIService(
        meta=meta(name, ts), group=group, version=version, endpoint=UPSTREAM, nonResourceURLs=urls
    )


def table(*resources, **kw):
    result = compileTable(resources, generation=kw.pop("generation", 1), **kw)
    assert isinstance(result, CompileResult)
    assert isinstance(result.table, RouteTable)
    return result


def winner(t, path, method=b"GET"):
    route = t.lookup(method, parseTarget(path))
    return None if route is None else (route.kind, route.name, route.matcher)


# --- pipeline order -----------------------------------------------------------------------------------------

PIPELINE = table(
    bundle("b", "/dist/ext/index.js", "/dist/ext/style.css"),
    rp("shadowed", "/dist/ext/index.js"),
    rp("proxy", "/proxy/app/*"),
    rp("kapis-shadow", "/kapis/shadow.io/v1/*"),
    apisvc("api", "demo.kubesphere.io", "v1alpha1", "/metrics", "/healthz/*"),
    apisvc("shadow", "shadow.io", "v1"),
).table

# path, method -> (kind, name, matcher) or None
PIPELINE_CASES = [
    (b"/dist/ext/index.js", b"GET", ("bundle", "b", "/dist/ext/index.js")),
    (b"/dist/ext/index.js?resourceVersion=3", b"HEAD", ("bundle", "b", "/dist/ext/index.js")),
    (b"/dist/ext/index.js", b"POST", ("bundle", "b", "/dist/ext/index.js")),  # the server answers 405
    (b"/dist/ext/%69ndex.js", b"GET", ("bundle", "b", "/dist/ext/index.js")),
    (b"/dist/ext/x/../style.css", b"GET", ("bundle", "b", "/dist/ext/style.css")),
    (b"/dist/ext/index.js/", b"GET", None),
    (b"/proxy/app/x", b"GET", ("proxy", "proxy", "/proxy/app/*")),
    (b"/proxy/app", b"GET", None),
    (
        b"/kapis/demo.kubesphere.io/v1alpha1",
        b"GET",
        ("apiservice", "api", "/kapis/demo.kubesphere.io/v1alpha1"),
    ),
    (
        b"/kapis/demo.kubesphere.io/v1alpha1/",
        b"GET",
        ("apiservice", "api", "/kapis/demo.kubesphere.io/v1alpha1"),
    ),
    (
        b"/kapis/demo.kubesphere.io/v1alpha1/a/b",
        b"DELETE",
        ("apiservice", "api", "/kapis/demo.kubesphere.io/v1alpha1"),
    ),
    (
        b"/apis/demo.kubesphere.io/v1alpha1/x",
        b"GET",
        ("apiservice", "api", "/apis/demo.kubesphere.io/v1alpha1"),
    ),
    (b"/kapis/demo.kubesphere.io/v1alpha2/x", b"GET", None),
    (b"/kapis/demo.kubesphere.io", b"GET", None),
    (b"/apis/apps/v1/deployments", b"GET", None),
    (b"/kapis/shadow.io/v1/x", b"GET", ("proxy", "kapis-shadow", "/kapis/shadow.io/v1/*")),
    (b"/kapis/shadow.io/v1", b"GET", ("apiservice", "shadow", "/kapis/shadow.io/v1")),
    (b"/metrics", b"GET", ("apiservice", "api", "/metrics")),
    (b"/metrics/x", b"GET", None),
    (b"/healthz/ready", b"GET", ("apiservice", "api", "/healthz/*")),
    (b"/nothing", b"GET", None),
    (b"/", b"GET", None),
]


@pytest.mark.parametrize("path,method,expected", PIPELINE_CASES)
def test_pipeline(path, method, expected):
    assert winner(PIPELINE, path, method) == expected


def test_assetRoute():
    route = PIPELINE.lookup(b"GET", parseTarget(b"/dist/ext/style.css"))
    assert route is not None and route.asset is not None and route.asset.link == "/dist/ext/style.css"
    main = PIPELINE.lookup(b"GET", parseTarget(b"/dist/ext/index.js"))
    assert main is not None and main.asset is None and main.resource.kind == "JSBundle"


# --- precedence ---------------------------------------------------------------------------------------------

# resources, request path, method -> name of the winner
PRECEDENCE = [
    # exact path over glob, even when the glob is older and method-specific
    (
        [
            rp("glob", "GET /p/ab*", ts="2020-01-01T00:00:00Z"),
            rp("exact", "/p/ab", ts="2024-01-01T00:00:00Z"),
        ],
        b"/p/ab",
        b"GET",
        "exact",
    ),
    # longer literal prefix
    ([rp("short", "/p/*"), rp("long", "/p/foo/*")], b"/p/foo/x", b"GET", "long"),
    ([rp("short", "/p/*"), rp("long", "/p/foo/*")], b"/p/bar/x", b"GET", "short"),
    ([rp("star", "/p/*/x"), rp("prefix", "/p/a*")], b"/p/a/x", b"GET", "prefix"),
    ([rp("segment", "/p/foo/*"), rp("plain", "/p/foo*")], b"/p/foo/x", b"GET", "segment"),
    ([rp("segment", "/p/foo/*"), rp("plain", "/p/foo*")], b"/p/foobar", b"GET", "plain"),
    # specific method over "*"
    ([rp("any", "/p/*"), rp("get", "GET /p/*")], b"/p/x", b"GET", "get"),
    ([rp("any", "/p/*"), rp("get", "GET /p/*")], b"/p/x", b"POST", "any"),
    # ... but a longer literal prefix beats a specific method
    ([rp("get", "GET /p/*"), rp("anylong", "/p/foo/*")], b"/p/foo/x", b"GET", "anylong"),
    # method comparison is exact
    ([rp("any", "/p/*"), rp("get", "GET /p/*")], b"/p/x", b"get", "any"),
    # older creationTimestamp
    (
        [rp("new", "/p/*/x", ts="2024-05-01T00:00:00Z"), rp("old", "/p/*/*", ts="2023-05-01T00:00:00Z")],
        b"/p/q/x",
        b"GET",
        "old",
    ),
    # a missing timestamp sorts last
    ([rp("nots", "/p/*/x"), rp("ts", "/p/*/*", ts="2030-01-01T00:00:00Z")], b"/p/q/x", b"GET", "ts"),
    # name last
    (
        [rp("b", "/p/*/x", ts="2024-01-01T00:00:00Z"), rp("a", "/p/*/*", ts="2024-01-01T00:00:00Z")],
        b"/p/q/x",
        b"GET",
        "a",
    ),
    ([rp("b", "/p/*/x"), rp("a", "/p/*/*")], b"/p/q/x", b"GET", "a"),
    # case-sensitive
    ([rp("lower", "/p/x"), rp("upper", "/P/*")], b"/P/x", b"GET", "upper"),
]


@pytest.mark.parametrize("resources,path,method,expected", PRECEDENCE)
def test_precedence(resources, path, method, expected):
    for ordering in (resources, list(reversed(resources))):  # input order never matters
        t = table(*ordering).table
        route = t.lookup(method, parseTarget(path))
        assert route is not None and route.name == expected


def test_nonResourceURLPrecedence():
    t = table(
        apisvc("a", "a.io", "v1", "/ext/*"), apisvc("b", "b.io", "v1", "/ext/deep/*", "/ext/deep/exact")
    ).table
    assert winner(t, b"/ext/x") == ("apiservice", "a", "/ext/*")
    assert winner(t, b"/ext/deep/x") == ("apiservice", "b", "/ext/deep/*")
    assert winner(t, b"/ext/deep/exact") == ("apiservice", "b", "/ext/deep/exact")


def test_encodedSlashDoesNotReachSegmentRoute():
    t = table(rp("admin", "/p/admin/*"), rp("public", "/p/*")).table
    assert winner(t, b"/p/admin/x")[1] == "admin"
    assert winner(t, b"/p/admin%2Fx")[1] == "public"
    assert winner(t, b"/p/x/../admin/y")[1] == "admin"


# --- conflicts ----------------------------------------------------------------------------------------------


def test_identicalMatcherConflict():
    older = rp("older", "/p/*", "/older-only", ts="2023-01-01T00:00:00Z")
    newer = rp("newer", "/p/*", "/newer-only", ts="2024-01-01T00:00:00Z")
    for ordering in ((older, newer), (newer, older)):
        result = table(*ordering)
        assert result.conflicts == (Conflict("ReverseProxy", "newer", "older", "/p/*"),)
        assert result.table.conflicts == result.conflicts
        assert winner(result.table, b"/p/x")[1] == "older"
        # the loser's other matchers are still served
        assert winner(result.table, b"/newer-only")[1] == "newer"
        assert winner(result.table, b"/older-only")[1] == "older"


def test_conflictMessage():
    c = Conflict("ReverseProxy", "b", "a", "/p/*", "GET")
    assert "ReverseProxy/b" in c.message and "ReverseProxy/a" in c.message and "GET /p/*" in c.message


def test_conflictByName():
    result = table(rp("zeta", "/p/x"), rp("alpha", "/p/x"))
    assert [(c.name, c.winner) for c in result.conflicts] == [("zeta", "alpha")]


def test_equivalentPatternsConflict():
    result = table(rp("a", "/p/**"), rp("b", "/p/*"))
    assert [(c.name, c.winner) for c in result.conflicts] == [("b", "a")]


def test_sameMatcherOtherMethodIsNoConflict():
    result = table(rp("a", "GET /p/*"), rp("b", "POST /p/*"), rp("c", "/p/*"))
    assert result.conflicts == ()
    assert winner(result.table, b"/p/x", b"GET")[1] == "a"
    assert winner(result.table, b"/p/x", b"POST")[1] == "b"
    assert winner(result.table, b"/p/x", b"PUT")[1] == "c"


def test_sameMatcherTwiceInOneObjectIsNoConflict():
    result = table(rp("a", "/p/*", "/p/*"))
    assert result.conflicts == ()
    assert winner(result.table, b"/p/x")[1] == "a"


def test_bundleLinkConflict():
    result = table(
        bundle("second", "/dist/x/index.js", ts="2024-01-01T00:00:00Z"),
        bundle("first", "/dist/y/index.js", "/dist/x/index.js", ts="2023-01-01T00:00:00Z"),
    )
    assert [(c.kind, c.name, c.winner, c.matcher) for c in result.conflicts] == [
        ("JSBundle", "second", "first", "/dist/x/index.js")
    ]
    route = result.table.lookup(b"GET", parseTarget(b"/dist/x/index.js"))
    assert route.name == "first" and route.asset is not None


def test_apiServiceConflict():
    result = table(
        apisvc("old", "g.io", "v1", ts="2023-01-01T00:00:00Z"),
        apisvc("new", "g.io", "v1", "/new-metrics", ts="2024-01-01T00:00:00Z"),
    )
    assert [(c.kind, c.name, c.winner, c.matcher) for c in result.conflicts] == [
        ("APIService", "new", "old", "/kapis/g.io/v1")
    ]
    assert winner(result.table, b"/kapis/g.io/v1/x")[1] == "old"
    assert winner(result.table, b"/apis/g.io/v1/x")[1] == "old"
    assert winner(result.table, b"/new-metrics")[1] == "new"


def test_nonResourceURLConflict():
    result = table(apisvc("a", "a.io", "v1", "/metrics"), apisvc("b", "b.io", "v1", "/metrics"))
    assert [(c.name, c.winner, c.matcher) for c in result.conflicts] == [("b", "a", "/metrics")]


def test_servableWinsAConflict():
    """A disabled object does not block a working one with the same matcher (then age and name decide)."""
    disabled = rp("disabled", "/p/*", ts="2020-01-01T00:00:00Z")
    working = rp("working", "/p/*", ts="2024-01-01T00:00:00Z")

    def servable(r):
        return (r.meta.name != "disabled", "status.state is Disabled")

    result = table(disabled, working, isServable=servable)
    assert [(c.name, c.winner) for c in result.conflicts] == [("disabled", "working")]
    assert winner(result.table, b"/p/x")[1] == "working"


def test_invalidMatcherReported():
    result = table(rp("bad", "/a/../b", "/ok"))
    assert [(c.name, c.winner) for c in result.conflicts] == [("bad", "")]
    assert winner(result.table, b"/ok")[1] == "bad"


# --- servability --------------------------------------------------------------------------------------------


def test_unservableRouteDoesNotFallThrough():
    def servable(r):
        return (False, "upstream refs unresolved") if r.meta.name == "specific" else (True, "")

    t = table(rp("specific", "/p/foo/*"), rp("general", "/p/*"), isServable=servable).table
    route = t.lookup(b"GET", parseTarget(b"/p/foo/x"))
    assert isinstance(route, Route)
    assert (route.name, route.servable, route.reason) == ("specific", False, "upstream refs unresolved")
    assert t.lookup(b"GET", parseTarget(b"/p/bar")).servable


def test_isServableAskedOncePerResource():
    calls = []

    def servable(r):
        calls.append(r.meta.name)
        return (True, "")

    table(
        rp("a", "/a", "/b", "/c"),
        bundle("b", "/dist/b/index.js", "/dist/b/x.css"),
        apisvc("c", "c.io", "v1", "/m"),
        isServable=servable,
    )
    assert sorted(calls) == ["a", "b", "c"]


def test_notAResource():
    with pytest.raises(TypeError):
        compileTable([object()], generation=1)  # type: ignore[list-item]


# --- explain and describe -----------------------------------------------------------------------------------


def test_explain():
    t = table(
        rp("short", "/p/*"),
        rp("long", "/p/foo/*"),
        apisvc("api", "g.io", "v1", "/p/foo/bar"),
        generation=7,
    ).table
    e = t.explain(b"GET", parseTarget(b"/p/foo/bar"))
    assert e["generation"] == 7
    assert e["winner"]["name"] == "long" and e["winner"]["stage"] == "reverseproxy"
    assert "longer literal prefix" in e["why"]
    assert [c["name"] for c in e["candidates"]] == ["long", "short", "api"]
    assert e["candidates"][0]["rank"]["literalLength"] == len("/p/foo/")
    json.dumps(e)

    e = t.explain(b"GET", parseTarget(b"/nothing"))
    assert e["winner"] is None and e["candidates"] == [] and e["why"] == "no route matches"


def test_explainStagesAndServability():
    t = table(
        bundle("b", "/dist/b/index.js"), rp("p", "/dist/*"), isServable=lambda r: (False, "Disabled")
    ).table
    e = t.explain(b"GET", parseTarget(b"/dist/b/index.js"))
    assert e["winner"]["kind"] == "bundle"
    assert "jsbundle stage comes first" in e["why"] and "503" in e["why"]


def test_describe():
    t = table(
        bundle("b", "/dist/b/index.js", "/dist/b/s.css"),
        rp("p", "GET /p/*", "/q"),
        apisvc("a", "a.io", "v1", "/m/*"),
    ).table
    rows = t.describe()
    json.dumps(rows)
    assert [(r["stage"], r["name"], r["matcher"], r["method"]) for r in rows] == [
        ("jsbundle", "b", "/dist/b/index.js", "*"),
        ("jsbundle", "b", "/dist/b/s.css", "*"),
        ("reverseproxy", "p", "/q", "*"),
        ("reverseproxy", "p", "/p/*", "GET"),
        ("apiservice", "a", "/apis/a.io/v1", "*"),
        ("apiservice", "a", "/kapis/a.io/v1", "*"),
        ("nonresourceurl", "a", "/m/*", "*"),
    ]
    assert rows[2]["upstream"] == "http://upstream.example:8080"


# --- scale --------------------------------------------------------------------------------------------------


def test_tenThousandRules():
    """
    10,000 ReverseProxies of every matcher form: lookups give the right answers, and a lookup visits a
    handful of trie nodes and candidates, not every rule.
    """
    resources = []
    for i in range(10_000):
        form = i % 5
        if form == 0:
            matcher = f"/svc{i}/*"
        elif form == 1:
            matcher = f"GET /exact/{i}"
        elif form == 2:
            matcher = f"/glob/*/{i}"
        elif form == 3:
            matcher = f"/stem/n{i}*"
        else:
            matcher = f"/mid/a{i}*z/*"
        resources.append(rp(f"rp-{i:05d}", matcher, ts=f"2024-01-01T00:00:{i % 60:02d}Z"))
    resources.append(rp("catch-all", "/*"))
    result = table(*resources)
    assert result.conflicts == ()
    t = result.table

    cases = [
        (b"/svc5/x/y", b"GET", "rp-00005"),
        (b"/svc9995/", b"PUT", "rp-09995"),
        (b"/svc9995", b"PUT", "catch-all"),
        (b"/exact/1", b"GET", "rp-00001"),
        (b"/exact/1", b"POST", "catch-all"),
        (b"/exact/9996", b"GET", "rp-09996"),
        (b"/glob/anything/7", b"GET", "rp-00007"),
        (b"/glob/a%2Fb/9997", b"GET", "rp-09997"),
        (b"/glob/a/b/9997", b"GET", "catch-all"),
        # "/stem/n1*" .. "/stem/n9998*": the longest literal prefix wins
        (b"/stem/n13", b"GET", "rp-00013"),
        (b"/stem/n138", b"GET", "rp-00138"),
        (b"/stem/n1388/x", b"GET", "rp-01388"),
        (b"/stem/n8", b"GET", "rp-00008"),
        (b"/mid/a4qqz/r", b"GET", "rp-00004"),
        (b"/mid/a9999z/", b"GET", "rp-09999"),
        (b"/unknown", b"GET", "catch-all"),
    ]
    for path, method, expected in cases:
        route = t.lookup(method, parseTarget(path))
        assert route is not None and route.name == expected, (path, route)

    for path, method, _ in cases:
        e = t.explain(method, parseTarget(path))
        assert e["visited"] <= 12, (path, e["visited"])
        assert len(e["candidates"]) <= 6, (path, [c["name"] for c in e["candidates"]])
    assert len(t.describe()) == 10_001
