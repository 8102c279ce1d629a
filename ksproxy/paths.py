"""
Request paths: parsing the request target, normalising it, and matching it against path patterns (SPEC 2.1).

Two forms of a path travel together.  The I{raw} path is the client's bytes (with dot-segments removed) and
is what goes upstream, so escapes, the case of hex digits, C{;} and the query survive byte for byte.  The
I{segments} are the raw path split at literal C{/} and then percent-decoded; matching uses them only.  An
encoded slash (C{%2F}) therefore stays inside its segment and can never reach a route that its decoded form
(with a real C{/}) would reach.

Choices where the SPEC is silent:
 - Segments are decoded as UTF-8 with C{surrogateescape}: a non-UTF-8 path is not an error (upstreams may
   accept Latin-1 paths); its bad bytes never equal a literal character of a pattern, but C{*} matches them.
 - Patterns and strip prefixes/suffixes are I{decoded} text, compared with decoded segments; C{%} in a pattern
   is a literal percent sign (KubeSphere compares patterns with Go's decoded C{URL.Path} the same way).
 - Empty segments are kept (C{/a//b} is not C{/a/b}); only dot-segments are removed.
 - A trailing C{*} is a plain prefix on what precedes it.  Its last (partial) segment is compared with the
   request segment at the same position as a string prefix; a decoded C{/} inside that request segment is an
   ordinary character there.  Since a pattern segment never contains C{/}, the prefix can only cover text in
   front of the first decoded C{/}, text that the decoded-with-slashes form would match as well: C{/p/foo*}
   matches C{/p/foo%2Fx} (as it matches C{/p/foo/x}), while C{/p/foo/*} and C{/p/foo/x} do not.
 - A C{*} elsewhere matches any run of characters (possibly empty) inside one segment, decoded C{/} included:
   C{/p/*/x} matches C{/p/a%2Fb/x}, one segment, and not C{/p/a/b/x}.
"""

from __future__ import annotations

import functools
import re
from typing import List, Optional, Tuple, Union
from urllib.parse import unquote_to_bytes

import attrs

__all__ = [
    "BadPath",
    "RequestPath",
    "PathPattern",
    "parseTarget",
    "compilePattern",
    "stripPrefix",
    "stripSuffix",
    "decodeSegments",
    "normalisePath",
    "globMatch",
]


class BadPath(ValueError):
    """The request target cannot be served: the gateway answers 400."""


_HEXDIGITS = b"0123456789abcdefABCDEF"
# Bytes allowed anywhere in a request target: everything but controls, space, DEL and "#" (a fragment is
# never sent).  Other bytes that RFC 3986 would want escaped are passed through, as lenient servers do.
_TARGET_OK = bytes(b for b in range(256) if b > 0x20 and b != 0x7F and b != 0x23)
_SLASH = 0x2F
_PERCENT = 0x25
# A decoded unit that stands for an encoded slash: never equal to any byte of a prefix or suffix.
_ENCODED_SLASH = 0x100


@attrs.frozen
class RequestPath:
    """
    A parsed, normalised request target.

    @ivar rawPath: the client's path bytes with dot-segments removed, otherwise byte for byte.
    @ivar query: the raw query without "?"; None when the target had no "?", b"" when it had "?" alone.
    @ivar segments: C{rawPath} split at literal "/" (the leading one dropped), each segment percent-decoded.
    """

    rawPath: bytes
    query: Optional[bytes]
    segments: Tuple[str, ...]

    @property
    def target(self) -> bytes:
        """The origin-form target to send upstream."""
        if self.query is None:
            return self.rawPath
        return self.rawPath + b"?" + self.query


def _checkEscapes(raw: bytes) -> None:
    i = raw.find(b"%")
    while i >= 0:
        digits = raw[i + 1 : i + 3]
        if len(digits) != 2 or digits.translate(None, _HEXDIGITS):
            raise BadPath(f"bad percent-encoding at byte {i} of the path")
        if digits == b"00":
            raise BadPath("the path contains an encoded NUL (%00)")
        i = raw.find(b"%", i + 3)


def _mayHaveDots(raw: bytes) -> bool:
    # Every segment starts right after a "/", so a dot-segment needs one of these.
    return b"/." in raw or b"/%2e" in raw or b"/%2E" in raw


_DOT_FORMS = {b".": 1, b"%2e": 1, b"..": 2, b".%2e": 2, b"%2e.": 2, b"%2e%2e": 2}


def isDotDot(segment: bytes) -> bool:
    """Whether one raw segment is C{..}, in any of its C{%2e} spellings."""
    return len(segment) <= 6 and _DOT_FORMS.get(segment.lower()) == 2


