"""Tests for L{ksproxy.directives}: compiling and applying ReverseProxy directives (SPEC 4.1-4.3)."""

import pytest

from ksproxy.directives import (
    RequestView,
    applyHeaderRules,
    applyRequestDirectives,
    compileHeaderRule,
    compileRegexpRule,
    compileReplaceRule,
    compileRewriteRule,
    compileTemplate,
    renderTemplate,
)
from ksproxy.http.headers import Headers
from ksproxy.model.types import Directives, HeaderRule, RewriteRule, Template
from ksproxy.paths import BadPath


def view(path=b"/a/b", query=b"x=1&x=2;y", method=b"GET", host=b"gw.example", headers=()):
    return RequestView(method=method, host=host, rawPath=path, query=query, headers=Headers(headers))


# --- templates ----------------------------------------------------------------------------------------------

PLACEHOLDERS = [
    ("{path}", b"/a/b"),
    ("{http.request.uri.path}", b"/a/b"),
    ("{query}", b"x=1&x=2;y"),
    ("{http.request.uri.query}", b"x=1&x=2;y"),
    ("{method}", b"GET"),
    ("{http.request.method}", b"GET"),
    ("{host}", b"gw.example"),
    ("{http.request.host}", b"gw.example"),
    ("{http.request.header.X-Id}", b"7,8"),
    ("{http.request.header.x-id}", b"7,8"),
    ("{http.request.header.missing}", b""),
    ("pre-{method}-{host}-post", b"pre-GET-gw.example-post"),
    ("{{literal}} {method}", b"{literal} GET"),
    ("a}}b", b"a}b"),
    ("", b""),
    ("plain", b"plain"),
]


@pytest.mark.parametrize("text,expected", PLACEHOLDERS)
def test_renderPlaceholders(text, expected):
    v = view(headers=[(b"X-Id", b"7"), (b"Other", b"z"), (b"x-id", b"8")])
    assert renderTemplate(compileTemplate(text), v) == expected


def test_templateParts():
    t = compileTemplate("/x/{path}?{http.request.header.X-A}{{")
    assert isinstance(t, Template)
    assert t.parts == ("/x/", ("path",), "?", ("http.request.header.x-a",), "{")
    assert not t.is_literal
    assert compileTemplate("abc").is_literal


def test_queryNone():
    assert renderTemplate(compileTemplate("[{query}]"), view(query=None)) == b"[]"


@pytest.mark.parametrize(
    "text",
    [
        "{nope}",
        "{Path}",
        "{http.request.header.}",
        "{http.request.header.a b}",
        "{http.request.header.a:b}",
        "{path",
        "a}b",
        "}",
        "a\rb",
        "a\nb",
        "a\x00b",
        "a\x01b",
        "{}",
    ],
)
def test_badTemplate(text):
    with pytest.raises(ValueError):
        compileTemplate(text)


def test_headerPlaceholderCannotInject():
    """Whatever a placeholder expands to, a header value never holds CR, LF or other controls but HTAB."""
    v = view(host=b"h\r\nX-Evil: 1", headers=[(b"X-A", b"a\r\nb\x00c\td")])
    out = renderTemplate(compileTemplate("{http.request.header.x-a}|{host}"), v)
    assert out == b"abc\td|hX-Evil: 1"
    assert b"\r" not in out and b"\n" not in out


def test_plainTemplateStillRenders():
    """A Template built elsewhere (not compiled here) is compiled on first use."""
    t = Template(source="{method} {path}", parts=(("method",), " ", ("path",)))
    assert renderTemplate(t, view()) == b"GET /a/b"


# --- header rules -------------------------------------------------------------------------------------------

