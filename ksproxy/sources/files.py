# -*- test-case-name: tests.integration.test_filesource -*-
"""
A directory of manifests as a source: read once, then watched by polling.

Polling C{os.scandir} stat signatures is portable (inotify-free) and needs no dependency.  Scans come every
tenth of a second, less often for very large trees (a scan costs about 10 us per file; scanning takes at most
5% of a core, with a scan at least every second).  The watcher thread hands the reactor a I{complete}
snapshot of the directory each time something changed, so the inventory never has to reason about a partial
update.

A file that cannot be read as a whole (YAML syntax, not UTF-8) contributes no documents and is reported with
its path and line; the inventory keeps serving what it held.  A document that reads but is not a mapping
(or such an item of a List) is left out on its own and reported with its path and document number; the
file's other documents load, and what the file served before that is not among them is kept.  Editors and config tools that write in place can be caught mid-write, so a change is read only once
a file's signature has stayed the same from one scan to the next, and a file that disappears is only
considered deleted when it is still missing at the next scan (a rename-and-replace save briefly removes it).

Once a change is seen, that next scan comes after a settle interval (50 ms) rather than a full poll interval,
so a file must hold still for 50 ms to be read.  Every change is treated alike: a file that arrives by rename
(C{os.replace}, kubectl-style tools, the symlink swap of a ConfigMap volume) is complete when it appears, but
cannot be told apart for sure from a new file being written in place (its ctime is later than its mtime only
when the two fall in different timestamp ticks), so it waits the 50 ms too.  The interval guards writers that
pause in the middle of an in-place write; one that pauses for longer may be read half-written, and is read
again at the next scan: until then a half file that does not parse keeps serving what it held, and one cut
exactly between two documents serves only the documents before the cut.

A file read within two seconds of its last change is read once more later and compared by content, since a
rewrite of the same size within one timestamp tick leaves its signature unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as statModule
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import attrs
import yaml
from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from ksproxy.model.parse import ParseResult, parseResource
from ksproxy.routing.background import buildWindow, loadJSON, releaseInWindow
from ksproxy.sources.inventory import (
    Inventory,
    ReplacePlan,
    SourceDocument,
    SourceError,
    contentKey,
    isReference,
)

__all__ = ["FileSource", "DirectoryScanner", "loadDirectory", "loadFile", "EXTENSIONS"]

EXTENSIONS = (".yaml", ".yml", ".json")

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
# Plain scalars that construct to immutable values (and so may be shared between the places they appear).
_SCALAR_TAGS = frozenset(
    ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null")
)


class _Unusual(Exception):
    """The document uses something the lean construction does not handle: construct it the usual way."""


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """
    SafeLoader without timestamp resolution: Kubernetes reads YAML as JSON, so times stay strings.

    Faster than SafeLoader on manifests, with the same results: the C parser composes the nodes as usual, but
    plain scalars are resolved once per distinct text, and documents made of plain mappings, sequences and
    str/int/float/bool/null scalars are built directly rather than through PyYAML's generator-based
    constructor.  A document with anything else (an alias or anchor reused, a merge key, an explicit or
    unknown tag, a non-scalar key) is constructed by SafeLoader's own code, which also raises its errors.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._tags: Dict[str, str] = {}
        self._scalars: Dict[Tuple[str, str], Any] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is ScalarNode:
            if not implicit[0]:
                return self.DEFAULT_SCALAR_TAG  # type: ignore[no-any-return]
            tag = self._tags.get(value)
            if tag is None:
                tag = self._tags[value] = super().resolve(kind, value, implicit)
            return tag
        return super().resolve(kind, value, implicit)  # type: ignore[no-any-return]

    if not _BaseLoader.yaml_path_resolvers:
        # The composer calls these around every node; they only matter with path resolvers (there are none).

        def descend_resolver(self, current_node: Any, current_index: Any) -> None:
            pass

        def ascend_resolver(self) -> None:
            pass

    def construct_document(self, node: Any) -> Any:
        try:
            return self._build(node, set())
        except Exception:  # noqa: BLE001 - _Unusual, or an error the usual construction reports its own way
            return super().construct_document(node)

    def _build(self, node: Any, seen: Set[int]) -> Any:
        cls = node.__class__
        tag = node.tag
        if cls is ScalarNode:
            if tag == _STR_TAG:
                return node.value
            if tag in _SCALAR_TAGS:
                key = (tag, node.value)
                try:
                    return self._scalars[key]
                except KeyError:
                    value = self._scalars[key] = self.yaml_constructors[tag](self, node)
                    return value
            raise _Unusual(tag)
        if id(node) in seen:
            raise _Unusual("alias")  # the same node twice: SafeLoader shares (or refuses) it
        seen.add(id(node))
        build = self._build
        if cls is MappingNode and tag == _MAP_TAG:
            data = {}
            for keyNode, valueNode in node.value:
                if keyNode.__class__ is not ScalarNode:
                    raise _Unusual("key")
                keyTag = keyNode.tag
                if keyTag == _STR_TAG:
                    key = keyNode.value
                elif keyTag in _SCALAR_TAGS:
                    key = build(keyNode, seen)
                else:
                    raise _Unusual(keyTag)  # "<<" merge keys, "=" value keys, explicit tags
                data[key] = build(valueNode, seen)
            return data
        if cls is SequenceNode and tag == _SEQ_TAG:
            return [build(item, seen) for item in node.value]
        raise _Unusual(tag)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}

