# -*- test-case-name: tests.unit.test_swap_background -*-
"""
The background half of a table build (reading and parsing manifests, planning the inventory, compiling the
table) runs in threads, but shares one interpreter lock with the reactor.  L{buildWindow} marks that work so
that it disturbs requests in flight as little as possible:

  - The switch interval is lowered (5 ms -> 0.5 ms by default): a thread that wants the lock waits up to one
    interval for the running thread to let go, so while a build runs, every reactor wake-up (each request)
    could otherwise wait up to 5 ms.
  - Automatic garbage collection is paused while the window is open, and at its end everything alive is
    frozen (C{gc.freeze()}, constant time): moved out of the collector's sight for good.  A build allocates
    hundreds of thousands of long-lived objects; left alone, the collector would walk them again and again
    (a third of the build's time), and each full collection walks the whole heap (about 100 ms with two
    10,000-resource tables, on whichever thread allocates, often the reactor, holding the lock throughout).
    Frozen, the route table costs the collector nothing; a replaced table is still freed, by reference
    counting (L{release}), because tables, reports and inventories hold no reference cycles.

    What the collector cannot see it cannot collect either: a cycle that was alive at a freeze and dies later
    stays.  Requests and connections leave no cycles (tests/integration/test_cycles.py), but Twisted, the
    Kubernetes client or a plugin may.  So the frozen heap is swept (unfrozen, fully collected, frozen again)
    when, after a replaced table has been released, the heap has grown by more than a quarter since the last
    sweep, at two releases in a row: Python's own rule for full collections, so never more often than the
    collector would have walked it anyway; with tables of a steady size, not at all.  The first release (at
    start-up) sweeps.

Parsing a large JSON manifest (a file, or a list from the Kubernetes API) is one C call that holds the lock
for tens of milliseconds; L{loadJSON} makes a Python call per object, so the reactor gets its turns.

Freeing the table, inventory and report that a build replaced is also work: dropping the last reference to a
10,000-object table frees its 100,000-odd objects in one C-level cascade that holds the lock for 10 ms or
more, wherever it runs.  L{release} takes such a structure apart in small steps instead (in a background
thread), so the lock changes hands in between.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

__all__ = ["buildWindow", "SWITCH_INTERVAL", "SWEEP_GROWTH", "active", "loadJSON", "release", "releaseInWindow"]

# Seconds; what sys.setswitchinterval is set to while a build runs.
SWITCH_INTERVAL = 0.0005

_lock = threading.Lock()
_depth = 0
_savedInterval: Optional[float] = None
_gcWasEnabled = False
# Sweep the frozen heap once the heap is this many times what it was after the last sweep (see the docstring).
SWEEP_GROWTH = 1.25
# ... at this many releases in a row: one release can find the heap grown for a moment (the file source frees
# the documents a reload replaced after the table they built, so the first release sees both).
_SWEEP_AFTER = 2
_blocksAfterSweep = 0
_grownReleases = 0
sweeps = 0  # for /metrics
_sweepDue = False  # a replaced table was released in an open window: check the growth when the last ends


def active() -> bool:
    """Whether a build window is open (for tests and diagnostics)."""
    return _depth > 0


def _enter(switchInterval: Optional[float]) -> None:
    global _depth, _savedInterval, _gcWasEnabled
    with _lock:
        if _depth == 0:
            _gcWasEnabled = gc.isenabled()
            gc.disable()
        if switchInterval is not None and _savedInterval is None:
            current = sys.getswitchinterval()
            if switchInterval < current:
                _savedInterval = current
                sys.setswitchinterval(switchInterval)
        _depth += 1


def _exit() -> None:
    global _depth, _savedInterval, _sweepDue, _blocksAfterSweep, _grownReleases, sweeps
    with _lock:
        _depth -= 1
        if _depth > 0:
            return
        if _savedInterval is not None:
            sys.setswitchinterval(_savedInterval)
            _savedInterval = None
        if _gcWasEnabled:
            gc.freeze()
            if _sweepDue:
                # The heap's size in allocator blocks, not gc.get_freeze_count(): that walks the frozen list, a
                # cache miss per object (25 ms with a 10,000-resource table), this walks the arenas.
                size = sys.getallocatedblocks()
                _grownReleases = _grownReleases + 1 if size > _blocksAfterSweep * SWEEP_GROWTH else 0
                if _grownReleases >= _SWEEP_AFTER or _blocksAfterSweep == 0:
                    gc.unfreeze()
                    gc.collect()
                    gc.freeze()
                    _blocksAfterSweep = sys.getallocatedblocks()
                    _grownReleases = 0
                    sweeps += 1
            gc.enable()
        _sweepDue = False


def _jsonObject(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    return dict(pairs)


def loadJSON(text: Union[str, bytes]) -> Any:
    """C{json.loads} for manifests and lists, letting the reactor in between objects (see above)."""
    return json.loads(text, object_pairs_hook=_jsonObject)


@contextmanager
def buildWindow(switchInterval: Optional[float] = SWITCH_INTERVAL) -> Iterator[None]:
    """
    Run the body as background build work (see the module docstring).  C{switchInterval=None} leaves the
    switch interval alone.
    """
    _enter(switchInterval)
    try:
        yield
    finally:
        _exit()


# A container with at least this many items is taken apart item by item; anything smaller is freed whole.
_WIDE = 32
# How far to follow narrow objects (a report, its snapshot, ...) looking for wide containers.
_NARROW_DEPTH = 8
_CONTAINERS = (dict, list, tuple, set, frozenset)
_ATOMIC = frozenset((str, bytes, int, float, bool, type(None)))


def release(box: List[Any]) -> int:
    """
    Free what C{box} holds, in small steps; C{box} is emptied.  Call it in a background thread, holding no
    other reference to the contents.

    Every object that would die with the contents (one that nothing else refers to) is collected first, down
    to the items of wide containers: entries, records, trie nodes.  Then they are dropped one at a time,
    outermost first, so each step frees one object (an item frees its own small subtree).  Returns the
    number of steps, for tests.
    """
    hold: List[Any] = list(box)
    box.clear()
    # (object, depth): depth counts narrow objects followed from a root; -1 once inside a wide container,
    # where only wide containers are looked into.
    queue = [(obj, 0) for obj in hold]
    referents = gc.get_referents
    refcount = sys.getrefcount
    while queue:
        obj, depth = queue.pop()
        cls = obj.__class__
        if cls in _ATOMIC or isinstance(obj, type):
            continue
        wide = isinstance(obj, _CONTAINERS) and len(obj) >= _WIDE
        childDepth = -1 if (wide or depth < 0) else depth + 1
        for child in referents(obj):
            cls = child.__class__
            if cls in _ATOMIC:
                continue
            # Referred to by obj, the list of referents, this variable and getrefcount's argument only.
            if refcount(child) != 4:
                continue
            if childDepth < 0 and cls is tuple and len(child) < _WIDE:
                continue  # a small tuple (a dict key, say) frees in no time with its container
            hold.append(child)
            if cls is MappingProxyType or (isinstance(child, _CONTAINERS) and len(child) >= _WIDE):
                queue.append((child, childDepth))
            elif 0 <= childDepth < _NARROW_DEPTH:
                queue.append((child, childDepth))
    obj = child = None
    steps = len(hold)
    for i in range(steps):
        hold[i] = None
    return steps


def releaseInWindow(box: List[Any]) -> int:
    """L{release} inside a L{buildWindow}: for a thread pool job.  The frozen heap is swept afterwards if it
    has grown (see the module docstring)."""
    global _sweepDue
    with buildWindow():
        steps = release(box)
        with _lock:
            _sweepDue = True
        return steps