# text -> (op, name, value source or None)
HEADER_RULES = [
    ("X-A: v", ("set", "x-a", "v")),
    ("X-A v", ("set", "x-a", "v")),
    ("X-A:v", ("set", "x-a", "v")),
    ("X-A:", ("set", "x-a", "")),
    ("X-A:   ", ("set", "x-a", "")),
    ('X-A ""', ("set", "x-a", "")),
    ('X-A: "  spaced  "', ("set", "x-a", "  spaced  ")),
    ('X-A "quoted"', ("set", "x-a", "quoted")),
    ("X-A :colon", ("set", "x-a", ":colon")),
    ("Cache-Control no-cache, no-store", ("set", "cache-control", "no-cache, no-store")),
    ("  X-A   v w  ", ("set", "x-a", "v w")),
    ("X-A\tv", ("set", "x-a", "v")),
    ("Host {http.request.header.x-host}", ("set", "host", "{http.request.header.x-host}")),
    ("+X-A v", ("add", "x-a", "v")),
    ("+X-A: v", ("add", "x-a", "v")),
    ("-Authorization", ("delete", "authorization", None)),
    ("-X-A  ", ("delete", "x-a", None)),
    ("-X-Remote-*", ("delete_prefix", "x-remote-", None)),
    ("-X-Remote-**", ("delete_prefix", "x-remote-", None)),
]


@pytest.mark.parametrize("text,expected", HEADER_RULES)
def test_compileHeaderRule(text, expected):
    rule = compileHeaderRule(text)
    assert isinstance(rule, HeaderRule)
    value = None if rule.value is None else rule.value.source
    assert (rule.op, rule.name, value) == expected
    assert rule.source == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "X-A",
        "+X-A",
        "X-A ",
        "-",
        "+",
        "-*",
        "-X-A v",
        "-X*Y",
        "X-*: v",
        "+X-* v",
        "X A\r\nB: c",
        "X-A: v\n",
        "X-A: v\r",
        "X-A: v\x00",
        "X-A: v\x01w",
        "X(A) v",
        "X@A: v",
        ":authority v",
        " : v",
        "X-A: {nope}",
        "Content-Length: 5",
        "transfer-encoding chunked",
    ],
)
def test_badHeaderRule(text):
    with pytest.raises(ValueError):
        compileHeaderRule(text)


def apply(rules, headers, v=None):
    h = Headers(headers)
    applyHeaderRules([compileHeaderRule(r) for r in rules], h, v or view())
    return list(h)


def test_setReplacesEveryValueKeepingPosition():
    out = apply(["X-A: new"], [(b"x-a", b"1"), (b"B", b"2"), (b"X-a", b"3")])
    assert out == [(b"X-A", b"new"), (b"B", b"2")]


def test_setAddsWhenMissing():
    assert apply(["X-Forwarded-Proto https"], [(b"B", b"2")]) == [
        (b"B", b"2"),
        (b"X-Forwarded-Proto", b"https"),
    ]


def test_add():
    assert apply(["+X-A v2"], [(b"X-A", b"v1")]) == [(b"X-A", b"v1"), (b"X-A", b"v2")]


def test_delete():
    out = apply(["-authorization"], [(b"Authorization", b"Bearer x"), (b"B", b"2"), (b"AUTHORIZATION", b"y")])
    assert out == [(b"B", b"2")]


def test_deletePrefixComparesTheStart():
    """KubeSphere compared the wrong end (HasSuffix): a header that merely ends with the prefix stays."""
    headers = [
        (b"X-Remote-User", b"u"),
        (b"x-remote-group", b"g"),
        (b"Foo-X-Remote-", b"keep"),
        (b"X-Remotely", b"keep"),
    ]
    assert apply(["-X-Remote-*"], headers) == [(b"Foo-X-Remote-", b"keep"), (b"X-Remotely", b"keep")]


def test_rulesInOrderWithPlaceholders():
    v = view(path=b"/p/%7Ex", headers=[(b"X-Id", b"42")])
    out = apply(
        ["X-Path {path}", "+X-Path {method}", "X-Who: id={http.request.header.x-id}", "-x-id"],
        [(b"X-Id", b"42")],
        v,
    )
    assert out == [(b"X-Path", b"/p/%7Ex"), (b"X-Path", b"GET"), (b"X-Who", b"id=42")]


