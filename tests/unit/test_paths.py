"""Tests for L{ksproxy.paths}: request-target parsing, normalisation, patterns, strip prefix/suffix."""

import pytest

from ksproxy.paths import (
    BadPath,
    compilePattern,
    decodeSegments,
    normalisePath,
    parseTarget,
    stripPrefix,
    stripSuffix,
)

# target -> (rawPath, query, segments)
NORMALISE = [
    (b"/", b"/", None, ("",)),
    (b"/a", b"/a", None, ("a",)),
    (b"/a/", b"/a/", None, ("a", "")),
    (b"//a", b"//a", None, ("", "a")),
    (b"/a//b", b"/a//b", None, ("a", "", "b")),
    (b"/a/./b", b"/a/b", None, ("a", "b")),
    (b"/a/b/..", b"/a/", None, ("a", "")),
    (b"/a/b/../c", b"/a/c", None, ("a", "c")),
    (b"/a/.", b"/a/", None, ("a", "")),
    (b"/.", b"/", None, ("",)),
    (b"/a/..", b"/", None, ("",)),
    (b"/a/%2e/b", b"/a/b", None, ("a", "b")),
    (b"/a/%2E/b", b"/a/b", None, ("a", "b")),
    (b"/a/b/%2e%2E/c", b"/a/c", None, ("a", "c")),
    (b"/a/b/.%2e/c", b"/a/c", None, ("a", "c")),
    (b"/a/b/%2E./c", b"/a/c", None, ("a", "c")),
    (b"/a/..b/...", b"/a/..b/...", None, ("a", "..b", "...")),
    (b"/a/.%2Fb", b"/a/.%2Fb", None, ("a", "./b")),
    (b"/a%2Fb/c", b"/a%2Fb/c", None, ("a/b", "c")),
    (b"/a%2fb", b"/a%2fb", None, ("a/b",)),
    (b"/%7euser/%7Eu", b"/%7euser/%7Eu", None, ("~user", "~u")),
    (b"/a;b=c/d;e", b"/a;b=c/d;e", None, ("a;b=c", "d;e")),
    (b"/caf%C3%A9", b"/caf%C3%A9", None, ("caf\u00e9",)),
    (b"/caf\xc3\xa9", b"/caf\xc3\xa9", None, ("caf\u00e9",)),
    (b"/%FF", b"/%FF", None, ("\udcff",)),
    (b"/p?", b"/p", b"", ("p",)),
    (b"/p?a=1&a=2&b&=x;y=%2f&%zz", b"/p", b"a=1&a=2&b&=x;y=%2f&%zz", ("p",)),
    (b"/p?a?b/../c", b"/p", b"a?b/../c", ("p",)),
    (b"/a/../b?x=/..", b"/b", b"x=/..", ("b",)),
    (b"http://example.com/p/q?x=1", b"/p/q", b"x=1", ("p", "q")),
    (b"HTTPS://example.com:8443", b"/", None, ("",)),
    (b"http://example.com?x", b"/", b"x", ("",)),
]


@pytest.mark.parametrize("target,rawPath,query,segments", NORMALISE)
def test_parseTarget(target, rawPath, query, segments):
    p = parseTarget(target)
    assert (p.rawPath, p.query, p.segments) == (rawPath, query, segments)
    assert decodeSegments(p.rawPath) == segments


def test_targetRoundTrip():
    """The target sent upstream is the client's bytes when nothing needed normalising."""
    for target in (b"/a%2fB/%7E;x?b=2&a=1&a=1;c&&d", b"/x?", b"/x"):
        assert parseTarget(target).target == target
    assert parseTarget(b"/a/./b?q").target == b"/a/b?q"


BAD = [
    b"",
    b"*",
    b"a/b",
    b"/..",
    b"/../a",
    b"/a/../..",
    b"/%2e%2e/a",
    b"/a/%2E%2E/%2e%2e",
    b"/a\x00",
    b"/a\r\nX: y",
    b"/a\tb",
    b"/a b",
    b"/a\x7f",
    b"/a#frag",
    b"/a?q#frag",
    b"/a?q\x00",
    b"/%",
    b"/%4",
    b"/%g0",
    b"/a%2",
    b"/%00",
    b"ftp://h/x",
    b"http://",
    b"http:///x",
    b"example.com:443",
]


@pytest.mark.parametrize("target", BAD)
def test_badTarget(target):
    with pytest.raises(BadPath):
        parseTarget(target)


def test_badPathIsValueError():
    assert issubclass(BadPath, ValueError)


