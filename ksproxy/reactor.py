"""
The epoll reactor without a log context around every I/O event.

Twisted's C{EPollReactor.doPoll} runs each ready descriptor's C{doRead}/C{doWrite} through
C{log.callWithLogger}, which asks the selectable for its C{logPrefix()}, copies the current context dict and
pushes it on the context stack, twice nested: about 8 µs per event on this project's benchmark machine, a
tenth of the CPU of a proxied 1 KiB request (bench/RESULTS.md).  The only thing that context buys is the
C{system} field of legacy C{twisted.python.log} events emitted during the callback; ksproxy logs through
C{twisted.logger} with its own namespaces, so this reactor calls C{_doReadOrWrite} directly.  Everything
else, including the "log and disconnect" handling of an exception from application code, is Twisted's own.

Installed by C{ksproxy run} on Linux, by C{twistd --reactor=ksproxy ...} (the plugin in
C{twisted/plugins/ksproxy_reactor.py}), or by calling L{install} before anything imports the global reactor.
"""

from __future__ import annotations

import errno
from typing import Optional

from twisted.internet.epollreactor import EPollReactor

from .http.writes import outbox

__all__ = ["KsproxyReactor", "install"]


class KsproxyReactor(EPollReactor):
    """
    L{EPollReactor} whose poll loop dispatches events without C{log.callWithLogger}, and which sends what
    protocols queued in L{ksproxy.http.writes.outbox} after each batch of I/O events and each round of timers
    (on other reactors the outbox schedules a C{callLater(0)} per turn instead).
    """

    flushesOutbox = True

    def runUntilCurrent(self) -> None:
        super().runUntilCurrent()
        _flushOutbox()

    def doPoll(self, timeout: Optional[float]) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            # As Twisted does: at most as many events as we track descriptors.
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                # Catches and logs application exceptions itself, and disconnects the selectable.
                dispatch(selectable, fd, event)
        _flushOutbox()

    doIteration = doPoll


def _flushOutbox() -> None:
    # Until empty: a flush can queue more (a write that fails over to the transport may call back), and the
    # next chance could be after a long poll timeout.
    while outbox.owners:
        outbox.flush()


def install() -> KsproxyReactor:
    """Install L{KsproxyReactor} as Twisted's global reactor (before anything imports the default one)."""
    from twisted.internet.main import installReactor

    reactor = KsproxyReactor()
    installReactor(reactor)
    return reactor