def test_headerDownOnResponse():
    """The same rules work on response headers; placeholders read the request view."""
    response = Headers([(b"Server", b"upstream"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")])
    rules = [compileHeaderRule(r) for r in ("-Server", "X-Served-Path {path}", "+Set-Cookie c=3")]
    applyHeaderRules(rules, response, view(path=b"/x"))
    assert list(response) == [
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"X-Served-Path", b"/x"),
        (b"Set-Cookie", b"c=3"),
    ]


def test_plainHeaderRule():
    """HeaderRule objects built elsewhere (lower-case name only) work as well."""
    rules = [
        HeaderRule(op="set", name="x-a", value=Template(source="{method}", parts=(("method",),))),
        HeaderRule(op="delete_prefix", name="x-b"),
    ]
    h = Headers([(b"X-Bee", b"1"), (b"C", b"2")])
    applyHeaderRules(rules, h, view())
    assert list(h) == [(b"C", b"2"), (b"x-a", b"GET")]


# --- rewrite ------------------------------------------------------------------------------------------------

# rules, path, query, headers -> (path, query)
REWRITES = [
    (["/old-prefix/* /new-prefix{path}"], b"/old-prefix/x", b"a=1&a=2;b", (b"/new-prefix/x", b"a=1&a=2;b")),
    (["/old/* /new{path}"], b"/old/a%2Fb", None, (b"/new/a%2Fb", None)),
    (["/old/* /new{path}"], b"/old", b"q", (b"/old", b"q")),
    (["/old* /new{path}"], b"/old", b"q", (b"/new", b"q")),
    (["/old* /new{path}"], b"/older/x", None, (b"/newer/x", None)),
    (["/a /b{path}"], b"/a", None, (b"/b/a", None)),
    (["/a/* /b?x=1"], b"/a/c", b"orig=1", (b"/b", b"x=1")),
    (["/a/* /b?{query}&x=1"], b"/a/c", b"orig=%2f;z", (b"/b", b"orig=%2f;z&x=1")),
    (["/a/* /b?"], b"/a/c", b"orig", (b"/b", None)),
    (["/a/* /b?{query}"], b"/a/c", None, (b"/b", None)),
    (["/a/* ?p={path}"], b"/a/c", b"orig", (b"/a/c", b"p=/c")),
    (["/a/* {http.request.uri.path}/z"], b"/a/c", None, (b"/a/c/z", None)),
    (["/a/* /m/{method}{path}"], b"/a/c", None, (b"/m/GET/c", None)),
    (["/a* {path}"], b"/a", None, (b"/", None)),
    (["/a/* /b/../c{path}"], b"/a/x", None, (b"/c/x", None)),
    (["/a/* /\u00fc{path}"], b"/a/x", None, (b"/%C3%BC/x", None)),
    (["/a/* /{{x}}{path}"], b"/a/x", None, (b"/{x}/x", None)),
    (["/a/* /lit%2Fslash{path}"], b"/a/x", None, (b"/lit%2Fslash/x", None)),
    (["/nomatch/* /x", "/a/* /first{path}", "/a/* /second{path}"], b"/a/y", None, (b"/first/y", None)),
    (['"/a/*" "/b{path}"'], b"/a/y", None, (b"/b/y", None)),
    (["* /all{path}"], b"/q/r", None, (b"/all/q/r", None)),
    (["/p/*/x /y{path}"], b"/p/a%2Fb/x", None, (b"/y/p/a%2Fb/x", None)),
]


@pytest.mark.parametrize("rules,path,query,expected", REWRITES)
def test_rewrite(rules, path, query, expected):
    v = view(path=path, query=query)
    applyRequestDirectives(Directives(rewrite=tuple(compileRewriteRule(r) for r in rules)), v)
    assert (v.rawPath, v.query) == expected


def test_rewritePlaceholderValuesAreMadeSafe():
    """A header value cannot add a query, a fragment, spaces or broken escapes to the path."""
    v = view(path=b"/a/c", headers=[(b"X-Id", b"a b?c#d%zz%41\r\n")])
    applyRequestDirectives(
        Directives(
            rewrite=(compileRewriteRule("/a/* /h/{http.request.header.x-id}?v={http.request.header.x-id}"),)
        ),
        v,
    )
    assert v.rawPath == b"/h/a%20b%3Fc%23d%25zz%41%0D%0A"
    assert v.query == b"v=a%20b?c%23d%zz%41%0D%0A"


def _rewritten(rule, **kw):
    v = view(**kw)
    applyRequestDirectives(Directives(rewrite=(compileRewriteRule(rule),)), v)
    return v.rawPath


@pytest.mark.parametrize(
    "target,kw,expected",
    [
        ("/t/{http.request.header.x-t}{path}", dict(headers=[(b"X-T", b"../../admin")]), b"/t/..%2F..%2Fadmin/abc"),
        ("/t/{http.request.header.x-t}{path}", dict(headers=[(b"X-T", b"..\\admin")]), b"/t/..%5Cadmin/abc"),
        ("/t/{query}{path}", dict(query=b"../../admin"), b"/t/..%2F..%2Fadmin/abc"),
        ("/t/{host}{path}", dict(host=b"a/../.."), b"/t/a%2F..%2F../abc"),
        # "." only removes itself, and "..." is no dot-segment: neither can take "/t" away.
        ("/t/{http.request.header.x-t}{path}", dict(headers=[(b"X-T", b".")]), b"/t/abc"),
        ("/t/{http.request.header.x-t}{path}", dict(headers=[(b"X-T", b"...")]), b"/t/.../abc"),
        ("/t/{http.request.header.x-t}", dict(headers=[(b"X-T", b"..x")]), b"/t/..x"),
        # The path-valued placeholders are normalised paths and keep their slashes.
        ("/t{http.request.uri.path}", {}, b"/t/ph/abc"),
    ],
)
def test_rewritePlaceholderStaysInItsSegment(target, kw, expected):
    assert _rewritten("/ph/* " + target, path=b"/ph/abc", **kw) == expected


@pytest.mark.parametrize(
    "target,kw",
    [
        ("/t/{http.request.header.x-t}{path}", dict(headers=[(b"X-T", b"..")])),
        ("/t/{http.request.header.x-t}{path}", dict(headers=[(b"X-T", b"%2e%2E")])),
        ("/t/{http.request.header.x-t}", dict(headers=[(b"X-T", b".%2e")])),
        ("/t/.{http.request.header.x-t}/x", dict(headers=[(b"X-T", b".")])),
        ("/t/{http.request.header.x-t}{http.request.header.x-t}/x", dict(headers=[(b"X-T", b".")])),
        ("/t/{query}{path}", dict(query=b"..")),
        ("/t/{host}{path}", dict(host=b"..")),
        ("/t/{method}{path}", dict(method=b"..")),
    ],
)
def test_rewritePlaceholderCannotFormDotDot(target, kw):
    """A client value that would make its segment ".." is refused: removing it would take "/t" away."""
    with pytest.raises(BadPath, match="'..' segment"):
        _rewritten("/ph/* " + target, path=b"/ph/abc", **kw)


def test_dotDotBuiltByReplaceOrRegexpIsRefused():
    """replace and pathRegexp cannot put a ".." together from the client's bytes either."""
    d = Directives(
        rewrite=(compileRewriteRule("/ph/* /t{path}"),),
        replace=(compileReplaceRule("%2F /"),),
    )
    v = view(path=b"/ph/a%2F..%2F..%2Fadmin")
    with pytest.raises(BadPath, match="replace"):
        applyRequestDirectives(d, v)
    v = view(path=b"/a/.-.")
    with pytest.raises(BadPath, match="pathRegexp"):
        applyRequestDirectives(Directives(pathRegexp=(compileRegexpRule("^/a/(.*)-(.*)$ /t/$1$2"),)), v)
    # A single "." so made is only removed, as before.
    v = view(path=b"/a/.-x")
    applyRequestDirectives(Directives(pathRegexp=(compileRegexpRule("^/a/(.*)-x$ /t/$1/y"),)), v)
    assert v.rawPath == b"/t/y"


def test_rewriteRuleShape():
    rule = compileRewriteRule("  /old/*   /new{path}?a={query}  ")
    assert isinstance(rule, RewriteRule)
    assert rule.pattern == "/old/*"
    assert rule.target.source == "/new{path}"
    assert rule.query is not None and rule.query.source == "a={query}"
    assert compileRewriteRule("/a /b").query is None


def test_plainRewriteRule():
    """A RewriteRule built elsewhere compiles its pattern on first use."""
    rule = RewriteRule(
        pattern="/x/*", target=Template(source="/y{path}", parts=("/y", ("path",))), query=None
    )
    v = view(path=b"/x/1")
    applyRequestDirectives(Directives(rewrite=(rule,)), v)
    assert v.rawPath == b"/y/1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/only-pattern",
        "/a /b /c",
        "/a/* new",
        "/a/* /b#c",
        "/a/* /b?c#d",
        "/a/* /{nope}",
        "/a/* /b?{nope}",
        "nope /b",
        "/a/../b /c",
        "/a/* /b%zz",
        "/a/* /b%",
        '/a/* "/b',
        '"/a/*"x /b',
        "/a/* /b\r\n",
    ],
)
def test_badRewrite(text):
    with pytest.raises(ValueError):
        compileRewriteRule(text)


