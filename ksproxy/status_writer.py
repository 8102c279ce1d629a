# -*- test-case-name: tests.unit.test_status,tests.integration.test_statuswriter -*-
"""
Writes the status that L{ksproxy.status} computes back to the API server (SPEC 8).

Only the holder of the Lease writes; writes are merge patches of C{status} carrying the
C{resourceVersion} they were computed from (so a concurrent change is a 409, answered with a fresh read),
rate-limited by a token bucket, and skipped whenever nothing changed.  All state lives on the reactor thread;
only the blocking client calls run in threads.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ksproxy.lease import LeaseElector, _describe
from ksproxy.model.types import GROUP, KIND_APISERVICE, KIND_JSBUNDLE, KIND_REVERSEPROXY, VERSION, Rejection
from ksproxy.services import SequentialMultiService
from ksproxy.status import (
    desiredStatus,
    needsGenerationRefresh,
    rfc3339,
    specHash,
    statusIsCurrent,
    statusPatch,
)

__all__ = ["PLURALS", "StatusInput", "TokenBucket", "StatusWriter", "ThreadRunner", "makeStatusService"]

PLURALS = {KIND_APISERVICE: "apiservices", KIND_REVERSEPROXY: "reverseproxies", KIND_JSBUNDLE: "jsbundles"}
MERGE_PATCH = "application/merge-patch+json"


@attrs.frozen
class StatusInput:
    """What the rest of ksproxy knows about one object, as L{desiredStatus} takes it."""

    kind: str
    raw: Mapping[str, Any] = attrs.field(eq=False)  # the object as last read from the API server
    accepted: Optional[Rejection] = None
    conflict: Optional[str] = None
    refsError: Optional[str] = None
    programmed: bool = False
    upstreamHealthy: Optional[bool] = None
    defaultedLink: Optional[str] = None

    @property
    def name(self) -> str:
        return str((self.raw.get("metadata") or {}).get("name", ""))

    @property
    def key(self) -> Tuple[str, str]:
        return (self.kind, self.name)


class TokenBucket:
    """C{burst} tokens, refilled at C{rate} per second on an injected clock."""

    def __init__(self, rate: float, burst: int, clock: IReactorTime) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def delay(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)


class ThreadRunner(service.Service):
    """A small thread pool of its own for blocking client calls, started and stopped as a service."""

    def __init__(self, reactor: IReactorThreads, name: str = "ksproxy-status", maxThreads: int = 2) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=maxThreads, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)


class StatusWriter(service.Service):
    """
    Keeps the status of every object it is told about (L{update}) as L{desiredStatus} wants it.

    @param api: a C{kubernetes.client.CustomObjectsApi} (or anything with its C{get_cluster_custom_object}
        and C{patch_cluster_custom_object}).
    @param elector: the L{LeaseElector} (started and stopped with this service), or None for a single
        replica that always writes.
    @ivar writes: successful patches so far (for metrics and tests).
    """

    log = Logger()

    def __init__(
        self,
        api: Any,
        elector: Optional[LeaseElector],
        *,
        clock: IReactorTime,
        runInThread: Callable[..., defer.Deferred[Any]],
        manageState: bool = False,
        stateGate: bool = False,
        rate: float = 5.0,
        burst: int = 10,
        retryDelay: float = 5.0,
        maxConflicts: int = 5,
        requestTimeout: float = 10.0,
    ) -> None:
        self.api = api
        self.elector = elector
        self.clock = clock
        self.runInThread = runInThread
        self.manageState = manageState
        self.stateGate = stateGate
        self.retryDelay = retryDelay
        self.maxConflicts = maxConflicts
        self.requestTimeout = requestTimeout
        self.bucket = TokenBucket(rate, burst, clock)
        self.writes = 0
        self._pending: Dict[Tuple[str, str], StatusInput] = {}
        # specHash that the server's status is known to describe, per object (see needsGenerationRefresh).
        self._statusSpec: Dict[Tuple[str, str], str] = {}
        self._inFlight: Optional[defer.Deferred[Any]] = None
        self._timer: Optional[IDelayedCall] = None
        if elector is not None:
            elector.addObserver(self._leadershipChanged)

    @property
    def pending(self) -> int:
        """Objects whose status still needs a write."""
        return len(self._pending)

    @property
    def isLeader(self) -> bool:
        return self.elector is None or self.elector.isLeader

    def startService(self) -> None:
        super().startService()
        if self.elector is not None:
            self.elector.startService()
        self._kick()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._inFlight is not None:
            yield self._inFlight
        if self.elector is not None:
            yield self.elector.stopService()

    def update(self, inputs: Iterable[StatusInput], *, complete: bool = True) -> None:
        """
        Take the current inputs for some objects (C{complete}: for all of them; objects not listed are
        forgotten) and write what changed.
        """
        seen = set()
        for item in inputs:
            seen.add(item.key)
            if self._patchFor(item) is None:
                self._pending.pop(item.key, None)
            else:
                self._pending[item.key] = item
        if complete:
            for key in [k for k in self._pending if k not in seen]:
                del self._pending[key]
            for key in [k for k in self._statusSpec if k not in seen]:
                del self._statusSpec[key]
        self._kick()

    def forget(self, kind: str, name: str) -> None:
        """The object was deleted."""
        self._pending.pop((kind, name), None)
        self._statusSpec.pop((kind, name), None)

    def _patchFor(self, item: StatusInput) -> Optional[Dict[str, Any]]:
        raw = item.raw
        if statusIsCurrent(raw):
            self._statusSpec[item.key] = specHash(raw)
        desired = desiredStatus(
            raw, accepted=item.accepted, conflict=item.conflict, refsError=item.refsError,
            programmed=item.programmed, upstreamHealthy=item.upstreamHealthy, defaultedLink=item.defaultedLink,
            manageState=self.manageState, stateGate=self.stateGate,
        )
        refresh = needsGenerationRefresh(raw, self._statusSpec.get(item.key))
        return statusPatch(raw, desired, rfc3339(self.clock.seconds()), refreshGeneration=refresh)

    def _leadershipChanged(self, leader: bool) -> None:
        if leader:
            self._kick()

    def _timerFired(self) -> None:
        self._timer = None
        self._kick()

    def _kick(self) -> None:
        if not self.running or self._inFlight is not None or not self._pending or not self.isLeader:
            return
        if self._timer is not None and self._timer.active():
            return
        if not self.bucket.take():
            self._timer = self.clock.callLater(self.bucket.delay(), self._timerFired)
            return
        key = next(iter(self._pending))
        item = self._pending.pop(key)
        d = self._write(item, 0)
        if d.called:
            # Ran synchronously (tests): go on with the next one without recursion through _inFlight.
            d.addErrback(lambda f: self.log.failure("status write", f))
            self._kick()
            return
        self._inFlight = d

        def done(result: object) -> None:
            self._inFlight = None
            self._kick()

        d.addErrback(lambda f: self.log.failure("status write", f))
        d.addBoth(done)

    @defer.inlineCallbacks
    def _write(self, item: StatusInput, conflicts: int) -> Any:
        while True:
            patch = self._patchFor(item)
            if patch is None:
                return
            raw = item.raw
            resourceVersion = (raw.get("metadata") or {}).get("resourceVersion")
            body = dict(patch)
            if resourceVersion:
                body["metadata"] = {"resourceVersion": resourceVersion}
            try:
                yield self.runInThread(
                    self.api.patch_cluster_custom_object, GROUP, VERSION, PLURALS[item.kind], item.name, body,
                    _content_type=MERGE_PATCH, _request_timeout=self.requestTimeout,
                )
            except Exception as e:
                status = getattr(e, "status", None)
                if status == 404:
                    self.forget(*item.key)
                    return
                if status == 409 and conflicts < self.maxConflicts:
                    conflicts += 1
                    fresh = yield self._read(item)
                    if fresh is None:
                        return
                    if specHash(fresh) != specHash(raw):
                        # The spec moved on: our verdicts are for the old one.  The watch brings the new one.
                        return
                    item = attrs.evolve(item, raw=fresh)
                    continue
                self.log.warn(
                    "status of {kind}/{name} not written, retrying in {delay}s: {error}",
                    kind=item.kind, name=item.name, delay=self.retryDelay, error=_describe(e),
                )
                self._pending.setdefault(item.key, item)
                # Not after a stop: a write that failed while we were stopping is retried by the next leader.
                if self.running and (self._timer is None or not self._timer.active()):
                    self._timer = self.clock.callLater(self.retryDelay, self._timerFired)
                return
            self.writes += 1
            self._statusSpec[item.key] = specHash(raw)
            self.log.debug("status of {kind}/{name} written: {patch}", kind=item.kind, name=item.name, patch=patch)
            return

    @defer.inlineCallbacks
    def _read(self, item: StatusInput) -> Any:
        try:
            fresh = yield self.runInThread(
                self.api.get_cluster_custom_object, GROUP, VERSION, PLURALS[item.kind], item.name,
                _request_timeout=self.requestTimeout,
            )
        except Exception as e:
            if getattr(e, "status", None) == 404:
                self.forget(*item.key)
                return None
            raise
        return fresh


def defaultIdentity() -> str:
    """client-go's habit: host name plus a random suffix, unique per process."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