# pattern, path, matches?
MATCHES = [
    ("/p/foo*", b"/p/foobar", True),
    ("/p/foo*", b"/p/foo/x", True),
    ("/p/foo*", b"/p/foo", True),
    ("/p/foo*", b"/p/fo", False),
    ("/p/foo*", b"/P/foo", False),
    ("/p/foo*", b"/p/%66oo", True),
    # A decoded "/" inside the segment is plain text for the prefix (the decoded form matches too).
    ("/p/foo*", b"/p/foo%2Fx", True),
    ("/p/foo/*", b"/p/foo/", True),
    ("/p/foo/*", b"/p/foo/x", True),
    ("/p/foo/*", b"/p/foo/x/y", True),
    ("/p/foo/*", b"/p/foo", False),
    ("/p/foo/*", b"/p/foobar", False),
    ("/p/foo/*", b"/p/foo%2Fx", False),
    ("/p/foo/x", b"/p/foo/x", True),
    ("/p/foo/x", b"/p/foo%2Fx", False),
    ("/p/foo/x", b"/p/foo/x/", False),
    ("/p/foo/x", b"/p/foo/X", False),
    ("/p/*/x", b"/p/a/x", True),
    ("/p/*/x", b"/p//x", True),
    ("/p/*/x", b"/p/a%2Fb/x", True),
    ("/p/*/x", b"/p/a/b/x", False),
    ("/p/*/x", b"/p/a/x/y", False),
    ("/p/a*b", b"/p/ab", True),
    ("/p/a*b", b"/p/aXYb", True),
    ("/p/a*b", b"/p/aXYb/c", False),
    ("/p/a*b", b"/p/ba", False),
    ("/p/a*b*c", b"/p/abc", True),
    ("/p/a*b*c", b"/p/acb", False),
    ("/p/*/x*", b"/p/q/xyz/w", True),
    ("/a/x*y*", b"/a/xqqy", True),
    ("/a/x*y*", b"/a/xqqyz/r", True),
    ("/a/x*y*", b"/a/xq", False),
    ("/p/**", b"/p/a/b", True),
    ("*", b"/", True),
    ("*", b"/anything/at/all", True),
    ("/*", b"/", True),
    ("/", b"/", True),
    ("/", b"/a", False),
    ("/dist/x/index.js", b"/dist/x/index.js", True),
    ("/caf\u00e9/*", b"/caf%C3%A9/x", True),
    ("/100%/x", b"/100%25/x", True),
    ("  /p/x  ", b"/p/x", True),
]


@pytest.mark.parametrize("pattern,path,expected", MATCHES)
def test_patternMatches(pattern, path, expected):
    assert compilePattern(pattern).matches(parseTarget(path).segments) is expected


def test_encodedSlashNeverReachesSlashOnlyRoutes():
    """
    The invariant: a %2F request never matches a pattern that needs a real segment boundary where the %2F is,
    even though its decoded-with-slashes form does.
    """
    for pattern in ("/p/foo/*", "/p/foo/x", "/p/*/x", "/p/foo/x*"):
        p = compilePattern(pattern)
        assert p.matches(parseTarget(b"/p/foo/x").segments)
        assert not p.matches(parseTarget(b"/p/foo%2Fx").segments)
        assert not p.matches(parseTarget(b"/p/foo%2fx").segments)


# pattern -> (isExact, isPrefix, literalLength, segments)
PROPERTIES = [
    ("/p/x", True, False, 4, ("p", "x")),
    ("/p/x*", False, True, 4, ("p", "x")),
    ("/p/x/*", False, True, 5, ("p", "x", "")),
    ("/p/*/x", False, False, 3, ("p", "*", "x")),
    ("/p/a*b/c*", False, True, 4, ("p", "a*b", "c")),
    ("*", False, True, 1, ("",)),
    ("/", True, False, 1, ("",)),
    ("/p/**", False, True, 3, ("p", "")),
]


@pytest.mark.parametrize("pattern,isExact,isPrefix,literalLength,segments", PROPERTIES)
def test_patternProperties(pattern, isExact, isPrefix, literalLength, segments):
    p = compilePattern(pattern)
    assert (p.isExact, p.isPrefix, p.literalLength, p.segments) == (
        isExact,
        isPrefix,
        literalLength,
        segments,
    )
    assert p.source == pattern


def test_patternKey():
    """Patterns that match the same paths share a key (that is how conflicts are found)."""
    assert compilePattern("*").key == compilePattern("/*").key
    assert compilePattern("/p/**").key == compilePattern("/p/*").key
    assert compilePattern("/p/*").key != compilePattern("/p*").key