# --- replace and pathRegexp ---------------------------------------------------------------------------------

REPLACES = [
    (["/api /v2"], b"/api/x", b"/v2/x"),
    (["%2F /"], b"/a%2Fb", b"/a/b"),
    (["a b"], b"/aaa", b"/bbb"),
    (['/strip ""'], b"/strip/x", b"/x"),
    (['/strip ""'], b"/strip", b"/"),
    (["x y", "y z"], b"/x", b"/z"),
    (["/nope /x"], b"/a%2fb", b"/a%2fb"),
]


@pytest.mark.parametrize("rules,path,expected", REPLACES)
def test_replace(rules, path, expected):
    v = view(path=path, query=b"api=/api")
    applyRequestDirectives(Directives(replace=tuple(compileReplaceRule(r) for r in rules)), v)
    assert v.rawPath == expected
    assert v.query == b"api=/api"  # the query is never touched


def test_compileReplaceRule():
    assert compileReplaceRule("/a /b") == ("/a", "/b")
    assert compileReplaceRule('/a ""') == ("/a", "")


@pytest.mark.parametrize(
    "text", ["", "/a", "/a /b /c", '"" /x', "/a /b?x", "/a /b#", "/a /b c", "/a /\u00fc", "/a /%zz", "/a /b/../c", "/a /%2e."]
)
def test_badReplace(text):
    with pytest.raises(ValueError):
        compileReplaceRule(text)


