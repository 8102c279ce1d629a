# -*- test-case-name: tests.integration.test_filesource -*-
"""
A directory of manifests as a source: read once, then watched by polling.

Polling C{os.scandir} stat signatures is portable (inotify-free), needs no dependency, and with a quarter
of a second between scans notices every addition, edit, deletion and rename within a second.  The watcher
thread hands the reactor a I{complete} snapshot of the directory each time something changed, so the
inventory never has to reason about a partial update.

Files are loaded all or nothing: a file with any error (YAML syntax, not UTF-8, a document that is not a
mapping) contributes no documents and is reported with its path and line; the inventory keeps serving what
it held.  Editors and config tools that write in place can be caught mid-write, so a change is read only once
a file's signature has stayed the same for one poll interval, and a file that disappears is only considered
deleted when it is still missing at the next scan (a rename-and-replace save briefly removes it).  A file
read within two seconds of its last change is read once more later and compared by content, since a rewrite
of the same size within one timestamp tick leaves its signature unchanged.
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

from ksproxy.model.parse import ParseResult, parseResource
from ksproxy.sources.inventory import Inventory, SourceDocument, SourceError, contentKey, isReference

__all__ = ["FileSource", "DirectoryScanner", "loadDirectory", "loadFile", "EXTENSIONS"]

EXTENSIONS = (".yaml", ".yml", ".json")

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader without timestamp resolution: Kubernetes reads YAML as JSON, so times stay strings."""


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

    def visit(directory: str) -> None:
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:
                return  # a symlink loop
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            errors.append(SourceError(directory, f"{directory}: cannot read directory: {e.strerror or e}"))
            failed.append(directory)
            return
        for entry in sorted(entries, key=lambda e: e.name):
            if ignoredName(entry.name):
                continue
            path = os.path.join(directory, entry.name)
            try:
                st = entry.stat()  # follows symlinks
            except OSError:
                continue  # vanished, or a dangling link
            if statModule.S_ISDIR(st.st_mode):
                visit(path)
            elif statModule.S_ISREG(st.st_mode) and entry.name.lower().endswith(EXTENSIONS):
                found[path] = _signature(st)

    visit(root)
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


def _expand(path: str, index: int, obj: Any) -> Tuple[List[SourceDocument], Optional[str]]:
    """The objects of one document: itself, or the items of a List."""
    if not isinstance(obj, dict):
        return [], f"document {index}: expected a mapping, found {type(obj).__name__}"
    kind = obj.get("kind")
    items = obj.get("items")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
        docs = []
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                return [], f"document {index}: items[{n}]: expected a mapping, found {type(item).__name__}"
            docs.append(SourceDocument(f"{path}#{index}.items[{n}]", item))
        return docs, None
    return [SourceDocument(f"{path}#{index}", obj)], None


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


def parseData(path: str, data: bytes) -> Tuple[List[SourceDocument], List[SourceError]]:
    """The documents in C{data}, read from C{path} (JSON when the name ends in .json, else YAML)."""
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
                objs = [json.loads(text)]
            except json.JSONDecodeError as e:
                return [], [SourceError(path, f"{path}:{e.lineno}: {e.msg}", e.lineno)]
            except RecursionError:
                return [], [SourceError(path, f"{path}: nested too deeply")]
    else:
        try:
            objs = list(yaml.load_all(text, Loader=_Loader))
        except yaml.YAMLError as e:
            return [], [_yamlError(path, e)]
        except RecursionError:
            return [], [SourceError(path, f"{path}: nested too deeply")]

    docs: List[SourceDocument] = []
    for index, obj in enumerate(objs, 1):
        if obj is None:
            continue
        expanded, problem = _expand(path, index, obj)
        if problem is not None:
            return [], [SourceError(path, f"{path}: {problem}")]
        docs.extend(expanded)
    return docs, []


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
            docs, errors = parseData(path, data)
            digest = hashlib.sha256(data).digest()
        hadDocs = bool(docs) if not errors else bool(state and state.hadDocs)
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


class FileSource(service.Service):
    """
    Feeds an L{Inventory} from a directory, watched by a daemon thread.

    @ivar synced: fires once the first complete read has been handed to the inventory (readiness).
    """

    _log = Logger()

    def __init__(
        self, directory: str, inventory: Inventory, reactor: Any, *, pollInterval: float = 0.25
    ) -> None:
        self.directory = directory
        self.synced: Deferred[None] = Deferred()
        self._inventory = inventory
        self._reactor = reactor
        self._pollInterval = pollInterval
        self._scanner = DirectoryScanner(directory)
        self._stopEvent = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopped: Optional[Deferred[None]] = None
        self._reported: Set[str] = set()
        # Parse results by content, kept from one scan to the next: only new content is parsed, in the
        # watcher thread, so that a large change does not stall the reactor.
        self._parsed: Dict[bytes, ParseResult] = {}

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
        try:
            while not stopEvent.is_set():
                try:
                    result = self._scanner.scan(stopEvent.is_set)
                except Exception:
                    callFromThread(
                        self._log.failure, "Scanning {directory} failed", Failure(), directory=self.directory
                    )
                    result = None
                if result is not None and not stopEvent.is_set():
                    callFromThread(self._deliver, result[0], result[1], self._parse(result[0]))
                stopEvent.wait(self._pollInterval)
        finally:
            callFromThread(stopped.callback, None)

    def _parse(self, docs: List[SourceDocument]) -> Dict[bytes, ParseResult]:
        """In the watcher thread: parse what is new (parsing is pure; the model imports no Twisted)."""
        previous, parsed = self._parsed, {}
        for doc in docs:
            if isReference(doc.raw):
                continue  # ConfigMaps and Secrets are not parsed into models
            key = contentKey(doc.raw)
            result = previous.get(key) or parsed.get(key)
            parsed[key] = result if result is not None else parseResource(doc.raw)
        self._parsed = parsed
        return parsed

    def _deliver(
        self, docs: List[SourceDocument], errors: List[SourceError], parsed: Optional[Dict[bytes, ParseResult]] = None
    ) -> None:
        if not self.running:
            return
        messages = {e.message for e in errors}
        for message in sorted(messages - self._reported):
            self._log.warn("{message}", message=message)
        self._reported = messages
        self._log.debug(
            "{directory}: {count} documents, {errors} errors",
            directory=self.directory,
            count=len(docs),
            errors=len(errors),
        )
        self._inventory.replaceAll(docs, errors, parsed)
        if not self.synced.called:
            self.synced.callback(None)
