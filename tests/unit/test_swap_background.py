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
