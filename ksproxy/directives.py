"""
ReverseProxy directives (SPEC 4.1-4.3): compiled once when a resource is loaded, applied per request.

Everything that can be wrong with a rule is found by the C{compile*} functions, which raise C{ValueError}
with a message fit for a rejection; the C{apply*} functions never parse, and fail only with L{BadPath} (a
400) when the request's own bytes would form a C{..} segment in a path that a directive built.

Choices where the SPEC is silent:
 - Templates: C{{{} and C{}}} are a literal brace (Python's convention); a lone C{}} or an unclosed C{{} is
   an error.  C{{http.request.method}} and C{{http.request.host}} are accepted as aliases of C{{method}} and
   C{{host}}.  C{{http.request.header.NAME}} joins repeated headers with "," (as Caddy does); missing is "".
 - Placeholder values are made safe for where they land, never trusted: in a header value every control
   character but HTAB is dropped (so nothing can inject CR/LF); in a path, controls, space, DEL, C{#}, C{?}
   and a C{%} that does not start an escape are percent-encoded; in a query, controls, space, DEL and C{#}
   are.  A client's raw path and query contain none of those, so they pass byte for byte.
 - In a path, every placeholder but C{{path}} and C{{http.request.uri.path}} (already normalised paths) also
   has C{/} and C{\\} percent-encoded, so its value stays inside one segment; a value that would make its
   segment C{..} (in any C{%2e} spelling) is a 400: dot-segments are removed after substitution, and that one
   would take away the segment the operator wrote before it.  The same holds for a C{..} that C{replace} or
   C{pathRegexp} puts together from the path (e.g. by turning C{%2F} into C{/}); a literal C{..} segment in
   their REPLACEMENT is a load-time error.
 - Header rules: KubeSphere's C{Name value} takes everything after the first space as the value
   (C{Cache-Control no-cache, no-store} sets one header), so the two-argument C{Name search replacement}
   form that KubeSphere's Go type comments mention (and its gateway never implemented) is I{not} supported:
   it would silently change what such rules mean.  C{Name:} alone sets an empty value; C{Name} alone is an
   error.  C{-*} (delete everything) and setting C{Content-Length} / C{Transfer-Encoding} are errors: the
   forwarder owns message framing.
 - Rewrite: rules are tried in order and the first whose PATTERN matches is applied (one rewrite per
   request).  A TARGET that is only C{?query} keeps the path.  A query that renders empty is dropped (no
   bare C{?}).
 - C{replace} works on the raw path only (KubeSphere also touched the query; SPEC 4.1 says path).
 - C{pathRegexp} runs on the raw path (decoded as UTF-8 with surrogateescape, so it round-trips).  Go's
   C{$name} takes the longest run of letters, digits and C{_} (C{$1x} is group "1x"); a reference to a
   group the regex does not have is a load-time error (Go would insert ""), so write C{${1}x}.
 - After any directive changes the path it is normalised again: a leading "/", no dot-segments (clamped at
   "/"), "/" when empty.  Placeholders read the view as it is when the directive runs.
"""

from __future__ import annotations

import functools
import re
from typing import List, Optional, Sequence, Tuple, Union

import attrs

from ksproxy.http.headers import Headers
from ksproxy.model.types import Directives, HeaderRule, RegexpRule, RewriteRule, Template
from ksproxy.paths import (
    BadPath,
    PathPattern,
    compilePattern,
    decodeSegments,
    hasDotDot,
    isDotDot,
    normalisePath,
    stripPrefix,
    stripSuffix,
)

__all__ = [
    "RequestView",
    "compileTemplate",
    "compileHeaderRule",
    "compileRewriteRule",
    "compileReplaceRule",
    "compileRegexpRule",
    "renderTemplate",
    "applyRequestDirectives",
    "applyHeaderRules",
]


@attrs.define
class RequestView:
    """The parts of the upstream request that directives read and change."""

    method: bytes
    host: bytes
    rawPath: bytes
    query: Optional[bytes]
    headers: Headers