def makeStatusService(
    apiClient: Any,
    reactor: Any,
    *,
    namespace: str,
    leaseName: str = "ksproxy",
    identity: Optional[str] = None,
    manageState: bool = False,
    stateGate: bool = False,
    elect: bool = True,
    leaseDuration: float = 15.0,
    renewDeadline: float = 10.0,
    retryPeriod: float = 2.0,
) -> Tuple[service.MultiService, StatusWriter]:
    """
    Wire a L{StatusWriter} for a real cluster: its own threads, a L{LeaseElector} (unless C{elect} is
    false), the client's C{CustomObjectsApi} on C{apiClient}.  Returns the service to add to the
    application (threads start first and stop last) and the writer to feed with L{StatusWriter.update}.
    """
    from kubernetes import client as kclient  # only here: the rest of this module takes the API injected

    api = kclient.CustomObjectsApi(apiClient)
    runner = ThreadRunner(reactor)
    elector = None
    if elect:
        elector = LeaseElector(
            api, namespace=namespace, name=leaseName, identity=identity or defaultIdentity(), clock=reactor,
            runInThread=runner, leaseDuration=leaseDuration, renewDeadline=renewDeadline, retryPeriod=retryPeriod,
        )
    writer = StatusWriter(
        api, elector, clock=reactor, runInThread=runner, manageState=manageState, stateGate=stateGate
    )
    parent = SequentialMultiService()
    runner.setServiceParent(parent)
    writer.setServiceParent(parent)
    return parent, writer
