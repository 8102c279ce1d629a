# -*- test-case-name: tests.unit.test_inventory -*-
"""
The reactor-side inventory: every object a source has delivered, parsed once, with the rules of SPEC 1.5.

A source (a directory, or a Kubernetes watch) hands raw objects in; the inventory turns them into models
through L{ksproxy.model.parse.parseResource}, remembers the last good version of each object, and hands out
immutable L{InventorySnapshot}s.  It never lets bad input take routes away: an object updated to something
invalid keeps serving its last good version, and a file that fails to load keeps every object it held until
it loads again or is deleted.

Everything here runs on the reactor thread, with one exception: L{Inventory.plan} (the work of a
L{Inventory.replaceAll}) may run in a source's thread, and its result is installed on the reactor by
L{Inventory.commit} in constant time, so that a large file change does not stall requests.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import pickle
import re
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs

from ksproxy.model.parse import ParseResult, parseResource
from ksproxy.model.types import Rejection, Resource

__all__ = [
    "REF_KINDS",
    "SourceDocument",
    "SourceError",
    "ObjectRecord",
    "InventorySnapshot",
    "Inventory",
    "ReplacePlan",
    "originPath",
    "originSortKey",
]

# Core kinds kept as byte stores for JSBundle references (SPEC 1.4).
REF_KINDS = ("ConfigMap", "Secret")
# Namespace of a ConfigMap/Secret manifest that names none (what `kubectl apply` does with no context).
DEFAULT_NAMESPACE = "default"

RefKey = Tuple[str, str, str]
ObjectKey = Tuple[str, str]


@attrs.frozen
class SourceDocument:
    """One raw object and where it came from (C{"dir/a.yaml#2"}, C{"kubernetes"})."""

    origin: str
    raw: Mapping[str, Any]


@attrs.frozen
class SourceError:
    """
    A piece of input that could not be read at all (a file that is not YAML, not UTF-8, unreadable...).

    @ivar origin: the file (or directory) path.  Objects that came from it keep serving (SPEC 1.5).
    @ivar message: a full line for logs, starting with the path and line (C{"dir/bad.yaml:12: ..."}).
    @ivar line: 1-based line of the problem, when known.
    """

    origin: str
    message: str
    line: Optional[int] = None

    def __str__(self) -> str:
        return self.message


@attrs.frozen
class ObjectRecord:
    """
    The state of one (kind, name).

    @ivar current: the model being served: the latest accepted version, or the last good one.
    @ivar rejection: why the latest version was rejected, if it was.
    @ivar stale: C{current} is older than the latest input (the latest version was rejected, or its file
        failed to load).
    """

    kind: str
    name: str
    origin: str
    current: Optional[Resource]
    rejection: Optional[Rejection]
    stale: bool
    warnings: Tuple[str, ...]
    notes: Tuple[str, ...] = ()  # debug-level parse notes (unknown fields and the like)
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)  # the latest input object


@attrs.frozen(eq=False)
class InventorySnapshot:
    """
    An immutable view of the inventory at one moment; safe to keep while the inventory moves on.

    @ivar resources: every served model (records' C{current}), sorted by (kind, name).
    @ivar duplicates: file source only: "the same kind and name twice" conflicts (the first by file path,
        then document index, wins).
    @ivar skipped: documents that are not ours (other kinds, other apiVersions, console-served proxies).
    @ivar refs: ConfigMap/Secret contents: C{(kind, namespace, name) -> key -> bytes}.
    @ivar refErrors: ConfigMap/Secret entries that could not be decoded (left out of C{refs}).
    """

    records: Mapping[ObjectKey, ObjectRecord]
    resources: Tuple[Resource, ...]
    duplicates: Tuple[str, ...]
    skipped: Tuple[str, ...]
    sourceErrors: Tuple[SourceError, ...]
    refs: Mapping[RefKey, Mapping[str, bytes]]
    refErrors: Tuple[str, ...] = ()

    @property
    def rejections(self) -> Tuple[Rejection, ...]:
        """The rejection of every object whose latest version was rejected."""
        return tuple(r.rejection for r in self.records.values() if r.rejection is not None)


_ORIGIN_NUMBERS = re.compile(r"\d+")


def originPath(origin: str) -> str:
    """The file part of an origin: C{"dir/a.yaml"} for C{"dir/a.yaml#2"}."""
    return origin.rpartition("#")[0] if "#" in origin else origin


def originSortKey(origin: str) -> Tuple[str, Tuple[int, ...]]:
    """Order of precedence between documents: by file path, then document (and list item) index."""
    if "#" not in origin:
        return (origin, ())
    path, _, fragment = origin.rpartition("#")
    return (path, tuple(int(n) for n in _ORIGIN_NUMBERS.findall(fragment)))


# The same documents come back at every reload of a source: their precedence is worked out once.
_cachedOriginSortKey = functools.lru_cache(maxsize=65536)(originSortKey)


def _skipOrder(key: object) -> Tuple[str, Tuple[int, ...]]:
    return originSortKey(key) if isinstance(key, str) else (repr(key), ())


def contentKey(raw: Mapping[str, Any]) -> bytes:
    """
    A digest of the whole content: equal for equal content of the same types (it tells 1 from "1" and True,
    bytes from a bytearray), so that a parse may be reused.  Key order, or which strings are the same object,
    only costs a cache miss.
    """
    try:
        # A pickle (C, about twice as fast as repr) names every type; it starts with the PROTO opcode.
        data = pickle.dumps(raw, 5)
    except Exception:  # noqa: BLE001 - what does not pickle is keyed by its repr, as before
        data = b"r" + repr(raw).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).digest()


def _meta(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = raw.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def isReference(raw: Mapping[str, Any]) -> bool:
    return raw.get("kind") in REF_KINDS and raw.get("apiVersion", "v1") == "v1"


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"expected a base64 string, found {type(value).__name__}")
    # Go's decoder (what the API server uses) skips line breaks, so manifests may wrap long values.
    cleaned = "".join(value.split())
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not valid base64 ({e})") from None


def _refData(raw: Mapping[str, Any]) -> Tuple[Dict[str, bytes], List[str]]:
    """The bytes of a ConfigMap or Secret, key by key, and the entries that could not be decoded."""
    data: Dict[str, bytes] = {}
    problems: List[str] = []

    def section(field: str, decode: Callable[[Any], bytes]) -> None:
        values = raw.get(field)
        if values is None:
            return
        if not isinstance(values, Mapping):
            problems.append(f"{field}: expected a mapping, found {type(values).__name__}")
            return
        for key, value in values.items():
            try:
                data[str(key)] = decode(value)
            except ValueError as e:
                problems.append(f"{field}.{key}: {e}")

    def text(value: Any) -> bytes:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, found {type(value).__name__}")
        return value.encode("utf-8")

    if raw.get("kind") == "ConfigMap":
        section("data", text)
        section("binaryData", _b64)
    else:
        section("data", _b64)
        section("stringData", text)  # written after data: stringData wins, as in the API server
    return data, problems


@attrs.frozen
class _Entry:
    """What the inventory keeps per (kind, name)."""

    origin: str
    key: bytes = attrs.field(eq=False)  # cache key of the raw object whose parse result is C{result}
    result: ParseResult
    lastGood: Optional[Resource]  # the newest accepted version (C{result.obj} when that was accepted)
    held: bool = False  # kept from an earlier load because its file failed to load
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False)  # the latest input, for status reporting

    def record(self, kind: str, name: str) -> ObjectRecord:
        current = self.lastGood
        stale = current is not None and (self.held or self.result.obj is None)
        return ObjectRecord(
            kind=kind,
            name=name,
            origin=self.origin,
            current=current,
            rejection=self.result.rejection if self.result.obj is None else None,
            stale=stale,
            warnings=tuple(self.result.warnings),
            notes=tuple(self.result.notes),
            raw=self.raw,
        )


@attrs.frozen
class _RefEntry:
    origin: str
    key: bytes = attrs.field(eq=False)
    data: Mapping[str, bytes]
    problems: Tuple[str, ...]
    held: bool = False


def _refEntry(raw: Mapping[str, Any], origin: str, key: bytes) -> Tuple[Optional[RefKey], _RefEntry]:
    meta = _meta(raw)
    name = meta.get("name")
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    data, problems = _refData(raw)
    entry = _RefEntry(origin, key, MappingProxyType(data), tuple(problems))
    if not isinstance(name, str) or not name:
        return None, entry
    return (str(raw["kind"]), str(namespace), name), entry


_State = Tuple[
    Dict[ObjectKey, "_Entry"], Dict[RefKey, "_RefEntry"], Dict[object, str], Tuple[str, ...], Tuple[SourceError, ...]
]


@attrs.frozen(eq=False)
class ReplacePlan:
    """
    What a L{Inventory.replaceAll} would do, computed by L{Inventory.plan} (possibly in another thread) from
    the state the inventory had at C{version}.

    @ivar changed: the new state differs from the old one (C{commit} then notifies).
    @ivar snapshot: the new state's snapshot, when asked for and C{changed}.
    @ivar replaced: the state it replaces; held so that whoever drops the plan last (a source's thread)
        frees it, rather than the reactor.
    """

    version: int
    state: _State
    parseCache: Dict[bytes, ParseResult]
    changed: bool
    snapshot: Optional[InventorySnapshot]
    replaced: object = attrs.field(default=None, repr=False)


def _newEntry(
    origin: str, key: bytes, result: ParseResult, previous: Optional[_Entry], raw: Mapping[str, Any]
) -> _Entry:
    lastGood = result.obj if result.obj is not None else (previous.lastGood if previous else None)
    return _Entry(origin, key, result, lastGood, raw=raw)


class Inventory:
    """
    Objects by (kind, name), plus ConfigMap/Secret contents, fed by one source.

    A file source calls L{replaceAll} with its complete contents; a Kubernetes source calls L{upsert} and
    L{delete} per event.  After any change, C{onChange} is called synchronously (the caller coalesces
    rebuilds); nothing is called when an input changes nothing.
    """

    def __init__(self, onChange: Callable[[], None]) -> None:
        self._onChange = onChange
        self._entries: Dict[ObjectKey, _Entry] = {}
        self._refs: Dict[RefKey, _RefEntry] = {}
        # Keyed by origin for replaceAll, by (kind, name) for upsert, so an update replaces its own message.
        self._skipped: Dict[object, str] = {}
        self._duplicates: Tuple[str, ...] = ()
        self._sourceErrors: Tuple[SourceError, ...] = ()
        # Parse results of the documents of the latest replaceAll, by content.
        self._parseCache: Dict[bytes, ParseResult] = {}
        self._snapshot: Optional[InventorySnapshot] = None
        self.parseCount = 0  # how many times parseResource ran (observable caching)
        # Bumped after every change of the state above, so a plan made from an older state is refused.
        self._version = 0

    def _parse(self, raw: Mapping[str, Any]) -> ParseResult:
        self.parseCount += 1
        return parseResource(raw)

    def _changed(self, snapshot: Optional[InventorySnapshot] = None) -> None:
        self._snapshot = snapshot
        self._version += 1
        self._onChange()

    # -- file source ------------------------------------------------------------------------------------

    def replaceAll(
        self,
        docs: Sequence[SourceDocument],
        errors: Sequence[SourceError],
        parsed: Optional[Mapping[bytes, ParseResult]] = None,
    ) -> None:
        """
        Replace everything with the complete contents of a source.

        C{parsed} may carry parse results by content key (L{contentKey}), computed off the reactor thread by
        the source (parsing is pure); whatever it lacks is parsed here.

        Objects (and ConfigMaps/Secrets) that came from a file named by an error in C{errors} (or from a
        directory named by one) and that are not in C{docs} are kept, still serving their last good version.
        """
        committed = self.commit(self.plan(docs, errors, parsed))
        assert committed  # planned from the current state, on this thread

    def plan(
        self,
        docs: Sequence[SourceDocument],
        errors: Sequence[SourceError],
        parsed: Optional[Mapping[bytes, ParseResult]] = None,
        *,
        keys: Optional[Sequence[bytes]] = None,
        withSnapshot: bool = False,
    ) -> ReplacePlan:
        """
        The work of L{replaceAll} without its effect: hand the result to L{commit}.

        Reads the inventory but changes nothing, so a file source may call it in its own thread while the
        reactor serves (it then waits for each commit before planning again); parsing whatever C{parsed}
        lacks is the only other side effect.  C{keys} may give each document's L{contentKey}, in the order of
        C{docs}, when the caller has them; C{withSnapshot} also builds the new snapshot (the reconciler's
        input) here rather than on the reactor.
        """
        version = self._version
        base: _State = (self._entries, self._refs, self._skipped, self._duplicates, self._sourceErrors)
        previousCache = self._parseCache
        errorList = list(errors)

        cache: Dict[bytes, ParseResult] = {}
        entries: Dict[ObjectKey, _Entry] = {}
        refs: Dict[RefKey, _RefEntry] = {}
        skipped: Dict[object, str] = {}
        duplicates: List[str] = []
        previousEntries = base[0]

        keyed = zip(docs, keys) if keys is not None else ((doc, None) for doc in docs)
        for doc, key in sorted(keyed, key=lambda item: _cachedOriginSortKey(item[0].origin)):
            raw = doc.raw
            if key is None:
                key = contentKey(raw)
            if isReference(raw):
                refKey, refEntry = _refEntry(raw, doc.origin, key)
                if refKey is None:
                    errorList.append(
                        SourceError(doc.origin, f"{doc.origin}: {raw.get('kind')} without metadata.name")
                    )
                elif refKey in refs:
                    duplicates.append(
                        self._duplicate(
                            refKey[0], f"{refKey[1]}/{refKey[2]}", doc.origin, refs[refKey].origin
                        )
                    )
                else:
                    refs[refKey] = refEntry
                continue

            result = cache.get(key) or previousCache.get(key) or (parsed.get(key) if parsed else None)
            if result is None:
                result = self._parse(raw)
            cache[key] = result
            if result.skipped is not None or (result.obj is None and result.rejection is None):
                skipped[doc.origin] = f"{doc.origin}: {result.skipped or 'not a resource ksproxy serves'}"
                continue
            if not result.kind or not result.name:
                # Nothing to key it by: report it against its document.
                message = str(result.rejection) if result.rejection is not None else "object has no name"
                errorList.append(SourceError(doc.origin, f"{doc.origin}: {message}"))
                continue
            objectKey = (result.kind, result.name)
            if objectKey in entries:
                duplicates.append(
                    self._duplicate(result.kind, result.name, doc.origin, entries[objectKey].origin)
                )
                continue
            entries[objectKey] = _newEntry(doc.origin, key, result, previousEntries.get(objectKey), raw)

        # Computed after the documents: a document found unusable above (no name, say) also holds its file's
        # objects, so a file cut short in the middle of a save never removes what it served.
        if errorList:
            failed = [originPath(e.origin).rstrip("/") or "/" for e in errorList]

            def held(origin: str) -> bool:
                path = originPath(origin)
                return any(path == f or path.startswith(f + "/") or f == "/" for f in failed)

            for objectKey, entry in previousEntries.items():
                if objectKey not in entries and held(entry.origin):
                    entries[objectKey] = attrs.evolve(entry, held=True)
            for refKey, refEntry in base[1].items():
                if refKey not in refs and held(refEntry.origin):
                    refs[refKey] = attrs.evolve(refEntry, held=True)

        state: _State = (entries, refs, skipped, tuple(duplicates), tuple(errorList))
        changed = state != base
        snapshot = _makeSnapshot(state) if (withSnapshot and changed) else None
        return ReplacePlan(version, state, cache, changed, snapshot, (base, previousCache, self._snapshot))

    def commit(self, plan: ReplacePlan) -> bool:
        """
        Install a L{plan} (constant time).  Refused (C{False}, nothing done) when the inventory changed after
        the plan was made: then plan again, or call L{replaceAll}.
        """
        if plan.version != self._version:
            return False
        self._parseCache = plan.parseCache
        if plan.changed:
            self._entries, self._refs, self._skipped, self._duplicates, self._sourceErrors = plan.state
            self._changed(plan.snapshot)
        return True

    @staticmethod
    def _duplicate(kind: str, name: str, loser: str, winner: str) -> str:
        return f"{kind} {name}: defined again in {loser}, ignored; the first definition in {winner} is used"

    # -- Kubernetes source ------------------------------------------------------------------------------

    def upsert(self, raw: Mapping[str, Any], origin: str = "kubernetes") -> None:
        """
        Add or update one object (a watch event).

        The parse is skipped when the object is unchanged: same C{uid} and C{resourceVersion} when it has
        both (what the API server guarantees), else the same content.
        """
        meta = _meta(raw)
        uid, version = meta.get("uid"), meta.get("resourceVersion")
        if isinstance(uid, str) and uid and isinstance(version, str) and version:
            key = f"rv:{uid}:{version}".encode()
        else:
            key = contentKey(raw)

        if isReference(raw):
            refKey, refEntry = _refEntry(raw, origin, key)
            if refKey is None:
                return
            old = self._refs.get(refKey)
            self._refs[refKey] = refEntry
            if old != refEntry:
                self._changed()
            return

        kind, name = raw.get("kind"), meta.get("name")
        rawKey = (kind, name) if isinstance(kind, str) and isinstance(name, str) else None
        existing = self._entries.get(rawKey) if rawKey is not None else None
        if existing is not None and existing.key == key and existing.origin == origin:
            return
        result = self._parse(raw)
        objectKey: ObjectKey = (result.kind, result.name)
        if result.skipped is not None or (result.obj is None and result.rejection is None) or not result.name:
            # Not (or no longer) ours: a label or apiVersion change can turn a served object into this.
            removed = self._entries.pop(objectKey, None) is not None
            if rawKey is not None and rawKey != objectKey:
                removed = self._entries.pop(rawKey, None) is not None or removed
            reason = result.skipped or (
                str(result.rejection) if result.rejection else "not a resource ksproxy serves"
            )
            message = f"{origin}: {reason}"
            skipKey = objectKey if result.name else (rawKey or objectKey)
            if removed or self._skipped.get(skipKey) != message:
                self._skipped[skipKey] = message
                self._changed()
            return
        hadSkip = self._skipped.pop(objectKey, None) is not None
        entry = _newEntry(origin, key, result, self._entries.get(objectKey), raw)
        if self._entries.get(objectKey) == entry:
            self._entries[objectKey] = entry  # remember the new cache key
            self._version += 1
            if hadSkip:
                self._changed()
            return
        self._entries[objectKey] = entry
        self._changed()

    def replaceKind(self, kind: str, raws: Sequence[Mapping[str, Any]], origin: str = "kubernetes") -> None:
        """
        The complete list of one kind (a list or relist after a watch gap): upsert each object and forget the
        ones of that kind that are not in it, deleted while nobody was watching.  One change notification.
        """
        notified: List[bool] = []
        onChange, self._onChange = self._onChange, lambda: notified.append(True)
        try:
            present = set()
            for raw in raws:
                self.upsert(raw, origin)
                meta = _meta(raw)
                present.add((meta.get("namespace") or DEFAULT_NAMESPACE, meta.get("name")))
            if kind in REF_KINDS:
                for refKind, namespace, name in [k for k in self._refs if k[0] == kind]:
                    if (namespace, name) not in present:
                        self.delete(refKind, name, namespace)
            else:
                names = {name for _, name in present}
                for entryKind, name in [k for k in self._entries if k[0] == kind]:
                    if name not in names:
                        self.delete(entryKind, name)
        finally:
            self._onChange = onChange
        if notified:
            self._onChange()

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        """Forget an object (its last good version too); C{namespace} only matters for ConfigMap/Secret."""
        if kind in REF_KINDS:
            removed = self._refs.pop((kind, namespace or DEFAULT_NAMESPACE, name), None) is not None
        else:
            removed = self._entries.pop((kind, name), None) is not None
            removed = self._skipped.pop((kind, name), None) is not None or removed
        if removed:
            self._changed()

    # -- reading ----------------------------------------------------------------------------------------

    def snapshot(self) -> InventorySnapshot:
        """The current state; the same object is returned until something changes."""
        if self._snapshot is None:
            self._snapshot = _makeSnapshot(
                (self._entries, self._refs, self._skipped, self._duplicates, self._sourceErrors)
            )
        return self._snapshot


def _makeSnapshot(state: _State) -> InventorySnapshot:
    entries, refs, skipped, duplicates, sourceErrors = state
    records = {key: entry.record(*key) for key, entry in sorted(entries.items())}
    refProblems = [
        f"{kind} {namespace}/{name} ({entry.origin}): {problem}"
        for (kind, namespace, name), entry in sorted(refs.items())
        for problem in entry.problems
    ]
    return InventorySnapshot(
        records=MappingProxyType(records),
        resources=tuple(r.current for r in records.values() if r.current is not None),
        duplicates=duplicates,
        skipped=tuple(skipped[k] for k in sorted(skipped, key=_skipOrder)),
        sourceErrors=sourceErrors,
        refs=MappingProxyType({k: e.data for k, e in sorted(refs.items())}),
        refErrors=tuple(refProblems),
    )