# --- templates ------------------------------------------------------------------------------------------

# Op codes of a compiled template.
_LIT, _PATH, _URIPATH, _QUERY, _METHOD, _HOST, _HEADER = range(7)
_Op = Tuple[int, bytes]

_NAMES = {
    "path": _PATH,
    "http.request.uri.path": _URIPATH,
    "query": _QUERY,
    "http.request.uri.query": _QUERY,
    "method": _METHOD,
    "http.request.method": _METHOD,
    "host": _HOST,
    "http.request.host": _HOST,
}
_HEADER_PREFIX = "http.request.header."
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Where a rendered value goes: decides literal checks and how placeholder values are made safe.
_CTX_HEADER, _CTX_PATH, _CTX_QUERY = "header", "path", "query"

_CTL = bytes(range(0x20)) + b"\x7f"
_NOT_CTL = bytes(b for b in range(256) if b not in _CTL)
_HEADER_DROP = _CTL.replace(b"\t", b"")
_HEADER_OK = bytes(b for b in range(256) if b not in _HEADER_DROP)
_QUERY_BAD = _CTL + b" #"
_QUERY_OK = bytes(b for b in range(256) if b not in _QUERY_BAD)
_PATH_BAD = _QUERY_BAD + b"?"
_PATH_OK = bytes(b for b in range(256) if b not in _PATH_BAD)
# A value that is not itself a path (header, query, host, method) must stay inside its segment: "/" would
# start a new one, and some upstreams take "\\" for "/".
_SEGMENT_BAD = _PATH_BAD + b"/\\"
_SEGMENT_OK = bytes(b for b in range(256) if b not in _SEGMENT_BAD)
_HEXDIGITS = b"0123456789abcdefABCDEF"


@attrs.frozen
class _CompiledTemplate(Template):
    """A L{Template} with its render program precomputed (for one context)."""

    ops: Tuple[_Op, ...] = attrs.field(default=(), eq=False, repr=False)
    context: str = attrs.field(default=_CTX_HEADER, eq=False, repr=False)
    constant: Optional[bytes] = attrs.field(default=None, eq=False, repr=False)


def _placeholderCode(name: str, text: str) -> Tuple[str, _Op]:
    code = _NAMES.get(name)
    if code is not None:
        return name, (code, b"")
    if name.startswith(_HEADER_PREFIX):
        header = name[len(_HEADER_PREFIX) :]
        if header and all(c in _TCHAR for c in header):
            lname = header.lower()
            return _HEADER_PREFIX + lname, (_HEADER, lname.encode("ascii"))
        raise ValueError(f"placeholder {{{name}}} in {text!r}: {header!r} is not a valid header name")
    raise ValueError(
        f"unknown placeholder {{{name}}} in {text!r} (known: {{path}}, {{query}}, {{method}}, {{host}}, "
        "{http.request.uri.path}, {http.request.uri.query}, {http.request.header.NAME}; write {{ for a "
        "literal brace)"
    )


def _percentEncode(data: bytes, bad: bytes) -> bytes:
    return b"".join(b"%%%02X" % c if c in bad or c > 0x7F else bytes((c,)) for c in data)


def _encodeLiteral(text: str, ctx: str, source: str) -> bytes:
    data = text.encode("utf-8")
    controls = data.translate(None, _NOT_CTL)
    if ctx == _CTX_HEADER:
        controls = controls.replace(b"\t", b"")
    if controls:
        raise ValueError(f"{source!r} contains the control character {controls[:1]!r}")
    if ctx == _CTX_HEADER:
        return data
    if b"#" in data:
        raise ValueError(f"{source!r} contains '#': a fragment is never sent upstream")
    i = data.find(b"%")
    while i >= 0:
        digits = data[i + 1 : i + 3]
        if len(digits) != 2 or digits.translate(None, _HEXDIGITS):
            raise ValueError(f"{source!r} has a '%' that does not start an escape (write %25)")
        i = data.find(b"%", i + 3)
    # Spaces and non-ASCII characters are written the way they must appear on the wire.
    return _percentEncode(data, b" ") if (b" " in data or not data.isascii()) else data


