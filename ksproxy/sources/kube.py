# -*- test-case-name: tests.integration.test_kubesource -*-
"""
The Kubernetes source: list and watch the ksproxy custom resources, and the ConfigMaps and Secrets that
JSBundles use, and feed them to the inventory on the reactor thread.

Each collection is followed by its own thread (the C{kubernetes} client blocks): list, then watch from the
list's resourceVersion with bookmarks, resume a dropped watch from the last resourceVersion seen, list again
on 410 Gone, and wait with exponential backoff and jitter while the API server cannot be reached.  Nothing
the thread meets ends it: unexpected exceptions are logged and the loop carries on after a backoff.  Only
the reactor thread touches the inventory: the threads hand every result over with C{callFromThread}.

ConfigMaps and Secrets are never listed wholesale: one small watch (C{fieldSelector=metadata.name=...} in
one namespace) runs per object that a JSBundle's source refers to, started and stopped as references come
and go.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import attrs
from kubernetes import client
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ksproxy.kubeclient import loadConfiguration
from ksproxy.model.types import GROUP, KIND_APISERVICE, KIND_JSBUNDLE, KIND_REVERSEPROXY, KINDS, VERSION
from ksproxy.routing.background import loadJSON

__all__ = ["KubeSource", "ObjectRef", "bundleReferences", "PLURALS"]

PLURALS: Mapping[str, str] = {
    KIND_APISERVICE: "apiservices",
    KIND_REVERSEPROXY: "reverseproxies",
    KIND_JSBUNDLE: "jsbundles",
}

KIND_CONFIGMAP = "ConfigMap"
KIND_SECRET = "Secret"

# How long the threads may take to end after stopService before it gives up waiting for them.
STOP_GRACE = 1.0

_log = Logger()


@attrs.frozen
class ObjectRef:
    """A namespaced object that a JSBundle takes its script from."""

    kind: str  # KIND_CONFIGMAP or KIND_SECRET
    namespace: str
    name: str


def bundleReferences(raw: Mapping[str, Any]) -> FrozenSet[ObjectRef]:
    """
    The ConfigMap or Secret that a raw JSBundle's source uses, if any.

    Only the source that will be used counts (SPEC 1.4: raw, then configMapKeyRef, then secretKeyRef), so a
    Secret named next to an inline script is never read.  A reference without a namespace is left to the
    parser to reject.
    """
    spec = raw.get("spec")
    if not isinstance(spec, Mapping) or spec.get("raw"):
        return frozenset()
    rawFrom = spec.get("rawFrom")
    if not isinstance(rawFrom, Mapping):
        return frozenset()
    for field, kind in (("configMapKeyRef", KIND_CONFIGMAP), ("secretKeyRef", KIND_SECRET)):
        ref = rawFrom.get(field)
        if ref is None:
            continue
        if isinstance(ref, Mapping):
            name, namespace = ref.get("name"), ref.get("namespace")
            if isinstance(name, str) and name and isinstance(namespace, str) and namespace:
                return frozenset({ObjectRef(kind, namespace, name)})
        return frozenset()
    return frozenset()


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class _WatchFailed(Exception):
    """A watch ended in a way that calls for a backoff before the next try."""


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _interrupt(response: Any) -> None:
    """Wake a thread blocked reading C{response} (closing would wait for the lock its read holds)."""
    try:
        response.shutdown()  # urllib3 >= 2.3
        return
    except Exception:
        pass
    try:
        response.connection.sock.shutdown(socket.SHUT_RDWR)
    except Exception:
        pass


def _lines(response: Any) -> Iterator[bytes]:
    buffer = b""
    for chunk in response.stream(None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


class _Watcher:
    """
    List then watch one collection in a thread of its own, until L{stop}.

    @ivar listCall: calls the client's list function with the given keyword arguments (and
        C{_preload_content=False}); returns the raw urllib3 response.
    @ivar onList: called in the thread with the complete list of items.
    @ivar onEvent: called in the thread with (type, object) for ADDED, MODIFIED and DELETED.
    @ivar onFirstAttempt: called in the thread once, after the first list attempt, with whether it worked.
    """

    def __init__(
        self,
        source: KubeSource,
        label: str,
        kind: str,
        apiVersion: str,
        listCall: Callable[..., Any],
        onList: Callable[[List[Dict[str, Any]]], None],
        onEvent: Callable[[str, Dict[str, Any]], None],
        onFirstAttempt: Callable[[bool], None],
        apiClient: Optional[client.ApiClient] = None,
    ) -> None:
        self.source = source
        self._apiClient = apiClient
        self.label = label
        self.kind = kind
        self.apiVersion = apiVersion
        self._listCall = listCall
        self._onList = onList
        self._onEvent = onEvent
        self._onFirstAttempt: Optional[Callable[[bool], None]] = onFirstAttempt
        self.version: Optional[str] = None  # the watcher thread's resume point; None: list first
        self.active = True  # reactor thread only: False once retired, so late deliveries are dropped
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self.thread = threading.Thread(target=self._run, name=f"ksproxy-kube {label}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to end and wake it if it is blocked on the network or in a backoff."""
        self._stopping.set()
        with self._lock:
            response = self._response
        if response is not None:
            _interrupt(response)

    # -- in the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # only a bug in the loop itself lands here
            _log.failure("Kubernetes watcher {label} ended unexpectedly", label=self.label)
        finally:
            if self._apiClient is not None:
                try:
                    self._apiClient.close()
                except Exception:
                    pass
            self.source._reactor.callFromThread(self.ended.callback, None)

    def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if self.version is None:
                    self.version = self._list()
                    failures = 0
                self._watch()
                failures = 0
            except _Gone:
                if self._stopping.is_set():
                    break
                _log.info(
                    "{label}: resourceVersion {version} expired, listing again",
                    label=self.label,
                    version=self.version,
                )
                self.version = None
                self.source._countRestart(self.kind)
            except Exception as e:
                if self._stopping.is_set():
                    break
                if self._onFirstAttempt is not None:
                    self._firstAttempt(False)
                failures += 1
                self.source._countRestart(self.kind)
                delay = self.source._backoffDelay(failures)
                if _expected(e):
                    _log.warn(
                        "{label}: {error}; retrying in {delay:.2f}s",
                        label=self.label,
                        error=_describe(e),
                        delay=delay,
                    )
                else:
                    _log.failure(
                        "{label}: unexpected error; retrying in {delay:.2f}s", label=self.label, delay=delay
                    )
                if isinstance(e, client.ApiException) and e.status == 410:
                    self.version = None
                # A dropped watch resumes from self.version, the last resourceVersion seen.
                self._stopping.wait(delay)

    def _firstAttempt(self, ok: bool) -> None:
        callback, self._onFirstAttempt = self._onFirstAttempt, None
        if callback is not None:
            callback(ok)

    def _open(self, **kwargs: Any) -> Any:
        """Start a request, keeping its response where L{stop} can reach it."""
        response = self._listCall(_preload_content=False, **kwargs)
        with self._lock:
            self._response = response
            stopping = self._stopping.is_set()
        if stopping:
            _interrupt(response)
        return response

    def _close(self, response: Any, reusable: bool) -> None:
        """Forget the response; its connection goes back to the pool only when it was read to the end."""
        with self._lock:
            self._response = None
        try:
            if reusable:
                response.release_conn()
            else:
                response.close()
        except Exception:
            pass

    def _complete(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        # Items of built-in lists come without kind and apiVersion; the inventory needs both.
        obj.setdefault("kind", self.kind)
        obj.setdefault("apiVersion", self.apiVersion)
        return obj

    def _list(self) -> str:
        response = self._open(_request_timeout=(self.source.connectTimeout, self.source.listTimeout))
        read = False
        try:
            data = response.data
            read = True
        finally:
            self._close(response, read)
        body = loadJSON(data)
        items = [self._complete(item) for item in body.get("items") or [] if isinstance(item, dict)]
        version = str(body["metadata"]["resourceVersion"])
        self._onList(items)
        self._firstAttempt(True)
        return version

    def _watch(self) -> None:
        """Follow a watch from C{self.version} until it ends, moving C{self.version} on as events arrive."""
        timeout = int(self.source.watchTimeout * random.uniform(0.8, 1.0)) or 1
        started = time.monotonic()
        received = 0
        response = self._open(
            watch=True,
            resource_version=self.version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            # A read timeout past the server's own end of the stream catches a half-open connection.
            _request_timeout=(self.source.connectTimeout, timeout + 30),
        )
        ended = False
        try:
            for line in _lines(response):
                if self._stopping.is_set():
                    return
                event = json.loads(line)
                eventType, obj = event.get("type"), event.get("object")
                if not isinstance(obj, dict):
                    raise _WatchFailed(f"watch event without an object: {line[:200]!r}")
                received += 1
                if eventType == "ERROR":
                    if obj.get("code") == 410 or obj.get("reason") in ("Expired", "Gone"):
                        raise _Gone()
                    raise _WatchFailed(
                        f"watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}"
                    )
                newVersion = (obj.get("metadata") or {}).get("resourceVersion")
                if eventType in ("ADDED", "MODIFIED", "DELETED"):
                    self._onEvent(eventType, self._complete(obj))
                elif eventType != "BOOKMARK":
                    _log.warn(
                        "{label}: unknown watch event type {type!r} skipped", label=self.label, type=eventType
                    )
                    continue
                if newVersion:
                    self.version = str(newVersion)
            ended = True
        finally:
            self._close(response, ended)
        if not received and time.monotonic() - started < min(1.0, timeout):
            # A server that ends every watch at once must not make us spin.
            raise _WatchFailed("the watch ended at once without an event")


def _expected(e: BaseException) -> bool:
    """Network and API trouble: worth a warning line, not a traceback."""
    if isinstance(e, (OSError, client.ApiException, _WatchFailed, json.JSONDecodeError)):
        return True
    return type(e).__module__.startswith("urllib3")


def _describe(e: BaseException) -> str:
    if isinstance(e, client.ApiException):
        return f"API error {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"


class KubeSource(service.Service):
    """
    Feed an inventory from the Kubernetes API.

    @param inventory: called on the reactor thread only: C{upsert(raw)}, C{delete(kind, name, namespace="")}
        and, for the complete list of one kind, C{replaceKind(kind, raws)}.
    @param kubeconfig: see L{loadConfiguration}; C{None} means in-cluster, else C{$KUBECONFIG}/C{~/.kube/config}.
    @param backoff: (first delay, cap) in seconds for retries while the API server cannot be reached.
    @param watchTimeout: the longest a watch request lasts (the server is asked for 80-100% of it).
    @param configuration: a ready client configuration (then C{kubeconfig} is ignored).

    @ivar synced: fires (with C{None}) once the first complete list of every kind has reached the
        inventory, together with a first attempt at every ConfigMap/Secret the listed JSBundles use.
    @ivar restarts: per kind, how many times a watch had to be re-established after an error or 410.
    """

    connectTimeout = 10.0
    listTimeout = 60.0

    def __init__(
        self,
        inventory: Any,
        reactor: Any,
        *,
        kubeconfig: Optional[str] = None,
        backoff: Tuple[float, float] = (0.5, 30.0),
        watchTimeout: int = 300,
        configuration: Optional[client.Configuration] = None,
    ) -> None:
        self._inventory = inventory
        self._reactor = reactor
        self._backoff = backoff
        self.watchTimeout = watchTimeout
        self._configuration = configuration if configuration is not None else loadConfiguration(kubeconfig)
        self.synced: defer.Deferred[None] = defer.Deferred()
        self.restarts: Dict[str, int] = {kind: 0 for kind in KINDS + (KIND_CONFIGMAP, KIND_SECRET)}
        self._restartsLock = threading.Lock()
        self._kindWatchers: Dict[str, _Watcher] = {}
        self._refWatchers: Dict[ObjectRef, _Watcher] = {}
        self._retiring: Set[_Watcher] = set()
        self._listed: Set[str] = set()
        self._refsAttempted: Set[ObjectRef] = set()
        self._bundleRefs: Dict[str, FrozenSet[ObjectRef]] = {}
        self._present: Set[ObjectRef] = set()  # references whose object is in the inventory
        self._names: Dict[str, Set[str]] = {}  # names per kind in the inventory (for replaceKind's fallback)

    # -- called from the watcher threads ----------------------------------------------------------------

    def _countRestart(self, kind: str) -> None:
        with self._restartsLock:
            self.restarts[kind] = self.restarts.get(kind, 0) + 1

    def _backoffDelay(self, failures: int) -> float:
        first, cap = self._backoff
        delay = min(cap, first * 2 ** min(failures - 1, 30))
        return random.uniform(delay / 2, delay)

    # -- lifecycle --------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for kind in KINDS:
            watcher = self._kindWatcher(kind)
            self._kindWatchers[kind] = watcher
            watcher.start()
        # References found by an earlier run (a restarted service) are followed again.
        self._reconcileRefs()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        watchers = list(self._kindWatchers.values()) + list(self._refWatchers.values()) + list(self._retiring)
        self._kindWatchers.clear()
        self._refWatchers.clear()
        self._retiring.clear()
        for watcher in watchers:
            watcher.active = False
            watcher.stop()
        done: defer.Deferred[None] = defer.Deferred()
        ended = defer.DeferredList([w.ended for w in watchers])

        def giveUp() -> None:
            alive = [w.label for w in watchers if w.thread.is_alive()]
            _log.warn(
                "Kubernetes watchers still running after {grace}s: {alive}", grace=STOP_GRACE, alive=alive
            )
            done.callback(None)

        timer = self._reactor.callLater(STOP_GRACE + 1.0, giveUp)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
                done.callback(None)

        ended.addCallback(finished)
        return done

    # -- building watchers ------------------------------------------------------------------------------

    @property
    def configuration(self) -> client.Configuration:
        """The client configuration in use (shared with the status writer and the auth reviews)."""
        return self._configuration

    def _apiClient(self) -> client.ApiClient:
        return client.ApiClient(self._configuration)

    def _kindWatcher(self, kind: str) -> _Watcher:
        apiClient = self._apiClient()
        api = client.CustomObjectsApi(apiClient)

        def listCall(**kwargs: Any) -> Any:
            return api.list_cluster_custom_object(GROUP, VERSION, PLURALS[kind], **kwargs)

        watcher: _Watcher

        def onList(items: List[Dict[str, Any]]) -> None:
            self._reactor.callFromThread(self._kindListed, watcher, kind, items)

        def onEvent(eventType: str, obj: Dict[str, Any]) -> None:
            self._reactor.callFromThread(self._kindEvent, watcher, kind, eventType, obj)

        watcher = _Watcher(
            self, kind, kind, f"{GROUP}/{VERSION}", listCall, onList, onEvent, lambda ok: None, apiClient
        )
        return watcher

    def _refWatcher(self, ref: ObjectRef) -> _Watcher:
        apiClient = self._apiClient()
        core = client.CoreV1Api(apiClient)
        listFunction = (
            core.list_namespaced_config_map if ref.kind == KIND_CONFIGMAP else core.list_namespaced_secret
        )
        selector = f"metadata.name={ref.name}"

        def listCall(**kwargs: Any) -> Any:
            return listFunction(ref.namespace, field_selector=selector, **kwargs)

        watcher: _Watcher

        def onList(items: List[Dict[str, Any]]) -> None:
            self._reactor.callFromThread(self._refListed, watcher, ref, items)

        def onEvent(eventType: str, obj: Dict[str, Any]) -> None:
            self._reactor.callFromThread(self._refEvent, watcher, ref, eventType, obj)

        def onFirstAttempt(ok: bool) -> None:
            self._reactor.callFromThread(self._refAttempted, watcher, ref)

        label = f"{ref.kind} {ref.namespace}/{ref.name}"
        watcher = _Watcher(self, label, ref.kind, "v1", listCall, onList, onEvent, onFirstAttempt, apiClient)
        return watcher

    # -- on the reactor thread --------------------------------------------------------------------------

    def _kindListed(self, watcher: _Watcher, kind: str, items: List[Dict[str, Any]]) -> None:
        if not watcher.active:
            return
        self._replaceKind(kind, items)
        if kind == KIND_JSBUNDLE:
            self._bundleRefs = {_name(item): bundleReferences(item) for item in items}
            self._reconcileRefs()
        self._listed.add(kind)
        self._checkSynced()

    def _replaceKind(self, kind: str, items: Sequence[Dict[str, Any]]) -> None:
        names = {_name(item) for item in items}
        replaceKind = getattr(self._inventory, "replaceKind", None)
        if replaceKind is not None:
            replaceKind(kind, items)
        else:
            # An inventory without replaceKind: the same end state, one call per object.
            for item in items:
                self._inventory.upsert(item)
            for gone in self._names.get(kind, set()) - names:
                self._inventory.delete(kind, gone)
        self._names[kind] = names

    def _kindEvent(self, watcher: _Watcher, kind: str, eventType: str, obj: Dict[str, Any]) -> None:
        if not watcher.active:
            return
        name = _name(obj)
        if eventType == "DELETED":
            self._inventory.delete(kind, name)
            self._names.setdefault(kind, set()).discard(name)
        else:
            self._inventory.upsert(obj)
            self._names.setdefault(kind, set()).add(name)
        if kind == KIND_JSBUNDLE:
            if eventType == "DELETED":
                self._bundleRefs.pop(name, None)
            else:
                self._bundleRefs[name] = bundleReferences(obj)
            self._reconcileRefs()

    def _reconcileRefs(self) -> None:
        """Follow exactly the objects that the known JSBundles use."""
        if not self.running:
            return
        wanted: Set[ObjectRef] = set().union(*self._bundleRefs.values()) if self._bundleRefs else set()
        for ref in sorted(set(self._refWatchers) - wanted, key=attrs.astuple):
            watcher = self._refWatchers.pop(ref)
            watcher.active = False
            watcher.stop()
            self._retiring.add(watcher)
            watcher.ended.addCallback(lambda _, w=watcher: self._retiring.discard(w))
            self._refsAttempted.discard(ref)
            if ref in self._present:
                self._present.discard(ref)
                self._inventory.delete(ref.kind, ref.name, ref.namespace)
        for ref in sorted(wanted - set(self._refWatchers), key=attrs.astuple):
            watcher = self._refWatcher(ref)
            self._refWatchers[ref] = watcher
            watcher.start()
        self._checkSynced()

    def _refListed(self, watcher: _Watcher, ref: ObjectRef, items: List[Dict[str, Any]]) -> None:
        if not watcher.active:
            return
        found = [item for item in items if _name(item) == ref.name]
        if found:
            self._present.add(ref)
            self._inventory.upsert(found[0])
        elif ref in self._present:
            self._present.discard(ref)
            self._inventory.delete(ref.kind, ref.name, ref.namespace)

    def _refEvent(self, watcher: _Watcher, ref: ObjectRef, eventType: str, obj: Dict[str, Any]) -> None:
        if not watcher.active or _name(obj) != ref.name:
            return
        if eventType == "DELETED":
            if ref in self._present:
                self._present.discard(ref)
                self._inventory.delete(ref.kind, ref.name, ref.namespace)
        else:
            self._present.add(ref)
            self._inventory.upsert(obj)

    def _refAttempted(self, watcher: _Watcher, ref: ObjectRef) -> None:
        if watcher.active:
            self._refsAttempted.add(ref)
            self._checkSynced()

    def _checkSynced(self) -> None:
        if self.synced.called or not self.running:
            return
        if self._listed.issuperset(KINDS) and self._refsAttempted.issuperset(self._refWatchers):
            self.synced.callback(None)
