"""
A file that is parsed once and parsed again when it changes on disk.

Authentication files are read on the request path, so the check is cheap and rate-limited: at most one
C{stat} per C{interval} seconds of the injected clock.  A change that does not parse keeps the previous good
value (and says why in the log): a half-written policy must never open or close the gate by accident.
"""

from __future__ import annotations

import os
from typing import Callable, Generic, Optional, Tuple, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["WatchedFile"]

T = TypeVar("T")

_log = Logger()


def _signature(path: str) -> Tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class WatchedFile(Generic[T]):
    """
    The parsed contents of C{path}, refreshed on L{current} when the file's mtime, size or inode changed.

    The first load happens in the constructor and raises: a file that cannot be read at start-up is a
    configuration error, not something to discover on the first request.
    """

    def __init__(
        self, path: str, parse: Callable[[bytes], T], clock: IReactorTime, interval: float = 1.0
    ) -> None:
        self.path = path
        self._parse = parse
        self._clock = clock
        self._interval = interval
        self._signature = _signature(path)
        with open(path, "rb") as f:
            self._value: T = parse(f.read())
        self._checked = clock.seconds()
        self.lastError: Optional[str] = None

    def current(self) -> T:
        now = self._clock.seconds()
        if now - self._checked >= self._interval:
            self._checked = now
            self._maybeReload()
        return self._value

    def _maybeReload(self) -> None:
        try:
            sig = _signature(self.path)
        except OSError as e:
            if self.lastError != str(e):
                self.lastError = str(e)
                _log.error(
                    "Cannot stat {path}, keeping the previous version: {error}", path=self.path, error=e
                )
            return
        if sig == self._signature:
            return
        try:
            with open(self.path, "rb") as f:
                value = self._parse(f.read())
        except Exception as e:
            # Remember the signature so a broken file is reported once, not every second.
            self._signature = sig
            self.lastError = str(e)
            _log.error(
                "Reloading {path} failed, keeping the previous version: {error}", path=self.path, error=e
            )
            return
        self._signature = sig
        self._value = value
        self.lastError = None
        _log.info("Reloaded {path}", path=self.path)
