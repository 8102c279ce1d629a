# -*- test-case-name: tests.unit.test_kubeapi,tests.integration.test_kubesource -*-
"""
A local Kubernetes API server for tests.

L{FakeKubeAPI} serves, on 127.0.0.1, the part of the Kubernetes REST API that ksproxy uses, following the
API conventions closely enough that the official C{kubernetes} Python client can talk to it unchanged:

  - list with a global, monotonically increasing C{resourceVersion} (field and simple label selectors);
  - watch as an HTTP/1.1 chunked stream of JSON lines (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR), resumable
    from any resourceVersion still in a bounded history, and an ERROR event carrying a 410 C{Status}
    (reason C{Expired}) for an older one, as the watch cache does;
  - create, update (with the resourceVersion precondition), JSON merge patch and JSON patch, delete;
    C{metadata.generation} follows the custom-resource rule (any change outside C{metadata} bumps it: the
    ksproxy CRDs have no status subresource) and a write that changes nothing is not a write;
  - every error as a C{Status} object.

It runs in its own threads (a C{ThreadingHTTPServer}), so it works next to a running Twisted reactor.  Tests
change the cluster with L{FakeKubeAPI.put} and L{FakeKubeAPI.delete}, inject faults (L{FakeKubeAPI.cutWatches},
L{FakeKubeAPI.expireHistory}, L{FakeKubeAPI.stop} then L{FakeKubeAPI.start}, L{FakeKubeAPI.failNext}) and read
back every request the client made (L{FakeKubeAPI.requests}).
"""

from __future__ import annotations

import base64
import collections
import copy
import datetime
import json
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

__all__ = [
    "ResourceType",
    "DEFAULT_RESOURCES",
    "RecordedRequest",
    "FakeKubeAPI",
    "PatchError",
    "mergePatch",
    "jsonPatch",
]


@attrs.frozen
class ResourceType:
    """One REST resource the fake serves.

    @ivar custom: a custom resource: C{metadata.generation} is kept by the CR rule, list items carry
        C{kind}/C{apiVersion}, strategic merge patch is refused (415) and an update must name the
        resourceVersion it replaces, all as the real API server does for custom resources.
    """

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    custom: bool = False

    @property
    def apiVersion(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def listKind(self) -> str:
        return self.kind + "List"

    @property
    def qualified(self) -> str:
        """The name used in API error messages (C{reverseproxies.extensions.kubesphere.io})."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


_EXT = ("extensions.kubesphere.io", "v1alpha1")

DEFAULT_RESOURCES: Tuple[ResourceType, ...] = (
    ResourceType(*_EXT, "apiservices", "APIService", namespaced=False, custom=True),
    ResourceType(*_EXT, "reverseproxies", "ReverseProxy", namespaced=False, custom=True),
    ResourceType(*_EXT, "jsbundles", "JSBundle", namespaced=False, custom=True),
    ResourceType("", "v1", "configmaps", "ConfigMap", namespaced=True),
    ResourceType("", "v1", "secrets", "Secret", namespaced=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True),
)


@attrs.frozen
class RecordedRequest:
    """One request as the fake received it (headers with lower-case names, query with first values)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes

    @property
    def isWatch(self) -> bool:
        return self.query.get("watch", "").lower() in ("1", "true")

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


PostHandler = Callable[[Any], Tuple[int, Any]]

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def statusObject(
    code: int, message: str, reason: Optional[str] = None, details: Optional[dict] = None
) -> dict:
    """A failure C{Status} as the API server writes it."""
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, ""),
        "code": code,
    }
    if details:
        status["details"] = details
    return status


class _APIError(Exception):
    def __init__(self, code: int, message: str, reason: Optional[str] = None, details: Optional[dict] = None):
        super().__init__(message)
        self.status = statusObject(code, message, reason, details)
        self.code = code


class PatchError(ValueError):
    """A JSON patch that cannot be applied."""


def mergePatch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value and leaves both arguments alone."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = mergePatch(result.get(key), value)
    return result