def _compileTemplate(text: str, ctx: str) -> _CompiledTemplate:
    if not isinstance(text, str):
        raise ValueError(f"template must be a string, not {type(text).__name__}")
    for c in ("\r", "\n", "\0"):
        if c in text:
            raise ValueError(f"{text!r} contains {c!r}")
    parts: List[Union[str, Tuple[str]]] = []
    ops: List[_Op] = []
    buf: List[str] = []

    def flush() -> None:
        if buf:
            literal = "".join(buf)
            parts.append(literal)
            ops.append((_LIT, _encodeLiteral(literal, ctx, text)))
            buf.clear()

    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "{":
            if text.startswith("{{", i):
                buf.append("{")
                i += 2
                continue
            j = text.find("}", i + 1)
            if j < 0:
                raise ValueError(f"unclosed '{{' in {text!r} (write {{{{ for a literal brace)")
            name, op = _placeholderCode(text[i + 1 : j], text)
            flush()
            parts.append((name,))
            ops.append(op)
            i = j + 1
        elif c == "}":
            if text.startswith("}}", i):
                buf.append("}")
                i += 2
                continue
            raise ValueError(f"single '}}' in {text!r} (write }}}} for a literal brace)")
        else:
            buf.append(c)
            i += 1
    flush()
    constant = None
    if not ops:
        constant = b""
    elif len(ops) == 1 and ops[0][0] == _LIT:
        constant = ops[0][1]
    return _CompiledTemplate(source=text, parts=tuple(parts), ops=tuple(ops), context=ctx, constant=constant)


def compileTemplate(text: str) -> Template:
    """
    Compile a header-value template (SPEC 4.3 placeholders).  Unknown placeholders, a bad header name in
    C{{http.request.header.NAME}} and control characters are C{ValueError}s.
    """
    return _compileTemplate(text, _CTX_HEADER)


@functools.lru_cache(maxsize=1024)
def _opsOf(template: Template, ctx: str) -> _CompiledTemplate:
    # Templates built elsewhere (not by this module) are compiled once, here.
    return _compileTemplate(template.source, ctx)


def _safeHeader(value: bytes) -> bytes:
    if value.translate(None, _HEADER_OK):
        return value.translate(None, _HEADER_DROP)
    return value


def _safeQuery(value: bytes) -> bytes:
    if value.translate(None, _QUERY_OK):
        return b"".join(b"%%%02X" % c if c in _QUERY_BAD else bytes((c,)) for c in value)
    return value


def _validEscapes(value: bytes) -> bool:
    i = value.find(b"%")
    while i >= 0:
        digits = value[i + 1 : i + 3]
        if len(digits) != 2 or digits.translate(None, _HEXDIGITS):
            return False
        i = value.find(b"%", i + 3)
    return True


def _safePath(value: bytes, ok: bytes = _PATH_OK, bad: bytes = _PATH_BAD) -> bytes:
    if not value.translate(None, ok) and (b"%" not in value or _validEscapes(value)):
        return value
    out = []
    for i, c in enumerate(value):
        if c in bad:
            out.append(b"%%%02X" % c)
        elif c == 0x25:
            digits = value[i + 1 : i + 3]
            ok = len(digits) == 2 and not digits.translate(None, _HEXDIGITS)
            out.append(b"%" if ok else b"%25")
        else:
            out.append(bytes((c,)))
    return b"".join(out)


def _safeSegment(value: bytes) -> bytes:
    return _safePath(value, _SEGMENT_OK, _SEGMENT_BAD)


_SAFE = {_CTX_HEADER: _safeHeader, _CTX_PATH: _safePath, _CTX_QUERY: _safeQuery}


