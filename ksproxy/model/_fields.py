# -*- test-case-name: tests.unit.test_parse -*-
"""
Typed, path-aware reading of one raw manifest mapping.

The parser never indexes a raw dict directly: it goes through L{Fields}, which knows the field path of the
mapping (for rejections), which keys are understood (to report the rest), and refuses wrong types with
L{Invalid} instead of letting a C{TypeError} escape.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Tuple, TypeVar

import attrs

__all__: List[str] = []

# RFC 1123, as Kubernetes validates object names, namespaces and API groups.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# RFC 9110 token: what an HTTP method may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Go's time.ParseDuration units, in seconds.
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


class Invalid(Exception):
    """A field of the manifest is wrong: becomes a L{Rejection} naming C{field}."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message


@attrs.define
class Context:
    """What one parse collects besides the model: identity for messages, warnings and debug notes."""

    kind: str = ""
    name: str = ""
    warnings: List[str] = attrs.field(factory=list)
    notes: List[str] = attrs.field(factory=list)

    def _where(self) -> str:
        return f"{self.kind or '<no kind>'}/{self.name or '<unnamed>'}"

    def warn(self, field: str, message: str) -> None:
        self.warnings.append(
            f"{self._where()}: {field}: {message}" if field else f"{self._where()}: {message}"
        )

    def note(self, field: str, message: str) -> None:
        self.notes.append(f"{self._where()}: {field}: {message}" if field else f"{self._where()}: {message}")


class _Recorder:
    """
    Stands in for a L{Context} in a memoized sub-parse: remembers the warnings and notes made, so that they
    can be replayed into the context of every object that shares the result.
    """

    __slots__ = ("kind", "name", "calls")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = ""
        self.calls: List[Tuple[bool, str, str]] = []

    def warn(self, field: str, message: str) -> None:
        self.calls.append((True, field, message))

    def note(self, field: str, message: str) -> None:
        self.calls.append((False, field, message))


_T = TypeVar("_T")
_Memo = Tuple[Any, Tuple[Tuple[bool, str, str], ...], Optional[Tuple[str, str]]]
# Entries per generation; see L{Memo}.
_MEMO_LIMIT = 16384


class Memo:
    """
    Results of a pure sub-parse by a hashable key of everything it reads: the value, the warnings and notes
    it made (replayed into the caller's context, so messages still name the object being parsed), or the
    L{Invalid} it raised.

    Two generations: when the current one is full it becomes the previous one (the older is dropped), and a
    hit in the previous one is carried over.  So what the last rebuild used stays cached however large it was
    (up to C{limit}), and what no rebuild uses any more goes away: a rebuild in which every object changed in
    one field re-parses only that field, and many objects naming the same upstream parse it once.

    Safe to share between threads: entries are immutable, and a lost race only costs a recomputation.
    """

    def __init__(self, limit: int = _MEMO_LIMIT) -> None:
        self._limit = limit
        self._current: Dict[Hashable, _Memo] = {}
        self._previous: Dict[Hashable, _Memo] = {}

    def clear(self) -> None:
        self._current = {}
        self._previous = {}

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def get(self, ctx: Context, key: Hashable, compute: Callable[[Context], _T]) -> _T:
        """C{compute(recordingContext)}, or its remembered outcome for C{key}."""
        current = self._current
        entry = current.get(key)
        if entry is None:
            entry = self._previous.get(key)
            if entry is None:
                recorder: Any = _Recorder(ctx.kind)
                try:
                    entry = (compute(recorder), tuple(recorder.calls), None)
                except Invalid as e:
                    entry = (None, tuple(recorder.calls), (e.field, e.message))
            if len(current) >= self._limit:
                self._previous, self._current = current, {}
                current = self._current
            current[key] = entry
        value, calls, error = entry
        if calls:
            for isWarning, field, message in calls:
                if isWarning:
                    ctx.warn(field, message)
                else:
                    ctx.note(field, message)
        if error is not None:
            raise Invalid(*error)
        return value  # type: ignore[no-any-return]


