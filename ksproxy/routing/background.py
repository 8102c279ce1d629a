# -*- test-case-name: tests.unit.test_swap_background -*-
"""
The background half of a table build (reading and parsing manifests, planning the inventory, compiling the
table) runs in threads, but shares one interpreter lock with the reactor.  L{buildWindow} marks that work so
that it disturbs requests in flight as little as possible:

  - The switch interval is lowered (5 ms -> 0.5 ms by default): a thread that wants the lock waits up to one
    interval for the running thread to let go, so while a build runs, every reactor wake-up (each request)
    could otherwise wait up to 5 ms.
  - Automatic garbage collection is paused, and what was allocated meanwhile is moved to the oldest
    generation at the end (C{gc.freeze()} then C{gc.unfreeze()}, both constant time).  A build allocates
    hundreds of thousands of long-lived objects; left alone, the collector would walk them again and again
    (a third of the build's time), and the full collections they trigger hold the lock for 100 ms or more
    with a large table, on whichever thread happens to allocate (often the reactor).  Nothing is leaked:
    reference counting still frees everything as usual, and cycles are found by the next full collection.

Windows may overlap (the file watcher and the compile thread); the settings are restored when the last one
ends.  A process that froze objects itself (C{gc.get_freeze_count()}) keeps them frozen: then the young
objects are left where they are.

Freeing the table, inventory and report that a build replaced is also work: dropping the last reference to a
10,000-object table frees its 100,000-odd objects in one C-level cascade that holds the lock for 10 ms or
more, wherever it runs.  L{release} takes such a structure apart in small steps instead (in a background
thread), so the lock changes hands in between.
"""

from __future__ import annotations

import gc
import sys
import threading
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Iterator, List, Optional

__all__ = ["buildWindow", "SWITCH_INTERVAL", "active", "release", "releaseInWindow"]

# Seconds; what sys.setswitchinterval is set to while a build runs.
SWITCH_INTERVAL = 0.0005

_lock = threading.Lock()
_depth = 0
_savedInterval: Optional[float] = None
_gcWasEnabled = False


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
    global _depth, _savedInterval
    with _lock:
        _depth -= 1
        if _depth > 0:
            return
        if _savedInterval is not None:
            sys.setswitchinterval(_savedInterval)
            _savedInterval = None
        if _gcWasEnabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


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
    """L{release} inside a L{buildWindow}: for a thread pool job."""
    with buildWindow():
        return release(box)
