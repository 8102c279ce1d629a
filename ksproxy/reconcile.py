"""
From "the inventory changed" to "the new table is live": one rebuild at a time, one swap.

Sources feed the L{Inventory} on the reactor thread; every change schedules a single rebuild for the next
reactor turn, so a burst of watch events costs one compile (buildbot's C{reconfig_requested}).  The rebuild
compiles the table, resolves bundle bytes, and replaces the gateway's L{ServedState} with one assignment.
Observers (connection pool, health checkers, bundle fetcher, status writer) then reconcile against the report.

In threaded mode only the swap runs on the reactor: the compile and everything O(n) that the reactor would
otherwise do afterwards (the problems to log) run in the thread pool, inside a build window
(L{ksproxy.routing.background}), and the replaced table and report are freed in the thread pool too.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .bundles import resolveBundle
from .model.types import STATE_AVAILABLE, STATE_DISABLED, JSBundle, Resource
from .proxy.dispatch import Gateway, ServedState
from .routing import CompileResult, compileTable
from .routing.background import buildWindow, releaseInWindow
from .sources.inventory import Inventory, InventorySnapshot

__all__ = ["Reconciler", "BuildReport", "servability"]

log = Logger()


@attrs.frozen
class BuildReport:
    """Everything one rebuild saw and decided: what the operational endpoints and the status writer report."""

    generation: int
    snapshot: InventorySnapshot
    compiled: CompileResult
    # JSBundle name -> why its content could not be resolved (missing ConfigMap, key, ...).
    refErrors: Dict[str, str]
    # (kind, name) -> why it is not servable (disabled, state gate, unresolved reference), if it is not.
    unservable: Dict[Tuple[str, str], str]
    seconds: float
    # (level, message) for each problem of this build, worked out with the build (off the reactor).
    problems: Tuple[Tuple[str, str], ...] = ()
    rejected: int = 0  # objects whose latest version was rejected


def servability(resource: Resource, stateGate: Optional[str], refErrors: Dict[str, str]) -> Tuple[bool, str]:
    """SPEC 8: accepted (it is in the table), references resolve, not Disabled; with a state gate, Available."""
    state = resource.state
    if state == STATE_DISABLED:
        return False, "status.state is Disabled"
    if stateGate == "kubesphere" and state != STATE_AVAILABLE:
        return False, f"status.state is {state or 'unset'}, not Available (--state-gate=kubesphere)"
    if isinstance(resource, JSBundle) and resource.meta.name in refErrors:
        return False, refErrors[resource.meta.name]
    return True, ""


class Reconciler:
    """
    Owns the rebuild: inventory in, L{ServedState} out, observers told.

    With C{threaded}, the compile (pure: an immutable snapshot in, an immutable table out) runs in the
    reactor's thread pool, so a large change does not stall requests; only the swap runs on the reactor.
    One build runs at a time; changes that arrive meanwhile cause one more build when it ends.
    """

    def __init__(self, clock, gateway: Gateway, *, stateGate: Optional[str] = None, threaded: bool = False) -> None:
        self.clock = clock
        self.gateway = gateway
        self.stateGate = stateGate
        self.threaded = threaded
        self.inventory = Inventory(onChange=self.changed)
        self.observers: List[Callable[[BuildReport], None]] = []
        self.report: Optional[BuildReport] = None
        self.generation = 0
        self.ready = False
        self.rebuilds = 0
        self._pending = None
        self._building = False
        self._again = False
        self._logged: frozenset = frozenset()
        self._readyWaiters: List[Deferred] = []

    def whenReady(self) -> Deferred:
        """Fires once a table built after the source's first complete snapshot is live (what /readyz says)."""
        if self.ready and self.gateway.state.ready:
            return succeed(None)
        d: Deferred = Deferred()
        self._readyWaiters.append(d)
        return d

    def changed(self) -> None:
        """Something in the inventory changed: rebuild once, on the next reactor turn."""
        if self._building:
            self._again = True
        elif self._pending is None:
            self._pending = self.clock.callLater(0, self._rebuildNow)

    def markReady(self, _: object = None) -> None:
        """The source has delivered its first complete snapshot: the next table built is ready to serve."""
        self.ready = True
        if self.threaded:
            self.changed()
        else:
            self.rebuild()

    def _rebuildNow(self) -> None:
        self._pending = None
        if not self.threaded:
            self.rebuild()
            return
        from twisted.internet.threads import deferToThreadPool

        self._building = True
        snapshot, generation, ready = self.inventory.snapshot(), self.generation + 1, self.ready
        d = deferToThreadPool(self.clock, self.clock.getThreadPool(), self._computeInWindow, snapshot, generation)
        d.addCallback(lambda built: self._install(*built, ready))
        d.addErrback(lambda f: log.failure("building route table generation {generation} failed", f, generation=generation))
        d.addBoth(self._built)

    def _built(self, _: object) -> None:
        self._building = False
        if self._again:
            self._again = False
            self.changed()

    def rebuild(self) -> BuildReport:
        """Build and install now, on this thread (the CLI, tests, and the unthreaded mode)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return self._install(*self._compute(self.inventory.snapshot(), self.generation + 1), self.ready)

    def _computeInWindow(
        self, snapshot: InventorySnapshot, generation: int
    ) -> Tuple[BuildReport, Dict[Tuple[str, str], object]]:
        with buildWindow():
            return self._compute(snapshot, generation)

    def _compute(
        self, snapshot: InventorySnapshot, generation: int
    ) -> Tuple[BuildReport, Dict[Tuple[str, str], object]]:
        """Pure: bundle bytes, servability and the compiled table for one snapshot."""
        started = time.perf_counter()
        # Keyed by (bundle name, link), never by link alone: two bundles may claim one link, and only the
        # compile decides which one serves it; the gateway looks up the bytes of the route's own bundle.
        bundles: Dict[Tuple[str, str], object] = {}
        refErrors: Dict[str, str] = {}
        for resource in snapshot.resources:
            if isinstance(resource, JSBundle):
                for link, content in resolveBundle(resource, snapshot.refs).items():
                    if isinstance(content, str) and link == resource.link:
                        refErrors[resource.meta.name] = content
                    bundles[(resource.meta.name, link)] = content
        unservable: Dict[Tuple[str, str], str] = {}

        def isServable(resource: Resource) -> Tuple[bool, str]:
            ok, reason = servability(resource, self.stateGate, refErrors)
            if not ok:
                unservable[(resource.kind, resource.meta.name)] = reason
            return ok, reason

        compiled = compileTable(snapshot.resources, generation=generation, isServable=isServable)
        problems, rejected = _problems(snapshot, compiled, unservable)
        report = BuildReport(
            generation=generation,
            snapshot=snapshot,
            compiled=compiled,
            refErrors=refErrors,
            unservable=unservable,
            seconds=time.perf_counter() - started,
            problems=problems,
            rejected=rejected,
        )
        return report, bundles

    def _install(self, report: BuildReport, bundles: Dict[Tuple[str, str], object], ready: bool) -> BuildReport:
        """On the reactor: the swap (one assignment), then the observers."""
        replaced = [self.gateway.state, self.report]
        self.generation = report.generation
        self.gateway.state = ServedState(report.compiled.table, bundles, report.generation, ready)
        self.rebuilds += 1
        self.report = report
        self._logged = _logReport(report, self._logged)
        if ready:
            waiters, self._readyWaiters = self._readyWaiters, []
            for d in waiters:
                d.callback(None)
        for observer in self.observers:
            try:
                observer(report)
            except Exception:
                log.failure("observer of the route table failed")
        if self.threaded:
            # Freeing a large table and its report takes a while: a pool thread does it, in small steps.
            self.clock.getThreadPool().callInThread(releaseInWindow, replaced)
        return report


def _problems(
    snap: InventorySnapshot, compiled: CompileResult, unservable: Dict[Tuple[str, str], str]
) -> Tuple[Tuple[Tuple[str, str], ...], int]:
    """Every problem a build has to report, as (log level, message), and the number of rejected objects."""
    problems = []
    rejected = 0
    for record in snap.records.values():
        if record.rejection is not None:
            rejected += 1
            suffix = " (serving its last good version)" if record.current is not None else ""
            problems.append(("warn", f"rejected {record.rejection}{suffix}"))
        if record.warnings:
            problems.extend(("warn", f"warning: {w}") for w in record.warnings)
        if record.notes:
            problems.extend(("debug", f"note: {n}") for n in record.notes)
    problems.extend(("warn", f"conflict: {c.message}") for c in compiled.conflicts)
    problems.extend(("warn", f"duplicate: {d}") for d in snap.duplicates)
    problems.extend(("info", f"skipped: {s}") for s in snap.skipped)
    problems.extend(("error", f"cannot load {e.message}") for e in snap.sourceErrors)
    problems.extend(("warn", f"not servable: {kind}/{name}: {why}") for (kind, name), why in unservable.items())
    return tuple(problems), rejected


# New problems logged one line each per build; the rest in one line.  The log is written on the reactor: a
# reload that rejects 10,000 resources at once would otherwise stall requests for 150 ms writing it.
MAX_PROBLEM_LINES = 100


def _logReport(report: BuildReport, logged: frozenset) -> frozenset:
    """One summary line per build; each problem once, when it appears (not again on every rebuild), up to
    L{MAX_PROBLEM_LINES} of them."""
    log.info(
        "route table generation {generation}: {count} resources served, {rejected} rejected, "
        "{conflicts} conflicts, built in {ms:.1f} ms",
        generation=report.generation,
        count=len(report.snapshot.resources),
        rejected=report.rejected,
        conflicts=len(report.compiled.conflicts),
        ms=report.seconds * 1000,
    )
    new = [(level, message) for level, message in report.problems if message not in logged]
    for level, message in new[:MAX_PROBLEM_LINES]:
        getattr(log, level)("{problem}", problem=message)
    if len(new) > MAX_PROBLEM_LINES:
        log.warn(
            "... and {more} more new problems in route table generation {generation}, not logged one by one: "
            "see /debug/routes, the resources' status, or `ksproxy check`",
            more=len(new) - MAX_PROBLEM_LINES,
            generation=report.generation,
        )
    return frozenset(message for _, message in report.problems)


def statusInputs(report: BuildReport, health=None) -> list:  # type: ignore[no-untyped-def]
    """What the status writer needs for every object of the last build (SPEC 8)."""
    from .status_writer import StatusInput

    conflicts: Dict[Tuple[str, str], str] = {}
    for conflict in report.compiled.conflicts:
        conflicts.setdefault((conflict.kind, conflict.name), conflict.message)
    inputs = []
    for (kind, name), record in report.snapshot.records.items():
        current = record.current
        upstream = getattr(current, "upstream", None) or getattr(current, "endpoint", None)
        healthy = health.upstreamHealthy(upstream.key) if (health is not None and upstream is not None) else None
        inputs.append(
            StatusInput(
                kind=kind,
                raw=record.raw,
                accepted=record.rejection,
                conflict=conflicts.get((kind, name)),
                refsError=report.refErrors.get(name) if kind == "JSBundle" else None,
                programmed=current is not None and (kind, name) not in report.unservable,
                upstreamHealthy=healthy,
                defaultedLink=current.link if isinstance(current, JSBundle) and current.linkDefaulted else None,
            )
        )
    return inputs