class Cache:
    """
    Values by key, in two generations like L{Memo} (what the last rebuild used stays, what no rebuild uses goes),
    for results that report nothing and so need no replay.
    """

    def __init__(self, limit: int = _MEMO_LIMIT) -> None:
        self._limit = limit
        self._current: Dict[Hashable, Any] = {}
        self._previous: Dict[Hashable, Any] = {}

    def clear(self) -> None:
        self._current = {}
        self._previous = {}

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def get(self, key: Hashable) -> Any:
        """The value stored for C{key}, or C{None}."""
        value = self._current.get(key)
        if value is None:
            value = self._previous.get(key)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        current = self._current
        if len(current) >= self._limit:
            self._previous, self._current = current, {}
            current = self._current
        current[key] = value


def typeName(value: Any) -> str:
    """Name a raw value's type in the vocabulary of the manifest (YAML/JSON), not Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def join(path: str, key: Any) -> str:
    if key.__class__ is str:
        return f"{path}.{key}" if path else key
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Fields:
    """
    One mapping of the manifest at a known field path.

    C{known} are the keys the parser reads here, C{ignored} keys it accepts and deliberately ignores.  Any
    other key is reported when the view is made: as a debug note normally, or as a warning when the key is
    one that an enclosing mapping understands (a repeated or mis-indented key, such as C{spec.rawFrom.rawFrom}:
    the author believes it has an effect and it has none).  Pass C{known} and C{ignored} as frozensets (module
    constants) to save building them per view.
    """

    __slots__ = ("ctx", "data", "path", "known", "ignored", "parent")

    def __init__(
        self,
        ctx: Context,
        data: Any,
        path: str,
        known: Iterable[str],
        ignored: Iterable[str] = (),
        parent: Optional[Fields] = None,
    ) -> None:
        if data.__class__ is not dict and not isinstance(data, Mapping):
            raise Invalid(path, f"must be an object, not {typeName(data)}")
        self.ctx = ctx
        self.data = data
        self.path = path
        self.known = known = known if known.__class__ is frozenset else frozenset(known)
        self.ignored = ignored if ignored.__class__ is frozenset else frozenset(ignored)
        self.parent = parent
        for key in data:
            if key not in known:
                self._checkKey(key)

    def rebind(self, ctx: Context) -> Fields:
        """The same view reporting to C{ctx} (for a memoized sub-parse); its keys were checked already."""
        other = Fields.__new__(Fields)
        other.ctx = ctx
        other.data = self.data
        other.path = self.path
        other.known = self.known
        other.ignored = self.ignored
        other.parent = self.parent
        return other

    def identity(self) -> Tuple[str, Tuple[frozenset, ...]]:
        """What a sub-parse of this view depends on besides its data: the path, and the key sets up the chain."""
        chain = []
        view: Optional[Fields] = self
        while view is not None:
            chain.append(view.known)
            view = view.parent
        return (self.path, tuple(chain))

    def _checkKey(self, key: Any) -> None:
        if key in self.known:
            return
        where = join(self.path, key)
        if key in self.ignored:
            if self.data[key] is not None:
                self.ctx.note(where, "accepted and ignored (has no effect in ksproxy)")
            return
        ancestor = self.parent
        while ancestor is not None:
            if key in ancestor.known:
                self.ctx.warn(
                    where,
                    f"unknown field, ignored; {key!r} is a field of {ancestor.path or 'the object'}"
                    " (repeated or mis-indented key?)",
                )
                return
            ancestor = ancestor.parent
        self.ctx.note(where, "unknown field, ignored")

    def at(self, key: str) -> str:
        """The field path of C{key} in this mapping."""
        return join(self.path, key)

    def get(self, key: str) -> Any:
        """The raw value, with an explicit null treated as absent (as the API server prunes it)."""
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def string(self, key: str, *, required: bool = False, allowEmpty: bool = True) -> Optional[str]:
        value = self.get(key)
        if value is None:
            if required:
                raise Invalid(self.at(key), "required field is missing")
            return None
        if not isinstance(value, str):
            raise Invalid(self.at(key), f"must be a string, not {typeName(value)}")
        if not value and (required or not allowEmpty):
            raise Invalid(self.at(key), "must not be empty")
        return value

    def boolean(self, key: str) -> Optional[bool]:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise Invalid(self.at(key), f"must be a boolean (true or false), not {typeName(value)}")
        return value

    def integer(self, key: str, *, low: Optional[int] = None, high: Optional[int] = None) -> Optional[int]:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(self.at(key), f"must be an integer, not {typeName(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise Invalid(self.at(key), f"{value} is out of range {low}..{high}")
        return value

    def mapping(
        self, key: str, known: Iterable[str], ignored: Iterable[str] = (), *, required: bool = False
    ) -> Optional[Fields]:
        value = self.get(key)
        if value is None:
            if required:
                raise Invalid(self.at(key), "required field is missing")
            return None
        return Fields(self.ctx, value, self.at(key), known, ignored, parent=self)

    def list(self, key: str) -> Optional[List[Any]]:
        value = self.data.get(key)
        if value is None:
            return None
        if value.__class__ is not list and not isinstance(value, (list, tuple)):
            raise Invalid(self.at(key), f"must be a list, not {typeName(value)}")
        return list(value)

    def strings(self, key: str) -> Tuple[Tuple[str, str], ...]:
        """A list of strings, each paired with its field path (for rejections that name the index)."""
        if self.data.get(key) is None:
            return ()
        items = self.list(key) or []
        out = []
        for index, item in enumerate(items):
            where = f"{self.at(key)}[{index}]"
            if not isinstance(item, str):
                raise Invalid(where, f"must be a string, not {typeName(item)}")
            out.append((where, item))
        return tuple(out)


def checkDNSLabel(field: str, value: str, what: str = "a DNS label") -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise Invalid(
            field,
            f"{value!r} is not {what} (lower-case letters, digits and '-', starting and ending with a"
            " letter or digit, at most 63 characters)",
        )
    return value


def isDNSSubdomain(value: str) -> bool:
    return (
        len(value) <= 253
        and _DNS_SUBDOMAIN.fullmatch(value) is not None
        and (len(value) <= 63 or all(len(p) <= 63 for p in value.split(".")))
    )


def checkDNSSubdomain(field: str, value: str, what: str = "a DNS subdomain name") -> str:
    if not isDNSSubdomain(value):
        raise Invalid(
            field,
            f"{value!r} is not {what} (lower-case letters, digits, '-' and '.', each dot-separated part"
            " starting and ending with a letter or digit, at most 253 characters)",
        )
    return value


def isToken(value: str) -> bool:
    return bool(_TOKEN.fullmatch(value))


def timestamp(value: Any, field: str) -> str:
    """C{creationTimestamp} as an RFC 3339 string; YAML loaders turn unquoted timestamps into datetimes."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.isoformat(timespec="seconds") + "Z"
    raise Invalid(field, f"must be an RFC 3339 timestamp string, not {typeName(value)}")


def parseDuration(value: Any) -> float:
    """
    Seconds from a Go duration string ("10s", "1m30s", "500ms", "1.5h", "0") or a plain number of seconds.

    Strings follow Go's C{time.ParseDuration}: a unit is required on every number but a bare "0".

    @raise ValueError: on anything else, with a message that shows the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(
            f"a duration must be a string like '10s' or a number of seconds, not {typeName(value)}"
        )
    if isinstance(value, (int, float)):
        seconds = float(value)
        if math.isnan(seconds) or math.isinf(seconds):
            raise ValueError(f"{value!r} is not a finite duration")
        return seconds
    if not isinstance(value, str):
        raise ValueError(
            f"a duration must be a string like '10s' or a number of seconds, not {typeName(value)}"
        )
    text = value
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(
            f"invalid duration {value!r}: expected a Go duration such as '10s', '1m30s', '500ms'"
        )
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            hint = " (missing unit?)" if re.fullmatch(r"[0-9.]+", text) else ""
            raise ValueError(
                f"invalid duration {value!r}{hint}: expected a Go duration such as '10s', '1m30s', '500ms'"
                " (units ns, us, ms, s, m, h)"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if math.isinf(total):
        raise ValueError(f"duration {value!r} is too large")
    return sign * total