def _pointer(path: str) -> List[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _resolve(doc: Any, tokens: Sequence[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise PatchError(f"path /{'/'.join(tokens)} does not exist")
    return doc


def _patchAdd(doc: Any, tokens: List[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise PatchError(f"index {last} out of range")
    else:
        raise PatchError("cannot add to a scalar")
    return doc


def _patchRemove(doc: Any, tokens: List[str]) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise PatchError(f"path /{'/'.join(tokens)} does not exist")
    return doc


def jsonPatch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; returns a new value and leaves C{target} alone."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch is a list of operations")
    doc = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise PatchError(f"invalid operation {operation!r}")
        op, path = operation["op"], _pointer(operation["path"])
        if op in ("add", "replace", "test") and "value" not in operation:
            raise PatchError(f"{op} needs a value")
        if op == "add":
            doc = _patchAdd(doc, path, copy.deepcopy(operation["value"]))
        elif op == "remove":
            doc = _patchRemove(doc, path)
        elif op == "replace":
            _resolve(doc, path)
            if not path:
                doc = copy.deepcopy(operation["value"])
            elif isinstance(_resolve(doc, path[:-1]), list):
                doc = _patchAdd(_patchRemove(doc, path), path, copy.deepcopy(operation["value"]))
            else:
                doc = _patchAdd(doc, path, copy.deepcopy(operation["value"]))
        elif op in ("move", "copy"):
            source = _pointer(operation.get("from", ""))
            value = copy.deepcopy(_resolve(doc, source))
            if op == "move":
                doc = _patchRemove(doc, source)
            doc = _patchAdd(doc, path, value)
        elif op == "test":
            if _resolve(doc, path) != operation["value"]:
                raise PatchError(f"test failed at {operation['path']}")
        else:
            raise PatchError(f"unknown operation {op!r}")
    return doc


def _nonMetadata(obj: Mapping[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in obj.items() if key != "metadata"}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_Selector = Tuple[str, str, str]  # (key, op, value); op in "=", "!=", "exists", "!exists"


def _parseFieldSelector(text: str) -> List[_Selector]:
    selectors = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            key, value = part.split("!=", 1)
            op = "!="
        elif "=" in part:
            key, value = part.replace("==", "=", 1).split("=", 1)
            op = "="
        else:
            raise _APIError(400, f"invalid field selector: {part!r}")
        if key not in ("metadata.name", "metadata.namespace"):
            raise _APIError(400, f"field label not supported: {key}")
        selectors.append((key, op, value))
    return selectors


def _parseLabelSelector(text: str) -> List[_Selector]:
    selectors = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if " in " in part or " notin " in part or "(" in part:
            raise _APIError(400, f"set-based label selectors are not supported by the fake: {part!r}")
        if "!=" in part:
            key, value = part.split("!=", 1)
            selectors.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.replace("==", "=", 1).split("=", 1)
            selectors.append((key.strip(), "=", value.strip()))
        elif part.startswith("!"):
            selectors.append((part[1:].strip(), "!exists", ""))
        else:
            selectors.append((part, "exists", ""))
    return selectors


def _matchesSelectors(obj: Mapping[str, Any], fields: List[_Selector], labels: List[_Selector]) -> bool:
    meta = obj.get("metadata") or {}
    for key, op, value in fields:
        actual = meta.get(key.split(".", 1)[1]) or ""
        if (actual == value) != (op == "="):
            return False
    objLabels = meta.get("labels") or {}
    for key, op, value in labels:
        if op == "exists" and key not in objLabels:
            return False
        if op == "!exists" and key in objLabels:
            return False
        if op == "=" and objLabels.get(key) != value:
            return False
        if op == "!=" and objLabels.get(key) == value:
            return False
    return True


@attrs.frozen
class _Event:
    rv: int
    rtype: ResourceType
    type: str
    obj: Dict[str, Any]


@attrs.define(eq=False)
class _WatchStream:
    connection: socket.socket
    rtype: ResourceType
    cut: bool = False
    bookmarkRequested: bool = False


@attrs.define
class _Failure:
    path: str
    code: int
    method: Optional[str]
    remaining: int
    body: Any = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: FakeKubeAPI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        if not self.server.api._registerConnection(self.connection):
            self.close_connection = True

    def finish(self) -> None:
        self.server.api._unregisterConnection(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests assert on L{FakeKubeAPI.requests} instead."""

    def do_GET(self) -> None:
        self.server.api._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.api._handle(self, "POST")

    def do_PUT(self) -> None:
        self.server.api._handle(self, "PUT")

    def do_PATCH(self) -> None:
        self.server.api._handle(self, "PATCH")

    def do_DELETE(self) -> None:
        self.server.api._handle(self, "DELETE")


class _StreamAborted(Exception):
    """The watch connection was cut or the server is stopping."""


class FakeKubeAPI:
    """
    A Kubernetes API server for tests, on 127.0.0.1 and its own threads.

    @param token: the bearer token the client must send (C{None}: no authentication).
    @param historySize: how many events the watch history keeps; a watch from an older resourceVersion
        gets a 410 ERROR event.
    @param bookmarkInterval: seconds between BOOKMARK events on watches that allow them (C{None}: only
        when L{sendBookmark} is called).
    @param resources: the resource types served.
    """

    def __init__(
        self,
        *,
        token: Optional[str] = "fake-token",
        historySize: int = 1000,
        bookmarkInterval: Optional[float] = None,
        resources: Sequence[ResourceType] = DEFAULT_RESOURCES,
    ) -> None:
        self.token = token
        self.bookmarkInterval = bookmarkInterval
        self._types: Dict[Tuple[str, str, str], ResourceType] = {
            (r.group, r.version, r.plural): r for r in resources
        }
        self._byKind: Dict[Tuple[str, str], ResourceType] = {(r.apiVersion, r.kind): r for r in resources}
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: Dict[Tuple[ResourceType, str, str], Dict[str, Any]] = {}
        self._history: Deque[_Event] = collections.deque(maxlen=historySize)
        self._evicted = 0  # the newest event dropped from the bounded history: older positions are lost
        self._expired = 0  # set by expireHistory(): new watches from an older position get 410
        self._watches: Set[_WatchStream] = set()
        self._connections: Set[socket.socket] = set()
        self._failures: List[_Failure] = []
        self._postHandlers: Dict[str, PostHandler] = {}
        self._requests: List[RecordedRequest] = []
        self._observers: List[Callable[[RecordedRequest], None]] = []
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._port = 0
        self._serving = False
        self._bookmarksSent = 0

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (on the same port as before after a L{stop}; a free one the first time)."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.api = self
        self._port = server.server_address[1]
        with self._cond:
            self._serving = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeKubeAPI", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and drop every open connection, watches included; the stored objects stay."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        with self._cond:
            self._serving = False
            connections = list(self._connections)
            for stream in self._watches:
                stream.cut = True
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        for connection in connections:
            _shutdown(connection)
        if thread is not None:
            thread.join()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def kubeconfig(self, path: str) -> str:
        """Write a kubeconfig file for this server (plain HTTP, bearer token) and return its path."""
        user: Dict[str, Any] = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        return path

    # -- the cluster, as tests see it -------------------------------------------------------------------

    def put(self, obj: Mapping[str, Any]) -> Dict[str, Any]:
        """Create or replace an object as a client with full rights would; returns the stored copy.

        A C{metadata.creationTimestamp} given on creation is kept (tests use it to order objects).
        """
        rtype = self._typeOf(obj)
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or ("default" if rtype.namespaced else "")
        with self._cond:
            if (rtype, namespace, meta.get("name")) in self._objects:
                body = copy.deepcopy(dict(obj))
                body.setdefault("metadata", {}).pop("resourceVersion", None)
                stored = self._update(rtype, namespace, meta["name"], body)
            else:
                stored = self._create(rtype, namespace, obj, keepTimestamp=True)
            return copy.deepcopy(stored)

    def get(self, kind: str, name: str, namespace: str = "") -> Optional[Dict[str, Any]]:
        """The stored object, or C{None}."""
        rtype = self._typeOfKind(kind)
        with self._cond:
            obj = self._objects.get((rtype, namespace if rtype.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def delete(self, kind: str, name: str, namespace: str = "") -> Dict[str, Any]:
        """Delete an object; returns its last state."""
        rtype = self._typeOfKind(kind)
        with self._cond:
            return copy.deepcopy(self._delete(rtype, namespace if rtype.namespaced else "", name, None))

    @property
    def resourceVersion(self) -> str:
        """The current (latest) resourceVersion of the whole store."""
        with self._cond:
            return str(self._rv)

    # -- fault injection and hooks ----------------------------------------------------------------------

    def cutWatches(self) -> int:
        """Drop every open watch connection mid-stream (no terminating chunk); returns how many."""
        with self._cond:
            streams = list(self._watches)
            for stream in streams:
                stream.cut = True
                _shutdown(stream.connection)
            self._cond.notify_all()
        return len(streams)

    def expireHistory(self) -> None:
        """Compact the history: a watch from any resourceVersion handed out so far gets 410 Gone.

        The store's resourceVersion moves on by one (as a write elsewhere in the cluster would), so that a
        fresh list returns a version that can be watched from.  Open watches are not affected.
        """
        with self._cond:
            self._rv += 1
            self._expired = self._rv

    def sendBookmark(self) -> None:
        """Send a BOOKMARK on every open watch that allows them."""
        with self._cond:
            for stream in self._watches:
                stream.bookmarkRequested = True
            self._cond.notify_all()

    def failNext(
        self, path: str, code: int, *, method: Optional[str] = None, times: int = 1, body: Any = None
    ) -> None:
        """
        Answer the next C{times} requests for C{path} (any query; C{method} if given) with C{code} and a
        C{Status}, or with C{body} when given (bytes as they are, anything else as JSON): a broken server.
        """
        with self._cond:
            self._failures.append(_Failure(path, code, method, times, body))

    def addPostHandler(self, path: str, handler: PostHandler) -> None:
        """Serve C{POST path} with C{handler(body) -> (code, responseObject)} (TokenReview and the like)."""
        with self._cond:
            self._postHandlers[path] = handler

    def addRequestObserver(self, observer: Callable[[RecordedRequest], None]) -> None:
        """Call C{observer(request)} on the server's thread for every request, as it arrives."""
        with self._cond:
            self._observers.append(observer)

    @property
    def requests(self) -> List[RecordedRequest]:
        """Every request received so far, oldest first."""
        with self._cond:
            return list(self._requests)

    def clearRequests(self) -> None:
        with self._cond:
            self._requests.clear()

    @property
    def bookmarksSent(self) -> int:
        """How many BOOKMARK events have been written so far."""
        with self._cond:
            return self._bookmarksSent

    @property
    def openWatches(self) -> int:
        with self._cond:
            return len(self._watches)

    # -- storage (all under self._cond) ----------------------------------------------------------------

    def _typeOf(self, obj: Mapping[str, Any]) -> ResourceType:
        rtype = self._byKind.get((obj.get("apiVersion", ""), obj.get("kind", "")))
        if rtype is None:
            raise KeyError(f"the fake does not serve {obj.get('apiVersion')} {obj.get('kind')}")
        return rtype

    def _typeOfKind(self, kind: str) -> ResourceType:
        for (_, k), rtype in self._byKind.items():
            if k == kind:
                return rtype
        raise KeyError(f"the fake does not serve kind {kind}")

    def _commit(self, rtype: ResourceType, eventType: str, obj: Dict[str, Any]) -> None:
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        key = (rtype, meta.get("namespace", ""), meta["name"])
        if eventType == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = obj
        if self._history.maxlen is not None and len(self._history) == self._history.maxlen:
            self._evicted = max(self._evicted, self._history[0].rv)
        self._history.append(_Event(self._rv, rtype, eventType, copy.deepcopy(obj)))
        self._cond.notify_all()

    def _normalise(self, rtype: ResourceType, namespace: str, obj: Dict[str, Any]) -> None:
        """Server-side defaulting shared by create and update."""
        if obj.setdefault("apiVersion", rtype.apiVersion) != rtype.apiVersion or (
            obj.setdefault("kind", rtype.kind) != rtype.kind
        ):
            raise _APIError(400, f"the object is a {obj['apiVersion']} {obj['kind']}, not {rtype.qualified}")
        meta = obj["metadata"]
        if rtype.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise _APIError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if rtype.kind == "Secret" and "stringData" in obj:
            data = obj.setdefault("data", {}) or {}
            for key, value in (obj.pop("stringData") or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data

    def _create(
        self, rtype: ResourceType, namespace: str, body: Mapping[str, Any], *, keepTimestamp: bool = False
    ) -> Dict[str, Any]:
        obj = copy.deepcopy(dict(body))
        if not isinstance(obj.get("metadata"), dict) or not obj["metadata"].get("name"):
            raise _APIError(
                422, f'{rtype.kind} "" is invalid: metadata.name: Required value: name is required'
            )
        self._normalise(rtype, namespace, obj)
        meta = obj["metadata"]
        if (rtype, namespace, meta["name"]) in self._objects:
            raise _APIError(
                409,
                f'{rtype.qualified} "{meta["name"]}" already exists',
                "AlreadyExists",
                {"name": meta["name"], "group": rtype.group, "kind": rtype.plural},
            )
        meta.pop("resourceVersion", None)
        meta["uid"] = str(uuid.uuid4())
        if not (keepTimestamp and meta.get("creationTimestamp")):
            meta["creationTimestamp"] = _now()
        if rtype.custom:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        self._commit(rtype, "ADDED", obj)
        return obj

    def _existing(self, rtype: ResourceType, namespace: str, name: str) -> Dict[str, Any]:
        obj = self._objects.get((rtype, namespace, name))
        if obj is None:
            raise _APIError(
                404,
                f'{rtype.qualified} "{name}" not found',
                details={"name": name, "group": rtype.group, "kind": rtype.plural},
            )
        return obj

    def _update(
        self, rtype: ResourceType, namespace: str, name: str, body: Any, *, requireVersion: bool = False
    ) -> Dict[str, Any]:
        old = self._existing(rtype, namespace, name)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise _APIError(400, "the body is not an object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if meta.setdefault("name", name) != name:
            raise _APIError(
                400, f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
        self._normalise(rtype, namespace, obj)
        oldMeta = old["metadata"]
        wanted = meta.get("resourceVersion")
        if wanted is None and requireVersion:
            raise _APIError(
                422,
                f'{rtype.kind} "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                "must be specified for an update",
            )
        if wanted is not None and str(wanted) != oldMeta["resourceVersion"]:
            raise _APIError(
                409,
                f'Operation cannot be fulfilled on {rtype.qualified} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                details={"name": name, "group": rtype.group, "kind": rtype.plural},
            )
        for managed in ("uid", "creationTimestamp", "resourceVersion", "generation"):
            if managed in oldMeta:
                meta[managed] = oldMeta[managed]
            else:
                meta.pop(managed, None)
        if rtype.custom and _nonMetadata(obj) != _nonMetadata(old):
            meta["generation"] = oldMeta.get("generation", 0) + 1
        if obj == old:
            return old  # nothing changed: no write, no event, same resourceVersion
        self._commit(rtype, "MODIFIED", obj)
        return obj

    def _delete(
        self, rtype: ResourceType, namespace: str, name: str, preconditions: Optional[Mapping[str, Any]]
    ) -> Dict[str, Any]:
        old = self._existing(rtype, namespace, name)
        for field in ("resourceVersion", "uid"):
            wanted = (preconditions or {}).get(field)
            if wanted is not None and wanted != old["metadata"].get(field):
                raise _APIError(
                    409,
                    f'Operation cannot be fulfilled on {rtype.qualified} "{name}": Precondition failed: '
                    f"{field}: {wanted}, {field} in object meta: {old['metadata'].get(field)}",
                )
        obj = copy.deepcopy(old)
        self._commit(rtype, "DELETED", obj)
        return obj

    def _matching(
        self, rtype: ResourceType, namespace: Optional[str], fields: List[_Selector], labels: List[_Selector]
    ) -> List[Dict[str, Any]]:
        found = [
            obj
            for (t, ns, _), obj in self._objects.items()
            if t == rtype
            and (namespace is None or ns == namespace)
            and _matchesSelectors(obj, fields, labels)
        ]
        found.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return found

    # -- HTTP -------------------------------------------------------------------------------------------

    def _registerConnection(self, connection: socket.socket) -> bool:
        with self._cond:
            if not self._serving:
                _shutdown(connection)
                return False
            self._connections.add(connection)
            return True

    def _unregisterConnection(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.discard(connection)

    def _handle(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        body = _readBody(handler)
        request = RecordedRequest(
            method, split.path, query, {k.lower(): v for k, v in handler.headers.items()}, body
        )
        with self._cond:
            self._requests.append(request)
            observers = list(self._observers)
        for observer in observers:
            observer(request)
        try:
            code, response = self._respond(handler, request)
        except _APIError as e:
            code, response = e.code, e.status
        except Exception as e:  # the fake must answer like a server, never drop the connection
            code, response = 500, statusObject(500, f"fake API server error: {e!r}")
        if response is not None:
            _sendJSON(handler, code, response)

    def _respond(self, handler: _Handler, request: RecordedRequest) -> Tuple[int, Optional[Any]]:
        path, method = request.path, request.method
        with self._cond:
            for failure in self._failures:
                if failure.path == path and failure.method in (None, method):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    if failure.body is not None:
                        return failure.code, failure.body
                    raise _APIError(failure.code, f"injected failure for {method} {path}")
            postHandler = self._postHandlers.get(path) if method == "POST" else None
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            raise _APIError(401, "Unauthorized")
        if postHandler is not None:
            return postHandler(_parseJSON(request.body))
        if path == "/version":
            return 200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-ksproxy-fake"}
        rtype, namespace, name = self._route(path)
        if method == "GET" and name is None:
            fields = _parseFieldSelector(request.query.get("fieldSelector", ""))
            labels = _parseLabelSelector(request.query.get("labelSelector", ""))
            if request.isWatch:
                self._watch(handler, request, rtype, namespace, fields, labels)
                return 200, None
            return 200, self._list(rtype, namespace, fields, labels)
        with self._cond:
            if method == "GET" and name is not None:
                return 200, copy.deepcopy(self._existing(rtype, namespace or "", name))
            if method == "POST" and name is None and (namespace is not None or not rtype.namespaced):
                body = _parseJSON(request.body)
                if not isinstance(body, dict):
                    raise _APIError(400, "the body is not an object")
                return 201, copy.deepcopy(self._create(rtype, namespace or "", body))
            if method == "PUT" and name is not None:
                updated = self._update(
                    rtype, namespace or "", name, _parseJSON(request.body), requireVersion=rtype.custom
                )
                return 200, copy.deepcopy(updated)
            if method == "PATCH" and name is not None:
                return 200, copy.deepcopy(self._patch(rtype, namespace or "", name, request))
            if method == "DELETE" and name is not None:
                options = _parseJSON(request.body) if request.body else {}
                preconditions = options.get("preconditions") if isinstance(options, dict) else None
                return 200, copy.deepcopy(self._delete(rtype, namespace or "", name, preconditions))
        raise _APIError(405, f"the server does not allow this method on the requested resource: {method}")

    def _route(self, path: str) -> Tuple[ResourceType, Optional[str], Optional[str]]:
        segments = [unquote(s) for s in path.strip("/").split("/")]
        if len(segments) >= 2 and segments[0] == "api":
            group, version, rest = "", segments[1], segments[2:]
        elif len(segments) >= 3 and segments[0] == "apis":
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            raise _APIError(404, "the server could not find the requested resource")
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        rtype = self._types.get((group, version, rest[0] if rest else ""))
        # No subresources: the ksproxy CRDs have no status subresource (SPEC 8).
        if (
            rtype is None
            or len(rest) > 2
            or (namespace is not None and not rtype.namespaced)
            or (rtype.namespaced and len(rest) == 2 and namespace is None)
        ):
            raise _APIError(404, "the server could not find the requested resource")
        return rtype, namespace, rest[1] if len(rest) == 2 else None

    def _list(
        self, rtype: ResourceType, namespace: Optional[str], fields: List[_Selector], labels: List[_Selector]
    ) -> Dict[str, Any]:
        with self._cond:
            items = copy.deepcopy(self._matching(rtype, namespace, fields, labels))
            rv = str(self._rv)
        if not rtype.custom:
            # The API server leaves kind and apiVersion out of the items of built-in lists.
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return {
            "kind": rtype.listKind,
            "apiVersion": rtype.apiVersion,
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    def _patch(
        self, rtype: ResourceType, namespace: str, name: str, request: RecordedRequest
    ) -> Dict[str, Any]:
        contentType = request.headers.get("content-type", "").split(";")[0].strip()
        old = self._existing(rtype, namespace, name)
        patch = _parseJSON(request.body)
        if contentType == "application/merge-patch+json" or (
            contentType == "application/strategic-merge-patch+json" and not rtype.custom
        ):
            # Strategic merge on the built-in kinds served here (flat maps) is the same as a merge patch.
            patched = mergePatch(old, patch)
        elif contentType == "application/json-patch+json":
            try:
                patched = jsonPatch(old, patch)
            except PatchError as e:
                raise _APIError(
                    422, f"the server rejected our request due to an error in our request: {e}"
                ) from e
        else:
            accepted = "application/json-patch+json, application/merge-patch+json"
            if not rtype.custom:
                accepted += ", application/strategic-merge-patch+json"
            raise _APIError(
                415,
                f"the body of the request was in an unknown format - accepted media types include: {accepted}",
            )
        if not isinstance(patched, dict):
            raise _APIError(422, "the patched object is not an object")
        return self._update(rtype, namespace, name, patched)

    def _watch(
        self,
        handler: _Handler,
        request: RecordedRequest,
        rtype: ResourceType,
        namespace: Optional[str],
        fields: List[_Selector],
        labels: List[_Selector],
    ) -> None:
        sinceText = request.query.get("resourceVersion", "")
        if sinceText not in ("", "0") and not sinceText.isdigit():
            raise _APIError(400, f"invalid resource version: {sinceText}")
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        timeout = float(request.query["timeoutSeconds"]) if request.query.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout is not None else None
        stream = _WatchStream(handler.connection, rtype)

        def matches(obj: Mapping[str, Any]) -> bool:
            objNamespace = obj["metadata"].get("namespace", "")
            return (namespace is None or objNamespace == namespace) and _matchesSelectors(obj, fields, labels)

        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Cache-Control", "no-cache, private")
        handler.end_headers()
        with self._cond:
            self._watches.add(stream)
            if sinceText in ("", "0"):
                # "Start at most recent"/"any": synthetic ADDED events for what exists, then changes.
                pending = [
                    ("ADDED", copy.deepcopy(o)) for o in self._matching(rtype, namespace, fields, labels)
                ]
                position = self._rv
            else:
                pending, position = [], int(sinceText)
                floor = max(self._evicted, self._expired)
                if position < floor:
                    gone = statusObject(410, f"too old resource version: {position} ({floor})", "Expired")
                    pending = [("ERROR", gone)]
        try:
            for eventType, obj in pending:
                _writeEvent(handler, eventType, obj)
            if pending and pending[-1][0] == "ERROR":
                handler.wfile.write(b"0\r\n\r\n")
                return
            nextBookmark = time.monotonic() + self.bookmarkInterval if self.bookmarkInterval else None
            while True:
                expired = None
                with self._cond:
                    while True:
                        if stream.cut or not self._serving:
                            raise _StreamAborted()
                        if position < self._evicted:
                            # This watcher fell behind the bounded history.
                            expired = statusObject(
                                410, f"too old resource version: {position} ({self._evicted})", "Expired"
                            )
                            break
                        events = []
                        for event in reversed(self._history):
                            if event.rv <= position:
                                break
                            if event.rtype == rtype and matches(event.obj):
                                events.append(event)
                        events.reverse()
                        position = self._rv
                        now = time.monotonic()
                        bookmarkDue = bookmarks and (
                            stream.bookmarkRequested or (nextBookmark is not None and now >= nextBookmark)
                        )
                        timedOut = deadline is not None and now >= deadline
                        if events or bookmarkDue or timedOut:
                            stream.bookmarkRequested = False
                            break
                        if _peerClosed(stream.connection):
                            raise _StreamAborted()
                        # Wake now and then to notice a client that went away, as the real server does.
                        waits = [t - now for t in (deadline, nextBookmark) if t is not None] + [0.1]
                        self._cond.wait(max(0.0, min(waits)))
                if expired is not None:
                    _writeEvent(handler, "ERROR", expired)
                    break
                for event in events:
                    _writeEvent(handler, event.type, event.obj)
                if bookmarkDue:
                    marker = {"kind": rtype.kind, "apiVersion": rtype.apiVersion}
                    marker["metadata"] = {"resourceVersion": str(position)}
                    _writeEvent(handler, "BOOKMARK", marker)
                    with self._cond:
                        self._bookmarksSent += 1
                    if self.bookmarkInterval:
                        nextBookmark = time.monotonic() + self.bookmarkInterval
                if timedOut:
                    break
            handler.wfile.write(b"0\r\n\r\n")
        except (_StreamAborted, OSError):
            handler.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(stream)


def _shutdown(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _peerClosed(connection: socket.socket) -> bool:
    """The client closed its end (a watch client sends nothing, so readable means EOF or reset)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _readBody(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _parseJSON(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError as e:
        raise _APIError(400, f"the request body is not JSON: {e}") from e


def _sendJSON(handler: BaseHTTPRequestHandler, code: int, obj: Any) -> None:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    try:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except OSError:
        handler.close_connection = True


def _writeEvent(handler: BaseHTTPRequestHandler, eventType: str, obj: Any) -> None:
    line = json.dumps({"type": eventType, "object": obj}).encode() + b"\n"
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