Signature = Tuple[int, int, int, int, int]
_MISSING = object()
# A file that keeps changing is read anyway after this many scans, so a busy file is not ignored forever.
_MAX_SETTLE_SCANS = 8
# Timestamps can be as coarse as a kernel tick (or a second on some file systems).
_RACY_NS = 2_000_000_000


def ignoredName(name: str) -> bool:
    """Hidden files and directories, editor backups, swap files and autosaves."""
    return (
        name.startswith(".")
        or name.endswith("~")
        or (name.startswith("#") and name.endswith("#"))
        or name.endswith((".swp", ".swo", ".swx", ".tmp"))
    )


def _signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


def _statFile(path: str) -> Optional[Signature]:
    try:
        return _signature(os.stat(path))
    except OSError:
        return None


def _walk(root: str) -> Tuple[Dict[str, Signature], List[SourceError], List[str]]:
    """
    Every manifest file under C{root} (following symlinks, which is how ConfigMap volumes present files),
    the directories that could not be listed, as errors and as paths.
    """
    found: Dict[str, Signature] = {}
    errors: List[SourceError] = []
    failed: List[str] = []
    seen: Set[Tuple[int, int]] = set()
    # Depth first, in name order, with a stack rather than a recursive closure (which would be a reference
    # cycle left behind by every poll).
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:
                continue  # a symlink loop
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            errors.append(SourceError(directory, f"{directory}: cannot read directory: {e.strerror or e}"))
            failed.append(directory)
            continue
        subdirectories = []
        for entry in sorted(entries, key=lambda e: e.name):
            if ignoredName(entry.name):
                continue
            path = os.path.join(directory, entry.name)
            try:
                st = entry.stat()  # follows symlinks
            except OSError:
                continue  # vanished, or a dangling link
            if statModule.S_ISDIR(st.st_mode):
                subdirectories.append(path)
            elif statModule.S_ISREG(st.st_mode) and entry.name.lower().endswith(EXTENSIONS):
                found[path] = _signature(st)
        pending.extend(reversed(subdirectories))
    return found, errors, failed


def _yamlError(path: str, e: yaml.YAMLError) -> SourceError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if e.context and e.problem and e.context_mark is not None:
            problem += f" ({e.context} at line {e.context_mark.line + 1})"
        if mark is not None:
            line = mark.line + 1
            return SourceError(path, f"{path}:{line}: {problem}", line)
        return SourceError(path, f"{path}: {problem}")
    return SourceError(path, f"{path}: {e}")


def _expand(path: str, index: int, obj: Any) -> Tuple[List[SourceDocument], List[SourceError]]:
    """
    The objects of one document (itself, or the items of a List), and an error for each part that is not a
    mapping.  Only that part is left out, like a document without a name: its origin (C{path#index}) names
    the file, so the file's other objects load and what the bad part served before is held.
    """
    origin = f"{path}#{index}"
    if not isinstance(obj, dict):
        return [], [SourceError(origin, f"{path}: document {index}: expected a mapping, found {type(obj).__name__}")]
    kind = obj.get("kind")
    items = obj.get("items")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
        docs = []
        errors = []
        for n, item in enumerate(items):
            itemOrigin = f"{origin}.items[{n}]"
            if not isinstance(item, dict):
                message = f"{path}: document {index}: items[{n}]: expected a mapping, found {type(item).__name__}"
                errors.append(SourceError(itemOrigin, message))
                continue
            docs.append(SourceDocument(itemOrigin, item))
        return docs, errors
    return [SourceDocument(origin, obj)], []


