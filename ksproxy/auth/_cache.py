"""
A small TTL cache for review answers, keyed by digest, with concurrent misses for one key coalesced.

Answers that are cached are returned synchronously (no Deferred); a miss returns a Deferred that fires with
the answer of the single request in flight for that key.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Generic, List, Optional, Tuple, TypeVar, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

__all__ = ["ReviewCache"]

T = TypeVar("T")


class ReviewCache(Generic[T]):
    """
    @param ttlFor: how long an answer may be reused, in seconds; C{None} or 0 for answers that must not be
        cached (errors).
    @param maxSize: the oldest entries go first once there are more.
    """

    def __init__(
        self, clock: IReactorTime, ttlFor: Callable[[T], Optional[float]], maxSize: int = 10000
    ) -> None:
        self._clock = clock
        self._ttlFor = ttlFor
        self._maxSize = maxSize
        self._entries: OrderedDict[bytes, Tuple[float, T]] = OrderedDict()
        self._inflight: Dict[bytes, List[Deferred]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, fetch: Callable[[], Deferred[T]]) -> Union[T, Deferred[T]]:
        entry = self._entries.get(key)
        if entry is not None:
            if self._clock.seconds() < entry[0]:
                return entry[1]
            del self._entries[key]
        d: Deferred = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        waiters = self._inflight[key] = [d]
        maybeDeferred(fetch).addBoth(self._done, key)
        return d

    def _done(self, result: Union[T, Failure], key: bytes) -> None:
        waiters = self._inflight.pop(key, [])
        if not isinstance(result, Failure):
            ttl = self._ttlFor(result)
            if ttl:
                self._entries[key] = (self._clock.seconds() + ttl, result)
                self._entries.move_to_end(key)
                while len(self._entries) > self._maxSize:
                    self._entries.popitem(last=False)
        for w in waiters:
            if w.called:  # cancelled by its caller
                continue
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)
