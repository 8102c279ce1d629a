"""
Upstream health (SPEC 4.4): one active checker per distinct upstream and check, shared by every route that
uses it, reconciled by identity on every table rebuild; plus passive marks from live traffic.

The request path asks L{HealthRegistry.isDown} (a set lookup), so a down upstream answers 503 at once without
a connection attempt.  Until its first check completes an upstream counts as up, so a restart of ksproxy does
not black out routes.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from .failures import describeFailure
from .model.types import APIService, Endpoint, HealthCheck, Resource, ReverseProxy

__all__ = ["CheckerKey", "Checker", "HealthRegistry", "checksOf"]

log = Logger()

# (upstream identity, check settings)
CheckerKey = Tuple[tuple, HealthCheck]
Probe = Callable[[Endpoint, HealthCheck], "defer.Deferred[Optional[str]]"]


def checksOf(resources: Iterable[Resource]) -> Dict[CheckerKey, Endpoint]:
    """The distinct (upstream, check) pairs the served resources ask for."""
    wanted: Dict[CheckerKey, Endpoint] = {}
    for resource in resources:
        if isinstance(resource, ReverseProxy):
            endpoint, check = resource.upstream, resource.healthCheck
        elif isinstance(resource, APIService):
            endpoint, check = resource.endpoint, resource.healthCheck
        else:
            continue
        if check is not None:
            wanted[(endpoint.key, check)] = endpoint
    return wanted


@attrs.define(eq=False)
class Checker:
    """Runs one check on an interval; counts consecutive results against the rise/fall thresholds."""

    endpoint: Endpoint
    check: HealthCheck
    clock: object
    probe: Probe
    onChange: Callable[[Checker], None]
    healthy: bool = True
    checked: bool = False
    successes: int = 0
    failures: int = 0
    lastError: str = ""
    runs: int = 0
    _loop: Optional[task.LoopingCall] = None
    _inFlight: Optional[defer.Deferred] = None
    _stopped: bool = False

    def start(self) -> None:
        self._stopped = False
        self._loop = task.LoopingCall(self.runOnce)
        self._loop.clock = self.clock
        self._loop.start(self.check.interval, now=True).addErrback(
            lambda f: log.failure("health checker for {origin} stopped", f, origin=self.endpoint.origin)
        )

    def stop(self) -> None:
        # Set first: the cancelled in-flight check must not report a result for a checker that is gone.
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        inFlight, self._inFlight = self._inFlight, None
        if inFlight is not None:
            inFlight.cancel()

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def runOnce(self) -> None:
        if self._inFlight is not None or self._stopped:
            return  # the previous check has not finished; its own timeout will end it
        self.runs += 1
        d = defer.maybeDeferred(self.probe, self.endpoint, self.check)
        timer = self.clock.callLater(self.check.timeout, d.cancel)  # type: ignore[attr-defined]
        self._inFlight = d

        def done(result: object) -> None:
            if timer.active():
                timer.cancel()
            if self._inFlight is d:
                self._inFlight = None
            if self._stopped:
                return None
            if isinstance(result, Failure):
                # Our own timer cancels with CancelledError; the client's timeout comes wrapped in a
                # ResponseNeverReceived whose text is a list repr: both read "no answer within Ns".
                self.record(describeFailure(result, self.check.timeout))
            else:
                self.record(result)  # type: ignore[arg-type]
            return None

        d.addBoth(done)

    def record(self, error: Optional[str]) -> None:
        """One check result: None for success, else what went wrong."""
        self.checked = True
        before = self.healthy
        if error is None:
            self.successes += 1
            self.failures = 0
            self.lastError = ""
            if not self.healthy and self.successes >= self.check.rise:
                self.healthy = True
        else:
            self.failures += 1
            self.successes = 0
            self.lastError = error
            if self.healthy and self.failures >= self.check.fall:
                self.healthy = False
        if before != self.healthy:
            log.info(
                "upstream {origin} is now {state}{why}",
                origin=self.endpoint.origin,
                state="healthy" if self.healthy else "unhealthy",
                why=f": {error}" if error else "",
            )
            self.onChange(self)

    def forceDown(self, why: str) -> None:
        """Passive health: live traffic says the upstream is failing; down until a check succeeds."""
        if self.healthy and not self._stopped:
            self.healthy = False
            self.successes = 0
            self.lastError = why
            log.info("upstream {origin} marked unhealthy by live traffic: {why}", origin=self.endpoint.origin, why=why)
            self.onChange(self)

    @property
    def state(self) -> str:
        """"up", "down", or "unknown" before the first check has completed (which counts as up)."""
        if not self.healthy:
            return "down"
        return "up" if self.checked else "unknown"


class HealthRegistry:
    """
    All checkers, keyed by L{CheckerKey}, and the set of upstream identities that are down.

    @param passiveThreshold: consecutive live-traffic failures (connection failures, timeouts, 5xx) that mark
        an upstream with a checker down; upstreams without a checker are never marked down passively, since
        nothing would bring them back.
    """

    def __init__(self, clock, probe: Probe, *, passiveThreshold: int = 5) -> None:
        self.clock = clock
        self.probe = probe
        self.passiveThreshold = passiveThreshold
        self.checkers: Dict[CheckerKey, Checker] = {}
        self._byUpstream: Dict[tuple, Set[CheckerKey]] = {}
        self._down: Set[tuple] = set()
        self._passive: Dict[tuple, int] = {}
        self.listeners: list = []

    # -- request path -----------------------------------------------------------------------------------------

    def isDown(self, upstreamKey: str) -> bool:
        return upstreamKey in self._down

    def passiveFailure(self, upstreamKey: str) -> None:
        keys = self._byUpstream.get(upstreamKey)
        if not keys:
            return
        count = self._passive.get(upstreamKey, 0) + 1
        self._passive[upstreamKey] = count
        if count >= self.passiveThreshold:
            self._passive[upstreamKey] = 0
            for key in keys:
                self.checkers[key].forceDown(f"{count} consecutive failed requests")

    def passiveSuccess(self, upstreamKey: str) -> None:
        if upstreamKey in self._passive:
            del self._passive[upstreamKey]

    # -- lifecycle --------------------------------------------------------------------------------------------

    def reconcile(self, wanted: Dict[CheckerKey, Endpoint]) -> None:
        """Stop checkers no longer wanted, start new ones; a changed check is a new key, so only it restarts."""
        for key in [k for k in self.checkers if k not in wanted]:
            checker = self.checkers.pop(key)
            checker.stop()
            upstream = key[0]
            keys = self._byUpstream.get(upstream)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._byUpstream[upstream]
                    self._passive.pop(upstream, None)
            self._recompute(upstream)
        for key, endpoint in wanted.items():
            if key not in self.checkers:
                checker = Checker(endpoint, key[1], self.clock, self.probe, self._changed)
                self.checkers[key] = checker
                self._byUpstream.setdefault(key[0], set()).add(key)
                checker.start()

    def stopAll(self) -> None:
        self.reconcile({})

    def _changed(self, checker: Checker) -> None:
        self._recompute(checker.endpoint.key)
        for listener in self.listeners:
            listener(checker)

    def _recompute(self, upstream: tuple) -> None:
        keys = self._byUpstream.get(upstream, ())
        if any(not self.checkers[k].healthy for k in keys):
            self._down.add(upstream)
        else:
            self._down.discard(upstream)

    def upstreamHealthy(self, upstreamKey: str) -> Optional[bool]:
        """True/False once checked, None when no checker covers it or none has completed yet."""
        keys = self._byUpstream.get(upstreamKey)
        if not keys:
            return None
        checkers = [self.checkers[k] for k in keys]
        if upstreamKey in self._down:
            return False
        if not any(c.checked for c in checkers):
            return None
        return True

    def describe(self) -> List[Dict[str, Any]]:
        """Every checker's state, for /debug/routes and the upstream health gauge."""
        return [
            {
                "upstream": c.endpoint.origin,
                "tls": c.endpoint.tls.fingerprint,
                "check": c.check.target,
                "interval": c.check.interval,
                "timeout": c.check.timeout,
                "expectStatus": c.check.status,
                "rise": c.check.rise,
                "fall": c.check.fall,
                "state": c.state,
                "healthy": c.healthy,
                "checked": c.checked,
                "consecutiveFailures": c.failures,
                "consecutiveSuccesses": c.successes,
                "checks": c.runs,
                "lastError": c.lastError,
            }
            for c in self.checkers.values()
        ]


def httpProbe(client) -> Probe:  # type: ignore[no-untyped-def]
    """A probe that GETs the check target with the upstream's TLS settings and compares the status."""

    @defer.inlineCallbacks
    def probe(endpoint: Endpoint, check: HealthCheck):  # type: ignore[no-untyped-def]
        target = check.target
        code, _ = yield client.get(endpoint, target, timeout=check.timeout, maxBytes=1 << 20)
        if code != check.status:
            return f"{client.url(endpoint, target)} answered {code}, expected {check.status}"
        return None

    return probe