def loadFile(path: str) -> Optional[Tuple[List[SourceDocument], List[SourceError]]]:
    """
    The documents of one file (origins C{path#1}, C{path#2}, ...; list items C{path#1.items[0]}), or its
    errors and no documents.  C{None} when the file has vanished.
    """
    data = _readBytes(path)
    if data is None:
        return None
    if isinstance(data, SourceError):
        return [], [data]
    return parseData(path, data)


def _readBytes(path: str) -> Union[bytes, SourceError, None]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        return SourceError(path, f"{path}: cannot read: {e.strerror or e}")


def _asJSON(text: str) -> Optional[List[Any]]:
    """
    The one document of a YAML file whose content is a JSON object (as C{kubectl get -o json} writes), read as
    JSON: the same value (JSON is YAML), twenty times faster for a large generated manifest.  Kubernetes'
    own decoder sniffs JSON the same way (C{NewYAMLOrJSONDecoder}).  Anything else, including a YAML flow
    mapping that is not valid JSON, is left to the YAML loader (which also reports its errors).
    """
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = loadJSON(text)
    except (ValueError, RecursionError):
        return None
    return [value] if isinstance(value, dict) else None


def parseData(path: str, data: bytes) -> Tuple[List[SourceDocument], List[SourceError]]:
    """
    The documents in C{data}, read from C{path}: JSON when the name ends in .json, else YAML (a YAML file
    holding one JSON object is read as JSON, see L{_asJSON}).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return [], [SourceError(path, f"{path}:{line}: not UTF-8 text", line)]

    if path.lower().endswith(".json"):
        if not text.strip():
            objs: List[Any] = []
        else:
            try:
                objs = [loadJSON(text)]
            except json.JSONDecodeError as e:
                return [], [SourceError(path, f"{path}:{e.lineno}: {e.msg}", e.lineno)]
            except RecursionError:
                return [], [SourceError(path, f"{path}: nested too deeply")]
    else:
        objs = _asJSON(text)
        if objs is None:
            try:
                objs = list(yaml.load_all(text, Loader=_Loader))
            except yaml.YAMLError as e:
                return [], [_yamlError(path, e)]
            except RecursionError:
                return [], [SourceError(path, f"{path}: nested too deeply")]

    docs: List[SourceDocument] = []
    errors: List[SourceError] = []
    for index, obj in enumerate(objs, 1):
        if obj is None:
            continue
        expanded, problems = _expand(path, index, obj)
        docs.extend(expanded)
        errors.extend(problems)
    return docs, errors


@attrs.frozen
class _FileState:
    sig: Signature
    digest: bytes
    docs: Tuple[SourceDocument, ...]
    errors: Tuple[SourceError, ...]
    hadDocs: bool  # the last load without errors had documents (the inventory may still hold them)
    # Read within a timestamp tick of its last change: a rewrite of the same size in the same tick would leave
    # the signature as it is, so the content is compared again at the next scan (git's "racy" entries).
    racy: bool


def _isRacy(sig: Signature) -> bool:
    return time.time_ns() - sig[1] < _RACY_NS


class DirectoryScanner:
    """
    The watcher's state: per file, its signature and its documents.  Not thread-safe; the watcher thread
    (or a test) owns it.

    @param settle: read a changed file only once its signature has held for one scan (see the module
        docstring).  The first scan always reads everything at once.
    """

    def __init__(self, directory: str, *, settle: bool = True) -> None:
        self.directory = os.path.normpath(directory)
        self._settle = settle
        self._files: Dict[str, _FileState] = {}
        self._pending: Dict[str, Tuple[object, int]] = {}
        self._listErrors: List[SourceError] = []
        self._first = True

    def scan(
        self, shouldStop: Callable[[], bool] = lambda: False
    ) -> Optional[Tuple[List[SourceDocument], List[SourceError]]]:
        """
        Look at the directory once; return the complete contents when anything changed since the last
        scan that returned them (always on the first scan), else C{None}.
        """
        found, listErrors, failedDirs = _walk(self.directory)
        changed = self._first or listErrors != self._listErrors
        self._listErrors = listErrors
        failedPrefixes = tuple(d.rstrip(os.sep) + os.sep for d in failedDirs)

        for path in sorted(set(found) | set(self._files)):
            if shouldStop():
                return None
            sig = found.get(path)
            state = self._files.get(path)
            if sig is None and (path in failedDirs or path.startswith(failedPrefixes)):
                continue  # could not look: keep what we had
            if state is not None and state.sig == sig:
                self._pending.pop(path, None)
                if state.racy and self._recheck(path, state):
                    changed = True
                continue
            if state is None and sig is None:
                self._pending.pop(path, None)
                continue
            if self._settle and not self._first:
                seen, count = self._pending.get(path, (_MISSING, 0))
                if seen != sig and count < _MAX_SETTLE_SCANS:
                    self._pending[path] = (sig, count + 1)
                    continue
            self._pending.pop(path, None)
            if sig is None:
                del self._files[path]
                changed = True
                continue
            data = _readBytes(path)
            after = _statFile(path)
            if data is None or after != sig:
                # Vanished or rewritten while we read it: look again at the next scan.
                self._pending[path] = (after, 1)
                continue
            self._accept(path, sig, data, state)
            changed = True

        self._first = False
        if not changed:
            return None
        docs: List[SourceDocument] = []
        errors: List[SourceError] = list(listErrors)
        for path in sorted(self._files):
            docs.extend(self._files[path].docs)
            errors.extend(self._files[path].errors)
        return docs, errors

    @property
    def settling(self) -> bool:
        """Some change was seen but not read yet: it is read at the next scan if it holds still until then."""
        return bool(self._pending)

    def _recheck(self, path: str, state: _FileState) -> bool:
        """Read a racy file again; say whether its content changed."""
        data = _readBytes(path)
        if data is None or _statFile(path) != state.sig:
            return False  # the signature moved: the next scan sees it as a change
        if isinstance(data, SourceError) or hashlib.sha256(data).digest() == state.digest:
            self._files[path] = attrs.evolve(state, racy=_isRacy(state.sig))
            return False
        self._accept(path, state.sig, data, state)
        return True

    def _accept(
        self, path: str, sig: Signature, data: Union[bytes, SourceError], state: Optional[_FileState]
    ) -> None:
        if isinstance(data, SourceError):
            docs, errors, digest = [], [data], b""
        else:
            with buildWindow():
                docs, errors = parseData(path, data)
            digest = hashlib.sha256(data).digest()
        # With errors, a file may still hold objects from before (the inventory keeps them): remember that.
        hadDocs = bool(docs) or (bool(errors) and bool(state and state.hadDocs))
        if not docs and not errors and state is not None and state.hadDocs:
            # Truncated (maybe mid-rewrite): keep its objects until it has content or is deleted.
            message = f"{path}: file is empty; still serving the objects it held until it is written again or deleted"
            errors = [SourceError(path, message)]
            hadDocs = True
        self._files[path] = _FileState(sig, digest, tuple(docs), tuple(errors), hadDocs, _isRacy(sig))


def loadDirectory(directory: str) -> Tuple[List[SourceDocument], List[SourceError]]:
    """Every document under C{directory} and every file that could not be loaded (for C{ksproxy check})."""
    result = DirectoryScanner(directory, settle=False).scan()
    assert result is not None  # the first scan always answers
    return result


@attrs.frozen(eq=False)
class _Delivery:
    """What the watcher thread prepared for one complete read: parse results by content, and the plan."""

    docs: List[SourceDocument]
    errors: List[SourceError]
    parsed: Dict[bytes, ParseResult]
    plan: Optional[ReplacePlan]


class FileSource(service.Service):
    """
    Feeds an L{Inventory} from a directory, watched by a daemon thread.

    The thread does all the work of a change: it reads and parses what changed, then plans the inventory's
    new state and its snapshot (L{Inventory.plan}); the reactor only installs the plan (L{Inventory.commit},
    constant time).  It waits for each plan to be installed before it plans the next one, and a plan that
    the inventory refuses (something else changed it meanwhile) is redone on the reactor.  The old state is
    released in the thread too, so that freeing a large table does not stall requests either.

    Scans come every C{pollInterval} seconds, or less often when a scan is slow (at most 5% of a core goes to
    scanning, with scans at least every C{maxPollInterval}); once a change is seen, the next scan comes
    C{settleInterval} later to read it if it held still (see the module docstring).

    @ivar synced: fires once the first complete read has been handed to the inventory (readiness); not while
        the directory itself cannot be read.
    """

    _log = Logger()

    def __init__(
        self,
        directory: str,
        inventory: Inventory,
        reactor: Any,
        *,
        pollInterval: float = 0.1,
        settleInterval: float = 0.05,
        maxPollInterval: float = 1.0,
    ) -> None:
        self.directory = directory
        self.synced: Deferred[None] = Deferred()
        self._inventory = inventory
        self._reactor = reactor
        self._pollInterval = pollInterval
        self._settleInterval = settleInterval
        self._maxPollInterval = max(maxPollInterval, pollInterval)
        self._scanner = DirectoryScanner(directory)
        self._stopEvent = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopped: Optional[Deferred[None]] = None
        self._reported: Set[str] = set()
        # Parse results by content, kept from one scan to the next: only new content is parsed, in the
        # watcher thread, so that a large change does not stall the reactor.
        self._parsed: Dict[bytes, ParseResult] = {}
        self.plansRefused = 0  # plans the inventory refused (redone on the reactor); for tests and debugging

    def startService(self) -> None:
        super().startService()
        self._stopEvent = threading.Event()
        self._stopped = Deferred()
        self._thread = threading.Thread(
            target=self._run,
            args=(self._stopEvent, self._stopped),
            name=f"ksproxy-files:{self.directory}",
            daemon=True,
        )
        self._thread.start()

    def stopService(self) -> Deferred[None]:
        """Stop the watcher; the Deferred fires when its thread has ended (it checks between files)."""
        super().stopService()
        self._stopEvent.set()
        if self._stopped is None:
            return succeed(None)  # never started
        return self._stopped

    def _run(self, stopEvent: threading.Event, stopped: Deferred[None]) -> None:
        callFromThread = self._reactor.callFromThread
        retired: List[Any] = []
        try:
            while not stopEvent.is_set():
                if retired:
                    # What the last installed plan replaced, freed a poll interval later (after the rebuild
                    # that the change caused, which it would otherwise slow down), in small steps.
                    releaseInWindow(retired)
                started = time.monotonic()
                try:
                    result = self._scanner.scan(stopEvent.is_set)
                except Exception:
                    callFromThread(
                        self._log.failure, "Scanning {directory} failed", Failure(), directory=self.directory
                    )
                    result = None
                elapsed = time.monotonic() - started
                if result is not None and not stopEvent.is_set():
                    delivery: Optional[_Delivery] = self._prepare(result[0], result[1])
                    installed = threading.Event()
                    callFromThread(self._deliver, delivery, installed)
                    # The next plan starts from the state this one leaves.
                    while not installed.wait(0.05) and not stopEvent.is_set():
                        pass
                    retired.append(delivery)
                    delivery = None
                stopEvent.wait(self._nextScanIn(elapsed))
        finally:
            callFromThread(stopped.callback, None)

    def _nextScanIn(self, scanSeconds: float) -> float:
        if self._scanner.settling:
            return self._settleInterval
        return min(max(self._pollInterval, 20 * scanSeconds), self._maxPollInterval)

    def _prepare(self, docs: List[SourceDocument], errors: List[SourceError]) -> _Delivery:
        """In the watcher thread: parse what is new, and plan the inventory's next state."""
        with buildWindow():
            parsed, keys = self._parse(docs)
            try:
                plan: Optional[ReplacePlan] = self._inventory.plan(
                    docs, errors, parsed, keys=keys, withSnapshot=True
                )
            except Exception:  # noqa: BLE001 - e.g. the inventory changed under us: plan again on the reactor
                plan = None
        return _Delivery(docs, errors, parsed, plan)

    def _parse(self, docs: List[SourceDocument]) -> Tuple[Dict[bytes, ParseResult], List[bytes]]:
        """In the watcher thread: parse what is new (parsing is pure; the model imports no Twisted)."""
        previous, parsed = self._parsed, {}
        keys = []
        for doc in docs:
            key = contentKey(doc.raw)
            keys.append(key)
            if isReference(doc.raw):
                continue  # ConfigMaps and Secrets are not parsed into models
            result = previous.get(key) or parsed.get(key)
            parsed[key] = result if result is not None else parseResource(doc.raw)
        self._parsed = parsed
        return parsed, keys

    def _deliver(self, delivery: _Delivery, installed: Optional[threading.Event] = None) -> None:
        try:
            if not self.running:
                return
            messages = {e.message for e in delivery.errors}
            for message in sorted(messages - self._reported):
                self._log.warn("{problem}", problem=message)
            self._reported = messages
            self._log.debug(
                "{directory}: {count} documents, {errors} errors",
                directory=self.directory,
                count=len(delivery.docs),
                errors=len(delivery.errors),
            )
            if delivery.plan is None or not self._inventory.commit(delivery.plan):
                self.plansRefused += 1
                self._inventory.replaceAll(delivery.docs, delivery.errors, delivery.parsed)
            if not self.synced.called:
                if any(e.origin == self._scanner.directory for e in delivery.errors):
                    # Nothing could be read, which is not an empty configuration: not ready (/readyz 503)
                    # until the directory can be read, however long that takes (a volume not mounted yet).
                    self._log.warn("{directory}: not ready until it can be read", directory=self.directory)
                else:
                    self.synced.callback(None)
        finally:
            if installed is not None:
                installed.set()
