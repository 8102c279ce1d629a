"""Service-tree helpers shared by the tap and the status writer."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer

__all__ = ["SequentialMultiService"]


class SequentialMultiService(service.MultiService):
    """
    Stops its children one at a time, last added first, each after the previous one has finished stopping.

    C{MultiService} stops every child at once; a gateway must drain its listeners before it closes the pools
    and checkers those requests still use, and a status writer must release its Lease before the threads it
    needs for that go away.
    """

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        service.Service.stopService(self)
        for child in reversed(list(self)):
            yield defer.maybeDeferred(child.stopService)