def hasDotDot(raw: bytes) -> bool:
    """Whether the raw path C{raw} has a C{..} segment (which would remove the segment before it)."""
    return _mayHaveDots(raw) and any(isDotDot(seg) for seg in raw.split(b"/"))


def _removeDots(raw: bytes, strict: bool) -> bytes:
    """
    RFC 3986 5.2.4 on the raw bytes, segment by segment (also the C{%2e}/C{%2E} forms).  With C{strict}, a
    path that climbs above "/" raises L{BadPath}; otherwise it stays at "/" (as the RFC says).
    """
    parts = raw.split(b"/")
    out: List[bytes] = []
    last = len(parts) - 1
    for idx in range(1, len(parts)):
        seg = parts[idx]
        kind = _DOT_FORMS.get(seg.lower()) if len(seg) <= 6 else None
        if kind is None:
            out.append(seg)
            continue
        if kind == 2:
            if out:
                out.pop()
            elif strict:
                raise BadPath("the path climbs above /")
        if idx == last:
            out.append(b"")
    return b"/" + b"/".join(out)


def normalisePath(raw: bytes) -> bytes:
    """
    Make a raw path that a directive produced fit to send: a leading "/", no dot-segments (clamped at "/",
    since the client did not ask to climb), and "/" for an empty path.
    """
    if not raw:
        return b"/"
    if raw[0] != _SLASH:
        raw = b"/" + raw
    if _mayHaveDots(raw):
        raw = _removeDots(raw, strict=False)
    return raw


def decodeSegments(raw: bytes) -> Tuple[str, ...]:
    """Split a raw path (starting with "/") at literal "/" and percent-decode each segment."""
    body = raw[1:]
    if b"%" not in body:
        return tuple(body.decode("utf-8", "surrogateescape").split("/"))
    return tuple(
        (unquote_to_bytes(seg) if b"%" in seg else seg).decode("utf-8", "surrogateescape")
        for seg in body.split(b"/")
    )


def _fromAbsoluteForm(target: bytes) -> bytes:
    head = target[:8].lower()
    if head.startswith(b"http://"):
        rest = target[7:]
    elif head.startswith(b"https://"):
        rest = target[8:]
    else:
        raise BadPath("the request target is neither origin-form nor an http(s) absolute URL")
    end = len(rest)
    for sep in (b"/", b"?"):
        j = rest.find(sep)
        if 0 <= j < end:
            end = j
    if end == 0:
        raise BadPath("the absolute request target has no host")
    tail = rest[end:]
    if not tail:
        return b"/"
    if tail[0] != _SLASH:
        return b"/" + tail
    return tail


def parseTarget(target: bytes) -> RequestPath:
    """
    Parse a request target: origin-form (C{/p?q}) or absolute-form (C{http://h/p?q}, whose authority is
    dropped here).  Raise L{BadPath} for anything else (C{*}, authority-form), for controls, spaces or C{#}
    anywhere, for bad percent-encoding or an encoded NUL in the path, and for a path that climbs above "/".
    The query is not validated beyond controls: it is forwarded byte for byte.
    """
    if not target:
        raise BadPath("empty request target")
    bad = target.translate(None, _TARGET_OK)
    if bad:
        raise BadPath(f"the request target contains the byte {bad[:1]!r}")
    if target[0] != _SLASH:
        target = _fromAbsoluteForm(target)
    q = target.find(b"?")
    if q < 0:
        raw, query = target, None
    else:
        raw, query = target[:q], target[q + 1 :]
    if b"%" in raw:
        _checkEscapes(raw)
    if _mayHaveDots(raw):
        raw = _removeDots(raw, strict=True)
    return RequestPath(raw, query, decodeSegments(raw))


# --- patterns -------------------------------------------------------------------------------------------

# A compiled pattern segment: a literal string, or the pieces of a glob split at "*" (at least two).
_SegMatcher = Union[str, Tuple[str, ...]]


def globMatch(pieces: Tuple[str, ...], s: str) -> bool:
    """Does C{s} match the glob whose literal C{pieces} were separated by C{*}?"""
    first = pieces[0]
    last = pieces[-1]
    if len(s) < len(first) + len(last) or not s.startswith(first) or not s.endswith(last):
        return False
    pos = len(first)
    end = len(s) - len(last)
    for mid in pieces[1:-1]:
        j = s.find(mid, pos, end)
        if j < 0:
            return False
        pos = j + len(mid)
    return True


def _globPrefixEnd(pieces: Tuple[str, ...], s: str) -> int:
    """Where the leftmost-shortest match of the glob C{pieces} as a prefix of C{s} ends, or -1."""
    if not s.startswith(pieces[0]):
        return -1
    pos = len(pieces[0])
    for mid in pieces[1:]:
        j = s.find(mid, pos)
        if j < 0:
            return -1
        pos = j + len(mid)
    return pos