@pytest.mark.parametrize(
    "pattern",
    ["", "   ", "p/x", "x*", "/a?b", "/a#b", "/a\nb", "/a\x00", "/a/../b", "/a/./b", "/./a", "/a/.."],
)
def test_badPattern(pattern):
    with pytest.raises(ValueError):
        compilePattern(pattern)


@pytest.mark.parametrize("pattern", ["/100%25/x", "/%65nc/*", "/a/%2F/b", "/a%2e/*"])
def test_aPercentEscapeIsRefused(pattern):
    """Requests are matched decoded: an escape in a pattern would only match its double-encoded form (a route
    that looks servable and is never reached).  A '%' that starts no escape is the character itself
    (test_patternMatches: '/100%/x' matches a request for '/100%25/x')."""
    with pytest.raises(ValueError, match="write the character itself"):
        compilePattern(pattern)


def test_badPatternType():
    with pytest.raises(ValueError, match="string"):
        compilePattern(5)  # type: ignore[arg-type]


# pattern, path, {path}
REMAINDER = [
    ("/old/*", b"/old/a%2Fb", b"/a%2Fb"),
    ("/old/*", b"/old/", b"/"),
    ("/old/*", b"/old/x/y", b"/x/y"),
    ("/old*", b"/old", b""),
    ("/old*", b"/older/x", b"er/x"),
    ("/old*", b"/%6Fld/x", b"/x"),
    ("/old*", b"/%6fl%64er", b"er"),
    ("/a/*/b*", b"/a/zz/bc/d", b"c/d"),
    ("/a/*/*", b"/a/z%2Fz/q", b"/q"),
    ("/a/x*y*", b"/a/x1y2y/z", b"2y/z"),
    ("/caf\u00e9*", b"/caf%C3%A9s", b"s"),
    ("/*", b"/x/y", b"/x/y"),
    ("/a/b", b"/a/b", b"/a/b"),
    ("/a/*/c", b"/a/%62/c", b"/a/%62/c"),
]


@pytest.mark.parametrize("pattern,path,expected", REMAINDER)
def test_remainder(pattern, path, expected):
    p = compilePattern(pattern)
    rp = parseTarget(path)
    assert p.matches(rp.segments)
    assert p.remainder(rp.rawPath, rp.segments) == expected


STRIP_PREFIX = [
    (b"/proxy/%61pp/x%2Fy", "/proxy/app", b"/x%2Fy"),
    (b"/proxy/app", "/proxy/app", b"/"),
    (b"/proxy/app/", "/proxy/app", b"/"),
    (b"/proxy/app/", "/proxy/app/", b"/"),
    (b"/proxy/apple", "/proxy/app", b"/le"),
    (b"/proxy/ap%70", "/proxy/app", b"/"),
    (b"/proxy/app/%7e;x/a%2fb", "/proxy/app", b"/%7e;x/a%2fb"),
    (b"/proxy%2Fapp/x", "/proxy/app", None),
    (b"/proxy/app%2Fx", "/proxy/app/", None),
    (b"/other", "/proxy", None),
    (b"/Proxy/x", "/proxy", None),
    (b"/pro", "/proxy", None),
    (b"/proxy/x", "proxy", b"/x"),
    (b"/caf%C3%A9/x", "/caf\u00e9", b"/x"),
    (b"/100%25/x", "/100%", b"/x"),
    (b"/proxy/databend.playground/api/v1?x", "/proxy/databend.playground", b"/api/v1?x"),
]


@pytest.mark.parametrize("raw,prefix,expected", STRIP_PREFIX)
def test_stripPrefix(raw, prefix, expected):
    assert stripPrefix(raw, prefix) == expected


STRIP_SUFFIX = [
    (b"/a/b.json", ".json", b"/a/b"),
    (b"/a/b%2Ejson", ".json", b"/a/b"),
    (b"/a/x/y", "/y", b"/a/x"),
    (b"/a/x%2Fy", "/y", None),
    (b"/a%2fb", "b", b"/a%2f"),
    (b"/a", "/a", b"/"),
    (b"/a", "b", None),
    (b"/a", "/longer/than/a", None),
    (b"/a/b", "", None),
]


@pytest.mark.parametrize("raw,suffix,expected", STRIP_SUFFIX)
def test_stripSuffix(raw, suffix, expected):
    assert stripSuffix(raw, suffix) == expected


@pytest.mark.parametrize(
    "raw,expected",
    [(b"", b"/"), (b"x", b"/x"), (b"/a/../../b", b"/b"), (b"/a/./b/", b"/a/b/"), (b"/a%2F..", b"/a%2F..")],
)
def test_normalisePath(raw, expected):
    """Paths that directives produce: leading "/", no dot-segments, clamped at "/"."""
    assert normalisePath(raw) == expected
