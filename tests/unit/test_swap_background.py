"""
Tests for L{ksproxy.routing.background}: build windows restore the switch interval and the collector, and
L{release} frees what it is given (and nothing else) in steps.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from typing import Any, List

from twisted.trial.unittest import SynchronousTestCase

from ksproxy.routing import background
from ksproxy.routing.background import SWITCH_INTERVAL, buildWindow, release


class BuildWindowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.interval = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, self.interval)
        self.gcEnabled = gc.isenabled()
        self.addCleanup(lambda: gc.enable() if self.gcEnabled else gc.disable())

    def test_lowersAndRestores(self) -> None:
        sys.setswitchinterval(0.005)
        gc.enable()
        with buildWindow():
            self.assertTrue(background.active())
            self.assertAlmostEqual(sys.getswitchinterval(), SWITCH_INTERVAL, places=6)
            self.assertFalse(gc.isenabled())
        self.assertFalse(background.active())
        self.assertAlmostEqual(sys.getswitchinterval(), 0.005, places=6)
        self.assertTrue(gc.isenabled())

    def test_restoredOnError(self) -> None:
        sys.setswitchinterval(0.005)
        gc.enable()
        with self.assertRaises(ZeroDivisionError):
            with buildWindow():
                raise ZeroDivisionError("in the window")
        self.assertAlmostEqual(sys.getswitchinterval(), 0.005, places=6)
        self.assertTrue(gc.isenabled())

    def test_overlappingWindows(self) -> None:
        """Two threads' windows: settings come back when the last one ends, not the first."""
        sys.setswitchinterval(0.005)
        gc.enable()
        inside, leave = threading.Event(), threading.Event()

        def other() -> None:
            with buildWindow():
                inside.set()
                leave.wait(5)

        thread = threading.Thread(target=other)
        thread.start()
        self.assertTrue(inside.wait(5))
        with buildWindow():
            pass
        self.assertFalse(gc.isenabled())  # the other window is still open
        self.assertAlmostEqual(sys.getswitchinterval(), SWITCH_INTERVAL, places=6)
        leave.set()
        thread.join(5)
        self.assertTrue(gc.isenabled())
        self.assertAlmostEqual(sys.getswitchinterval(), 0.005, places=6)

    def test_collectorLeftOffStaysOff(self) -> None:
        gc.disable()
        with buildWindow(switchInterval=None):
            self.assertEqual(sys.getswitchinterval(), self.interval)
        self.assertFalse(gc.isenabled())

    def test_neverRaisesTheInterval(self) -> None:
        sys.setswitchinterval(0.0001)
        with buildWindow():
            self.assertAlmostEqual(sys.getswitchinterval(), 0.0001, places=6)
        self.assertAlmostEqual(sys.getswitchinterval(), 0.0001, places=6)


class _Item:
    def __init__(self, payload: Any) -> None:
        self.payload = payload


def _frozen(obj: Any) -> bool:
    """Whether C{obj} is out of the collector's sight (C{gc.get_objects} lists the generations it walks)."""
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


def _cycle() -> weakref.ref[_Item]:
    """A reference cycle that nothing else holds, made in a build window, so frozen when it ends."""
    with buildWindow():
        item = _Item(None)
        item.payload = item
    return weakref.ref(item)


class FreezeTests(SynchronousTestCase):
    """What lives at the end of a window is frozen; the frozen heap is swept after a release once it grew."""

    def setUp(self) -> None:
        self.gcEnabled = gc.isenabled()
        self.addCleanup(lambda: gc.enable() if self.gcEnabled else gc.disable())
        self.addCleanup(setattr, background, "_blocksAfterSweep", background._blocksAfterSweep)
        self.addCleanup(setattr, background, "_grownReleases", 0)
        background._grownReleases = 0
        self.addCleanup(gc.unfreeze)
        gc.enable()

    def test_frozenAtTheEnd(self) -> None:
        with buildWindow():
            built = _Item({"table": [1, 2]})
            self.assertFalse(_frozen(built))
        self.assertTrue(_frozen(built))
        self.assertTrue(_frozen(built.payload))

    def test_notFrozenWhenTheCollectorIsOff(self) -> None:
        gc.disable()
        with buildWindow():
            built = _Item({})
        self.assertFalse(_frozen(built))

    def test_frozenCyclesWaitForASweep(self) -> None:
        """A dead cycle that was frozen outlives full collections; two releases in a row that find the heap
        grown by more than L{background.SWEEP_GROWTH} since the last sweep sweep it."""
        ref = _cycle()
        gc.collect()
        self.assertIsNotNone(ref())
        background._blocksAfterSweep = sys.getallocatedblocks() * 2  # no growth since the "last sweep"
        sweeps = background.sweeps
        background.releaseInWindow([_Item(1)])
        self.assertIsNotNone(ref(), "swept although the heap did not grow")
        self.assertEqual(background.sweeps, sweeps)

        background._blocksAfterSweep = int(sys.getallocatedblocks() / background.SWEEP_GROWTH / 2)
        background.releaseInWindow([_Item(2)])
        self.assertIsNotNone(ref(), "grown at one release: maybe for a moment, no sweep yet")
        background.releaseInWindow([_Item(2)])
        self.assertIsNone(ref())
        self.assertEqual(background.sweeps, sweeps + 1)
        # The mark moved to what the sweep left: no growth since, no sweep.
        background.releaseInWindow([_Item(3)])
        self.assertEqual(background.sweeps, sweeps + 1)

    def test_onlyAReleaseSweeps(self) -> None:
        """At the end of a build both tables are alive (twice the heap): that is no reason to sweep."""
        ref = _cycle()
        background._blocksAfterSweep = 1
        with buildWindow():
            pass
        self.assertIsNotNone(ref())


class ReleaseTests(SynchronousTestCase):
    def test_freesInSteps(self) -> None:
        items = [_Item({"n": i, "sub": [_Item(i)]}) for i in range(200)]
        refs = [weakref.ref(item) for item in items]
        box: List[Any] = [{"entries": dict(enumerate(items)), "more": ({"x": [1, 2]},)}]
        del items
        steps = release(box)
        self.assertEqual(box, [])
        self.assertTrue(all(ref() is None for ref in refs))
        self.assertGreaterEqual(steps, 200)  # each item of the wide container is its own step

    def test_sharedWithinFreedToo(self) -> None:
        """Objects held twice inside what is released go with their last holder."""
        items = [_Item(i) for i in range(100)]
        refs = [weakref.ref(item) for item in items]
        box: List[Any] = [(tuple(items), {i: item for i, item in enumerate(items)})]
        del items
        release(box)
        self.assertTrue(all(ref() is None for ref in refs))

    def test_sharedObjectsSurvive(self) -> None:
        kept = _Item("kept")
        box: List[Any] = [[_Item(i) for i in range(100)] + [kept]]
        release(box)
        self.assertEqual(kept.payload, "kept")
        self.assertEqual(sys.getrefcount(kept), 2)  # only this frame's variable (and the argument)