REGEXPS = [
    (r"^/api/v(\d+)/(.*) /v$1/${2}", b"/api/v3/x%2Fy", b"/v3/x%2Fy"),
    (r"^/api/(?P<rest>.*) /new/${rest}", b"/api/q", b"/new/q"),
    (r"^/api/(?P<rest>.*) /new/$rest", b"/api/q", b"/new/q"),
    (r"^/(\w+) /${1}x", b"/ab", b"/abx"),
    (r"^/(\w+) /$$1", b"/ab", b"/$1"),
    (r"^/(\w+) /$-$", b"/ab", b"/$-$"),
    (r"o 0", b"/foo/bo", b"/f00/b0"),
    (r"^/x(/.*)? /y$1", b"/x", b"/y"),
    (r"^/a /b\c", b"/a", b"/b\\c"),
    (r"^/nomatch /z", b"/a", b"/a"),
    (r"^/a/ /", b"/a/", b"/"),
    (r'^/a ""', b"/a", b"/"),
]


@pytest.mark.parametrize("text,path,expected", REGEXPS)
def test_pathRegexp(text, path, expected):
    v = view(path=path, query=b"q")
    applyRequestDirectives(Directives(pathRegexp=(compileRegexpRule(text),)), v)
    assert v.rawPath == expected
    assert v.query == b"q"