def _onlyDots(value: bytes) -> bool:
    """True when C{value} is made of C{.} and C{%2e} alone: only such a value can be part of a dot-segment."""
    return not value.replace(b"%2e", b"").replace(b"%2E", b"").strip(b".")


def _formsDotDot(out: bytes, start: int, end: int) -> bool:
    """Whether C{out[start:end]} lies in a C{..} segment (in any C{%2e} spelling) of the path C{out}."""
    left = out.rfind(b"/", 0, start) + 1
    right = out.find(b"/", end)
    return isDotDot(out[left : right if right >= 0 else len(out)])


def _render(t: Template, ctx: str, view: RequestView, pathValue: bytes) -> bytes:
    ct = t if t.__class__ is _CompiledTemplate and t.context == ctx else _opsOf(t, ctx)  # type: ignore[attr-defined]
    constant = ct.constant  # type: ignore[attr-defined]
    if constant is not None:
        return constant
    safe = _SAFE[ctx]
    out = []
    dotty: List[int] = []  # indexes in out of client values that could be (part of) a dot-segment
    for code, arg in ct.ops:  # type: ignore[attr-defined]
        if code == _LIT:
            out.append(arg)
            continue
        if code == _PATH:
            v = pathValue
        elif code == _URIPATH:
            v = view.rawPath
        else:
            if code == _QUERY:
                v = view.query or b""
            elif code == _METHOD:
                v = view.method
            elif code == _HOST:
                v = view.host
            else:
                v = b",".join(view.headers.getAll(arg))
            if ctx == _CTX_PATH:
                # The path-valued placeholders are normalised paths; every other value comes from the client
                # and must not leave its segment nor form "..", which would remove what the operator wrote.
                v = _safeSegment(v)
                if v and _onlyDots(v):
                    dotty.append(len(out))
                out.append(v)
                continue
        out.append(safe(v))
    if not dotty:
        return b"".join(out)
    rendered = b"".join(out)
    for index in dotty:
        start = sum(len(piece) for piece in out[:index])
        if _formsDotDot(rendered, start, start + len(out[index])):
            raise BadPath("a placeholder value would form a '..' segment in the rewritten path")
    return rendered


def renderTemplate(template: Template, view: RequestView) -> bytes:
    """Render a header-value template against C{view} ({path} is the current raw path)."""
    return _render(template, _CTX_HEADER, view, view.rawPath)


# --- header rules ---------------------------------------------------------------------------------------


@attrs.frozen
class _CompiledHeaderRule(HeaderRule):
    wireName: bytes = attrs.field(default=b"", eq=False, repr=False)
    lname: bytes = attrs.field(default=b"", eq=False, repr=False)


_FRAMING = frozenset({"content-length", "transfer-encoding"})


