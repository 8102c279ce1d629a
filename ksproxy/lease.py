# -*- test-case-name: tests.unit.test_status -*-
"""
Leader election on a C{coordination.k8s.io/v1} Lease, so that only one of several replicas writes status.

It follows client-go's leaderelection: try every C{retryPeriod}; a holder renews C{renewTime}; another replica
takes over when the record it sees has not changed for the record's C{leaseDurationSeconds} (measured on the
local clock, so clock skew between nodes does not matter) or when the holder released it; a leader that has
not renewed for C{renewDeadline} stops acting as leader before its lease can expire.

The Lease is read and written as a plain dict through the client's generic C{*_namespaced_custom_object}
calls (same URL, same RBAC as the typed Lease API), which keeps the C{MicroTime} format under our control.
"""

from __future__ import annotations

import datetime
import math
from typing import Any, Callable, Dict, List, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["LeaseElector", "microTime"]

LEASE_GROUP = "coordination.k8s.io"
LEASE_VERSION = "v1"
LEASE_PLURAL = "leases"


def microTime(seconds: float) -> str:
    """Kubernetes C{MicroTime} (RFC 3339 with exactly six fractional digits, UTC)."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector(service.Service):
    """
    Holds, or waits for, one Lease.  Observers (L{addObserver}) are told on every change of L{isLeader}.

    @param api: an object with the client's C{get/create/replace_namespaced_custom_object} methods
        (a C{kubernetes.client.CustomObjectsApi}).
    @param runInThread: C{f(callable, *args, **kwargs) -> Deferred}, running blocking API calls off the
        reactor thread (see L{ksproxy.status_writer.ThreadRunner}).
    """

    log = Logger()

    def __init__(
        self,
        api: Any,
        *,
        namespace: str,
        name: str,
        identity: str,
        clock: IReactorTime,
        runInThread: Callable[..., defer.Deferred[Any]],
        leaseDuration: float = 15.0,
        renewDeadline: float = 10.0,
        retryPeriod: float = 2.0,
        requestTimeout: float = 5.0,
    ) -> None:
        if not retryPeriod < renewDeadline < leaseDuration:
            raise ValueError("need retryPeriod < renewDeadline < leaseDuration")
        self.api = api
        self.namespace = namespace
        self.leaseName = name
        self.identity = identity
        self.clock = clock
        self.runInThread = runInThread
        self.leaseDuration = leaseDuration
        self.renewDeadline = renewDeadline
        self.retryPeriod = retryPeriod
        self.requestTimeout = requestTimeout
        self.isLeader = False
        self._observers: List[Callable[[bool], None]] = []
        self._observedKey: Optional[tuple] = None
        self._observedAt = 0.0
        self._lastRenew = 0.0
        self._loop: Optional[task.LoopingCall] = None
        self._loopDone: Optional[defer.Deferred[Any]] = None

    def addObserver(self, observer: Callable[[bool], None]) -> None:
        self._observers.append(observer)

    def _setLeader(self, leader: bool) -> None:
        if leader == self.isLeader:
            return
        self.isLeader = leader
        self.log.info(
            "{identity} {what} lease {namespace}/{lease}",
            identity=self.identity, what="acquired" if leader else "lost",
            namespace=self.namespace, lease=self.leaseName,
        )
        for observer in list(self._observers):
            observer(leader)

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loopDone = self._loop.start(self.retryPeriod, now=True)
        self._loopDone.addErrback(lambda f: self.log.failure("lease loop died", f))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop trying, wait for a call in flight, and release the lease if we hold it."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._loopDone is not None:
            yield self._loopDone
        if self.isLeader:
            self._setLeader(False)
            try:
                yield self._release()
            except Exception as e:
                self.log.warn("could not release lease {lease}: {error}", lease=self.leaseName, error=e)

    def _kw(self) -> Dict[str, Any]:
        return {"_request_timeout": self.requestTimeout}

    def _call(self, name: str, *args: Any) -> defer.Deferred[Any]:
        method = getattr(self.api, name)
        return self.runInThread(method, LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, *args, **self._kw())

    @defer.inlineCallbacks
    def _tick(self) -> Any:
        try:
            yield self._tryAcquireOrRenew()
        except Exception as e:
            # The API server being away is routine; anything else is logged the same way and retried.
            self.log.warn("lease {lease}: {error}", lease=self.leaseName, error=_describe(e))
        if self.isLeader and self.clock.seconds() - self._lastRenew >= self.renewDeadline:
            self._setLeader(False)

    @defer.inlineCallbacks
    def _tryAcquireOrRenew(self) -> Any:
        try:
            lease = yield self._call("get_namespaced_custom_object", self.leaseName)
        except Exception as e:
            if getattr(e, "status", None) != 404:
                raise
            lease = None
        now = self.clock.seconds()
        if lease is None:
            yield self._write(None, self._record(now, acquireTime=now, transitions=0))
            return
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        key = (holder, spec.get("renewTime"), (lease.get("metadata") or {}).get("resourceVersion"))
        if key != self._observedKey:
            self._observedKey = key
            self._observedAt = now
        transitions = spec.get("leaseTransitions") or 0
        if holder == self.identity:
            record = self._record(now, acquireTime=None, transitions=transitions)
            record["acquireTime"] = spec.get("acquireTime") or microTime(now)
            yield self._write(lease, record)
            return
        self._setLeader(False)
        duration = spec.get("leaseDurationSeconds") or self.leaseDuration
        if holder and now < self._observedAt + duration:
            return
        self.log.info("taking over lease {lease} from {holder!r}", lease=self.leaseName, holder=holder)
        yield self._write(lease, self._record(now, acquireTime=now, transitions=transitions + 1))

    def _record(self, now: float, *, acquireTime: Optional[float], transitions: int) -> Dict[str, Any]:
        record: Dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, math.ceil(self.leaseDuration)),
            "renewTime": microTime(now),
            "leaseTransitions": transitions,
        }
        if acquireTime is not None:
            record["acquireTime"] = microTime(acquireTime)
        return record

    @defer.inlineCallbacks
    def _write(self, lease: Optional[Dict[str, Any]], spec: Dict[str, Any]) -> Any:
        now = self.clock.seconds()
        if lease is None:
            body = {
                "apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}",
                "kind": "Lease",
                "metadata": {"name": self.leaseName, "namespace": self.namespace},
                "spec": spec,
            }
            result = yield self._call("create_namespaced_custom_object", body)
        else:
            # replace carries metadata.resourceVersion: a concurrent writer makes this a 409, never a lost update.
            body = dict(lease, spec=spec)
            result = yield self._call("replace_namespaced_custom_object", self.leaseName, body)
        resultSpec = (result or {}).get("spec") or spec
        self._observedKey = (
            resultSpec.get("holderIdentity") or "", resultSpec.get("renewTime"),
            ((result or {}).get("metadata") or {}).get("resourceVersion"),
        )
        self._observedAt = now
        self._lastRenew = now
        self._setLeader(True)

    @defer.inlineCallbacks
    def _release(self) -> Any:
        lease = yield self._call("get_namespaced_custom_object", self.leaseName)
        spec = dict(lease.get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            return
        now = self.clock.seconds()
        spec.pop("holderIdentity", None)
        spec.update(leaseDurationSeconds=1, renewTime=microTime(now), acquireTime=microTime(now))
        yield self._call("replace_namespaced_custom_object", self.leaseName, dict(lease, spec=spec))


def _describe(error: BaseException) -> str:
    status = getattr(error, "status", None)
    if status is not None:
        return f"API status {status} {getattr(error, 'reason', '') or ''}".rstrip()
    return f"{type(error).__name__}: {error}"