def _segMatches(m: _SegMatcher, seg: str) -> bool:
    if m.__class__ is str:
        return m == seg
    return globMatch(m, seg)  # type: ignore[arg-type]


def _stemEnd(m: _SegMatcher, seg: str) -> int:
    """For a trailing-"*" pattern: where its last (partial) segment ends inside C{seg}, or -1."""
    if m.__class__ is str:
        return len(m) if seg.startswith(m) else -1  # type: ignore[arg-type]
    return _globPrefixEnd(m, seg)  # type: ignore[arg-type]


def _rawOffset(rawSeg: bytes, decodedBytes: int) -> int:
    """The offset in C{rawSeg} just after its first C{decodedBytes} decoded bytes."""
    i = 0
    n = len(rawSeg)
    while decodedBytes > 0 and i < n:
        digits = rawSeg[i + 1 : i + 3]
        if rawSeg[i] == _PERCENT and len(digits) == 2 and not digits.translate(None, _HEXDIGITS):
            i += 3
        else:
            i += 1
        decodedBytes -= 1
    return i


@attrs.frozen
class PathPattern:
    """
    A compiled matcher path (SPEC 2.1).

    @ivar segments: the pattern's segments; for a trailing-C{*} pattern the last one is the partial segment
        in front of the C{*} (C{/p/foo/*} -> ("p", "foo", "")).
    @ivar isExact: no C{*} at all.
    @ivar isPrefix: ends with C{*}.
    @ivar literalLength: characters before the first C{*} (precedence key).
    """

    source: str
    segments: Tuple[str, ...]
    isExact: bool
    isPrefix: bool
    literalLength: int
    matchers: Tuple[_SegMatcher, ...] = attrs.field(repr=False, eq=False)

    @property
    def key(self) -> Tuple[Tuple[str, ...], bool]:
        """Two patterns with the same key match exactly the same paths (conflict identity)."""
        return (self.segments, self.isPrefix)

    def matches(self, segments: Tuple[str, ...]) -> bool:
        ms = self.matchers
        n = len(ms)
        if self.isPrefix:
            if len(segments) < n:
                return False
            for i in range(n - 1):
                if not _segMatches(ms[i], segments[i]):
                    return False
            return _stemEnd(ms[-1], segments[n - 1]) >= 0
        if len(segments) != n:
            return False
        for i in range(n):
            if not _segMatches(ms[i], segments[i]):
                return False
        return True

    def remainder(self, rawPath: bytes, segments: Tuple[str, ...]) -> bytes:
        """
        The rewrite placeholder C{{path}} (SPEC 4.3) for a path this pattern matches: for C{P*}, C{rawPath}
        without the raw extent that C{P} (less a trailing "/") covers; for any other pattern, C{rawPath}.
        C{segments} must be the decoded segments of C{rawPath}.
        """
        if not self.isPrefix:
            return rawPath
        n = len(self.matchers)
        rawSegs = rawPath.split(b"/")
        # Offset of the "/" in front of the segment holding the partial last pattern segment.
        start = n - 1 + sum(len(rawSegs[j]) for j in range(1, n))
        stem = self.matchers[-1]
        if stem == "":
            return rawPath[start:]
        seg = segments[n - 1]
        end = _stemEnd(stem, seg)
        decoded = len(seg[:end].encode("utf-8", "surrogateescape"))
        return rawPath[start + 1 + _rawOffset(rawSegs[n], decoded) :]


_PATTERN_BAD = frozenset(chr(c) for c in range(0x20)) | {"\x7f", "?", "#"}
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def escapeInRoutePath(path: str) -> Optional[str]:
    """
    The first percent-escape in a route path (a matcher, a bundle link, a non-resource URL), or None.  Requests
    are matched on their decoded segments (SPEC 2.1), so C{/%65nc} in a route would only ever match a request
    for C{/%2565nc}: accepted, it would look servable and be unreachable.
    """
    m = _ESCAPE.search(path)
    return m.group(0) if m else None