@pytest.mark.parametrize(
    "text,message",
    [
        ("(unclosed /x", "invalid regular expression"),
        (r"^/(\w+) /$1x", r"\$\{1\}text"),
        (r"^/(\w+) /$2", "does not have"),
        (r"^/(\w+) /${name}", "does not have"),
        ("^/a /b?c", "cannot contain"),
        ("^/a(.*) /b/../c$1", "'..' segment"),
        ("^/a", "REGEX REPLACEMENT"),
        ("^/a /b /c", "REGEX REPLACEMENT"),
    ],
)
def test_badRegexp(text, message):
    with pytest.raises(ValueError, match=message):
        compileRegexpRule(text)


# --- the whole pipeline -------------------------------------------------------------------------------------


def test_orderOfDirectives():
    """SPEC 4.1: method, strip prefix/suffix, headerUp (sees the stripped path), rewrite, replace, pathRegexp."""
    d = Directives(
        method="put",
        stripPathPrefix="/proxy/app",
        stripPathSuffix=".json",
        headerUp=(compileHeaderRule("X-Seen {method} {path}"), compileHeaderRule("-Authorization")),
        rewrite=(compileRewriteRule("/v1/* /v2{path}"),),
        replace=(compileReplaceRule("/v2/ /v3/"),),
        pathRegexp=(compileRegexpRule("^/v3/(.*) /api/$1"),),
    )
    v = view(path=b"/proxy/%61pp/v1/it%2Fem.json", query=b"b=2&a=1;c", headers=[(b"Authorization", b"x")])
    applyRequestDirectives(d, v)
    assert v.method == b"PUT"
    assert v.rawPath == b"/api/it%2Fem"
    assert v.query == b"b=2&a=1;c"
    assert list(v.headers) == [(b"X-Seen", b"PUT /v1/it%2Fem")]


def test_stripPrefixOfRealManifest():
    v = view(path=b"/proxy/databend.playground/api/%7Eq;x", query=b"a=%20&a")
    applyRequestDirectives(Directives(stripPathPrefix="/proxy/databend.playground"), v)
    assert (v.rawPath, v.query) == (b"/api/%7Eq;x", b"a=%20&a")


@pytest.mark.parametrize(
    "d,path,expected",
    [
        (Directives(stripPathPrefix="/p"), b"/p", b"/"),
        (Directives(stripPathPrefix="/p"), b"/q", b"/q"),
        (Directives(stripPathSuffix="/x"), b"/x", b"/"),
        (Directives(stripPathPrefix="/p/x"), b"/p/x../y", b"/y"),
    ],
)
def test_stripEdges(d, path, expected):
    v = view(path=path)
    applyRequestDirectives(d, v)
    assert v.rawPath == expected


def test_nothingConfiguredChangesNothing():
    v = view(path=b"/a%2fB/%7e;x", query=b"z&a=1&a=1", headers=[(b"X", b"1")])
    applyRequestDirectives(Directives(), v)
    assert (v.method, v.rawPath, v.query, list(v.headers)) == (
        b"GET",
        b"/a%2fB/%7e;x",
        b"z&a=1&a=1",
        [(b"X", b"1")],
    )


def test_activeCoversEveryDirective() -> None:
    """The forwarder skips directives when Directives.active is false: every field but authProxy must set it."""
    import attrs as _attrs

    from ksproxy.model.types import Directives

    assert Directives().active is False
    samples = {"method": "POST", "stripPathPrefix": "/a", "stripPathSuffix": ".x", "authProxy": True}
    for field in _attrs.fields(Directives):
        if not field.init:
            continue
        value = samples.get(field.name, ("x",))
        d = Directives(**{field.name: value})
        assert d.active is (field.name != "authProxy"), field.name
