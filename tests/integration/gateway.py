"""
A whole ksproxy built by the plugin's makeService over a temporary manifest folder, for integration tests.
"""

from __future__ import annotations

import os
import tempfile
from typing import List, Optional

from twisted.internet import defer, reactor

from ksproxy.tap import Options, makeService


class RunningGateway:
    """Start with L{start}; C{port} and C{adminPort} are the bound loopback ports."""

    def __init__(self, manifests: dict, extraArgs: Optional[List[str]] = None, source: Optional[str] = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="ksproxy-test-")
        self.sourceSpec = source or "dir:" + self.dir
        for name, text in manifests.items():
            self.write(name, text)
        self.extraArgs = extraArgs or []
        self.service = None
        self.port = 0
        self.adminPort = 0

    def write(self, name: str, text: str) -> None:
        path = os.path.join(self.dir, name)
        tmp = path + ".tmp~"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def remove(self, name: str) -> None:
        os.remove(os.path.join(self.dir, name))

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        options = Options()
        options.parseOptions(
            [
                "run",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--admin-listen",
                "tcp:0:interface=127.0.0.1",
                "--source",
                self.sourceSpec,
                "--no-access-log",
                *self.extraArgs,
            ]
        )
        self.service = makeService(options, reactor)
        self.service.startService()
        ports = []
        for svc in _walk(self.service):
            waiting = getattr(svc, "_waitingForPort", None)
            if waiting is not None:
                # Observe the port without consuming the service's own Deferred (it needs the port to stop).
                got: defer.Deferred = defer.Deferred()
                waiting.addCallback(lambda port, got=got: (got.callback(port), port)[1])
                port = yield got
                ports.append((svc, port))
        for svc, port in ports:
            if svc.factory is self.service.factory:
                self.port = port.getHost().port
            else:
                self.adminPort = port.getHost().port
        yield self.service.source.synced
        yield self.service.reconciler.whenReady()
        return self

    @property
    def reconciler(self):  # type: ignore[no-untyped-def]
        return self.service.reconciler

    def stop(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.service.stopService)

    def waitForGeneration(self, atLeast: int, timeout: float = 5.0) -> defer.Deferred[None]:
        """Until the reconciler has built generation C{atLeast} (bounded)."""
        from tests.util import eventually

        return eventually(lambda: self.reconciler.generation >= atLeast, f"generation {atLeast}", timeout)


def _walk(svc):  # type: ignore[no-untyped-def]
    yield svc
    for child in getattr(svc, "services", []):
        yield from _walk(child)