def compilePattern(pattern: str) -> PathPattern:
    """
    Compile a matcher path: C{/exact}, C{/prefix*}, C{/a/*/b} (one segment), or combinations.  C{*} alone is
    KubeSphere's "everything" and means C{/*}.  Surrounding whitespace is ignored; runs of C{*} count as one.
    Raises C{ValueError} with a message for anything else.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"path pattern must be a string, not {type(pattern).__name__}")
    return _compilePattern(pattern)


# Large enough for every matcher of a 10,000-object table plus its next version: the parser compiles each
# pattern to validate it, and the table compiler finds it here instead of compiling it again.
@functools.lru_cache(maxsize=32768)
def _compilePattern(pattern: str) -> PathPattern:
    source = pattern.strip()
    if not source:
        raise ValueError("empty path pattern")
    bad = [c for c in source if c in _PATTERN_BAD]
    if bad:
        raise ValueError(f"path pattern {source!r} contains {bad[0]!r} (a matcher has no query or fragment)")
    escape = escapeInRoutePath(source)
    if escape is not None:
        raise ValueError(
            f"path pattern {source!r} contains the escape {escape!r}: requests are matched on their decoded path, "
            "so write the character itself"
        )
    body = "/*" if source == "*" else source
    if not body.startswith("/"):
        raise ValueError(f"path pattern {source!r} must start with '/'")
    while "**" in body:
        body = body.replace("**", "*")
    isPrefix = body.endswith("*")
    star = body.find("*")
    literalLength = len(body) if star < 0 else star
    segs = (body[1:-1] if isPrefix else body[1:]).split("/")
    matchers: List[_SegMatcher] = []
    for i, seg in enumerate(segs):
        isStem = isPrefix and i == len(segs) - 1
        if not isStem and seg in (".", ".."):
            raise ValueError(
                f"path pattern {source!r} contains the dot-segment {seg!r}, which a normalised request path never has"
            )
        matchers.append(tuple(seg.split("*")) if "*" in seg else seg)
    return PathPattern(
        source=source,
        segments=tuple(segs),
        isExact=star < 0,
        isPrefix=isPrefix,
        literalLength=literalLength,
        matchers=tuple(matchers),
    )


# --- strip prefix / suffix ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _affixBytes(text: str, leadingSlash: bool) -> bytes:
    if leadingSlash and not text.startswith("/"):
        text = "/" + text
    return text.encode("utf-8", "surrogateescape")


def _decodedPrefixEnd(raw: bytes, prefix: bytes) -> Optional[int]:
    """Where the raw bytes covering the decoded C{prefix} end in C{raw}, or None if C{raw} does not start so."""
    if b"%" not in raw:
        return len(prefix) if raw.startswith(prefix) else None
    i = 0
    n = len(raw)
    for want in prefix:
        if i >= n:
            return None
        c = raw[i]
        digits = raw[i + 1 : i + 3] if c == _PERCENT else b""
        if len(digits) == 2 and not digits.translate(None, _HEXDIGITS):
            d = int(digits, 16)
            if d == _SLASH or d != want:
                # An encoded slash never stands for a segment boundary.
                return None
            i += 3
        else:
            if c != want:
                return None
            i += 1
    return i


def _decodedUnits(raw: bytes) -> Tuple[List[int], List[int]]:
    """Decoded bytes of C{raw} (an encoded slash as L{_ENCODED_SLASH}) and the raw offset of each."""
    units: List[int] = []
    offsets: List[int] = []
    i = 0
    n = len(raw)
    while i < n:
        offsets.append(i)
        c = raw[i]
        digits = raw[i + 1 : i + 3]
        if c == _PERCENT and len(digits) == 2 and not digits.translate(None, _HEXDIGITS):
            d = int(digits, 16)
            units.append(_ENCODED_SLASH if d == _SLASH else d)
            i += 3
        else:
            units.append(c)
            i += 1
    return units, offsets


def stripPrefix(rawPath: bytes, prefix: str) -> Optional[bytes]:
    """
    SPEC 4.1 step 2: if the decoded path starts with C{prefix} (a plain string prefix, as Caddy and
    KubeSphere do; a missing leading "/" is added to C{prefix}), cut the raw bytes that cover it, so escapes
    in the rest survive.  C{/proxy/%61pp/x%2Fy} minus C{/proxy/app} is C{/x%2Fy}.  An empty rest is "/", and
    a rest that does not start with "/" gets one.  None when the path does not start with C{prefix}.
    """
    p = _affixBytes(prefix, True)
    end = _decodedPrefixEnd(rawPath, p)
    if end is None:
        return None
    rest = rawPath[end:]
    if not rest:
        return b"/"
    if rest[0] != _SLASH:
        return b"/" + rest
    return rest


def stripSuffix(rawPath: bytes, suffix: str) -> Optional[bytes]:
    """The mirror of L{stripPrefix} at the end of the path; None when it does not end with C{suffix}."""
    s = _affixBytes(suffix, False)
    if not s:
        return None
    if b"%" not in rawPath:
        if not rawPath.endswith(s):
            return None
        cut = len(rawPath) - len(s)
    else:
        units, offsets = _decodedUnits(rawPath)
        k = len(units) - len(s)
        if k < 0 or units[k:] != list(s):
            return None
        cut = offsets[k]
    return rawPath[:cut] or b"/"