def _checkText(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, not {type(text).__name__}")
    for c in ("\r", "\n", "\0"):
        if c in text:
            raise ValueError(f"{what} {text!r} contains {c!r}")
    return text.strip()


def compileHeaderRule(text: str) -> HeaderRule:
    """
    Compile a header rule (SPEC 4.2): C{Name: value} or C{Name value} sets, C{+Name value} appends,
    C{-Name} deletes, C{-Prefix*} deletes by name prefix.  A value may be wrapped in double quotes and may hold
    placeholders.  Names are stored lower-case; the spelling as written is what goes on the wire.
    """
    s = _checkText(text, "header rule")
    if not s:
        raise ValueError("empty header rule")
    op = "set"
    if s[0] == "+":
        op, s = "add", s[1:]
    elif s[0] == "-":
        op, s = "delete", s[1:]
    i = 0
    while i < len(s) and s[i] in _TCHAR:
        i += 1
    name, rest = s[:i], s[i:]
    if not name:
        what = f"invalid character {rest[0]!r} at the start of the header name" if rest else "no header name"
        raise ValueError(f"header rule {text!r}: {what}")
    if op == "delete":
        if rest.strip():
            raise ValueError(f"header rule {text!r}: a delete rule takes no value")
        if name.endswith("*"):
            prefix = name.rstrip("*")
            if not prefix:
                raise ValueError(f"header rule {text!r}: deleting every header is not allowed")
            if "*" in prefix:
                raise ValueError(f"header rule {text!r}: '*' is only allowed at the end of the name")
            lname = prefix.lower()
            return _CompiledHeaderRule(
                "delete_prefix", lname, None, text, wireName=prefix.encode(), lname=lname.encode()
            )
        if "*" in name:
            raise ValueError(f"header rule {text!r}: '*' is only allowed at the end of the name")
        lname = name.lower()
        return _CompiledHeaderRule("delete", lname, None, text, wireName=name.encode(), lname=lname.encode())
    if "*" in name:
        raise ValueError(f"header rule {text!r}: '*' is only allowed at the end of a delete rule's name")
    if rest.startswith(":"):
        value = rest[1:].strip(" \t")
    elif rest[:1] in (" ", "\t"):
        value = rest.strip(" \t")
        if not value:
            raise ValueError(f"header rule {text!r} has no value")
    elif not rest:
        raise ValueError(f"header rule {text!r} has no value (write 'Name: \"\"' for an empty one)")
    else:
        raise ValueError(f"header rule {text!r}: invalid character {rest[0]!r} in the header name")
    lname = name.lower()
    if lname in _FRAMING:
        raise ValueError(f"header rule {text!r}: {name} is set by the proxy from the message itself")
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    template = _compileTemplate(value, _CTX_HEADER)
    return _CompiledHeaderRule(op, lname, template, text, wireName=name.encode(), lname=lname.encode())


@functools.lru_cache(maxsize=1024)
def _headerNames(rule: HeaderRule) -> Tuple[bytes, bytes]:
    # Rules built elsewhere carry only the lower-case name: it is also what goes on the wire then.
    lname = rule.name.encode("ascii")
    return lname, lname


def applyHeaderRules(rules: Sequence[HeaderRule], headers: Headers, view: RequestView) -> None:
    """
    Apply header rules to C{headers} in order (headerUp on the upstream request, headerDown on the response);
    placeholders read C{view}, the request as it stands.
    """
    for rule in rules:
        if rule.__class__ is _CompiledHeaderRule:
            wire, lname = rule.wireName, rule.lname  # type: ignore[attr-defined]
        else:
            wire, lname = _headerNames(rule)
        op = rule.op
        if op == "set":
            headers.set(wire, _render(rule.value, _CTX_HEADER, view, view.rawPath))  # type: ignore[arg-type]
        elif op == "add":
            headers.add(wire, _render(rule.value, _CTX_HEADER, view, view.rawPath))  # type: ignore[arg-type]
        elif op == "delete":
            headers.remove(lname)
        else:
            headers.removePrefix(lname)


# --- path rules -----------------------------------------------------------------------------------------


def _splitFields(text: str, what: str) -> List[str]:
    """Split at spaces and tabs; a field wrapped in double quotes may hold spaces (or be empty)."""
    s = _checkText(text, what)
    fields: List[str] = []
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c in " \t":
            i += 1
        elif c == '"':
            j = s.find('"', i + 1)
            if j < 0:
                raise ValueError(f"{what} {text!r}: unclosed double quote")
            fields.append(s[i + 1 : j])
            i = j + 1
            if i < n and s[i] not in " \t":
                raise ValueError(f"{what} {text!r}: text right after a closing quote")
        else:
            j = i
            while j < n and s[j] not in " \t":
                j += 1
            fields.append(s[i:j])
            i = j
    return fields


@attrs.frozen
class _CompiledRewriteRule(RewriteRule):
    compiled: Optional[PathPattern] = attrs.field(default=None, eq=False, repr=False)


def compileRewriteRule(text: str) -> RewriteRule:
    """
    Compile C{PATTERN TARGET} (SPEC 4.3).  PATTERN is a matcher path; TARGET is a path template, optionally
    followed by C{?query} (then the query is replaced; otherwise the original query is kept byte for byte).
    """
    fields = _splitFields(text, "rewrite rule")
    if len(fields) != 2:
        raise ValueError(f"rewrite rule {text!r} must be 'PATTERN TARGET', got {len(fields)} field(s)")
    pattern = compilePattern(fields[0])
    pathText, sep, queryText = fields[1].partition("?")
    if pathText and pathText[0] not in "/{":
        raise ValueError(f"rewrite rule {text!r}: TARGET must start with '/', a placeholder or '?'")
    if not pathText and not sep:
        raise ValueError(f"rewrite rule {text!r}: empty TARGET")
    target = _compileTemplate(pathText, _CTX_PATH)
    query = _compileTemplate(queryText, _CTX_QUERY) if sep else None
    return _CompiledRewriteRule(pattern.source, target, query, text.strip(), compiled=pattern)


def _checkPathPiece(piece: str, text: str, what: str) -> None:
    if "?" in piece or "#" in piece or " " in piece:
        raise ValueError(
            f"{what} {text!r}: {piece!r} cannot contain '?', '#' or a space (it works on the path; a rewrite "
            "TARGET can set the query)"
        )
    _encodeLiteral(piece, _CTX_PATH, text)
    if any(isDotDot(seg.encode("utf-8")) for seg in piece.split("/")):
        # Refused at request time too (see _substituted): say so when the rule is loaded.
        raise ValueError(f"{what} {text!r}: {piece!r} has a '..' segment; write the path it stands for")


def compileReplaceRule(text: str) -> Tuple[str, str]:
    """Compile C{SEARCH REPLACEMENT}: a literal substring replace on the raw path (C{""} for empty)."""
    fields = _splitFields(text, "replace rule")
    if len(fields) != 2:
        raise ValueError(f"replace rule {text!r} must be 'SEARCH REPLACEMENT', got {len(fields)} field(s)")
    search, replacement = fields
    if not search:
        raise ValueError(f"replace rule {text!r}: empty SEARCH")
    for piece in fields:
        _checkPathPiece(piece, text, "replace rule")
        if not piece.isascii():
            raise ValueError(f"replace rule {text!r}: write non-ASCII characters percent-encoded")
    return (search, replacement)


def _goReplacement(repl: str, regex: re.Pattern[str], text: str) -> str:
    """Go's C{Regexp.Expand} template syntax turned into Python's C{re.sub} template."""
    out: List[str] = []
    i = 0
    n = len(repl)
    while i < n:
        c = repl[i]
        if c == "\\":
            out.append("\\\\")
            i += 1
            continue
        if c != "$":
            out.append(c)
            i += 1
            continue
        if repl.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if repl.startswith("${", i):
            j = repl.find("}", i + 2)
            name = repl[i + 2 : j] if j >= 0 else ""
            end = j + 1
        else:
            j = i + 1
            while j < n and (repl[j].isalnum() or repl[j] == "_"):
                j += 1
            name = repl[i + 1 : j]
            end = j
        if not name or not all(ch.isalnum() or ch == "_" for ch in name):
            out.append("$")  # malformed: Go keeps the "$" as text
            i += 1
            continue
        if name.isdecimal():
            if int(name) > regex.groups:
                raise ValueError(f"pathRegexp {text!r}: ${name} refers to a group the regex does not have")
            out.append(f"\\g<{int(name)}>")
        elif name in regex.groupindex:
            out.append(f"\\g<{name}>")
        else:
            raise ValueError(
                f"pathRegexp {text!r}: ${name} refers to a group the regex does not have (for group 1 followed "
                "by text, write ${1}text)"
            )
        i = end
    return "".join(out)


def compileRegexpRule(text: str) -> RegexpRule:
    """Compile C{REGEX REPLACEMENT} (Go-style C{$1} / C{${1}} / C{${name}} references)."""
    fields = _splitFields(text, "pathRegexp rule")
    if len(fields) != 2:
        raise ValueError(f"pathRegexp rule {text!r} must be 'REGEX REPLACEMENT', got {len(fields)} field(s)")
    expr, replacement = fields
    if not expr:
        raise ValueError(f"pathRegexp rule {text!r}: empty REGEX")
    try:
        regex = re.compile(expr)
    except re.error as e:
        raise ValueError(f"pathRegexp rule {text!r}: invalid regular expression: {e}") from None
    _checkPathPiece(replacement, text, "pathRegexp rule")
    if not replacement.isascii():
        raise ValueError(f"pathRegexp rule {text!r}: write non-ASCII characters percent-encoded")
    return RegexpRule(regex, _goReplacement(replacement, regex, text), text.strip())


# --- applying -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _methodBytes(method: str) -> bytes:
    return method.upper().encode("ascii")


@functools.lru_cache(maxsize=1024)
def _replaceBytes(search: str, replacement: str) -> Tuple[bytes, bytes]:
    return search.encode("utf-8"), replacement.encode("utf-8")


def _patternOf(rule: RewriteRule) -> PathPattern:
    compiled = getattr(rule, "compiled", None)
    return compiled if compiled is not None else compilePattern(rule.pattern)


def _applyRewrite(rule: RewriteRule, view: RequestView) -> bool:
    pattern = _patternOf(rule)
    raw = view.rawPath
    segments = decodeSegments(raw)
    if not pattern.matches(segments):
        return False
    pathValue = pattern.remainder(raw, segments)
    # Render both parts before changing anything: each reads the request as it was.
    newPath = _render(rule.target, _CTX_PATH, view, pathValue) if rule.target.source else None
    if rule.query is not None:
        view.query = _render(rule.query, _CTX_QUERY, view, pathValue) or None
    if newPath is not None:
        view.rawPath = normalisePath(newPath)
    return True


def applyRequestDirectives(d: Directives, view: RequestView) -> None:
    """
    Apply a ReverseProxy's request directives to C{view} in SPEC 4.1 order: method, strip prefix/suffix,
    headerUp, rewrite, replace, pathRegexp.  (authProxy and headerDown belong to the forwarder.)
    """
    if d.method:
        view.method = _methodBytes(d.method)
    if d.stripPathPrefix:
        stripped = stripPrefix(view.rawPath, d.stripPathPrefix)
        if stripped is not None:
            view.rawPath = normalisePath(stripped)
    if d.stripPathSuffix:
        stripped = stripSuffix(view.rawPath, d.stripPathSuffix)
        if stripped is not None:
            view.rawPath = normalisePath(stripped)
    if d.headerUp:
        applyHeaderRules(d.headerUp, view.headers, view)
    for rule in d.rewrite:
        if _applyRewrite(rule, view):
            break
    for search, replacement in d.replace:
        s, r = _replaceBytes(search, replacement)
        if s in view.rawPath:
            view.rawPath = _substituted(view.rawPath.replace(s, r), "replace")
    for rr in d.pathRegexp:
        before = view.rawPath.decode("utf-8", "surrogateescape")
        after = rr.pattern.sub(rr.replacement, before)  # type: ignore[attr-defined]
        if after != before:
            view.rawPath = _substituted(after.encode("utf-8", "surrogateescape"), "pathRegexp")


def _substituted(raw: bytes, what: str) -> bytes:
    # The path was free of dot-segments before the substitution, and a literal ".." in a REPLACEMENT is
    # refused at load time, so a ".." here was put together from the client's bytes (an unescaped "%2F", a
    # group): removing it would let the client take away what the operator wrote.
    if hasDotDot(raw):
        raise BadPath(f"{what} would make a '..' segment of the path")
    return normalisePath(raw)
