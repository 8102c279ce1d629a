"""
A route table, with its report and inventory, holds no reference cycles: a replaced one is freed by reference
counting alone.  It has to be: the live table is frozen out of the collector's sight
(L{ksproxy.routing.background}), so a cycle in it would never be collected.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.proxy.dispatch import Gateway, ServedState
from ksproxy.reconcile import Reconciler
from ksproxy.routing import compileTable
from ksproxy.routing.background import release
from ksproxy.sources.files import loadDirectory

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")

# Beside the shipped examples: a conflict (the same path prefix twice), a rejected resource and a syntax error,
# so that every part of a report has something in it.
TROUBLE = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {name: twin-a}
spec:
  matcher: {path: /twin/*, method: "*"}
  upstream: {url: "http://127.0.0.1:9"}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {name: twin-b}
spec:
  matcher: {path: /twin/*, method: "*"}
  upstream: {url: "http://127.0.0.1:9"}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: APIService
metadata: {name: v1.broken.example.com}
spec:
  group: broken.example.com
  version: v1
  url: "not a url"
"""


class TableCycleTests(SynchronousTestCase):
    def test_replacedTablesLeaveNoCycles(self) -> None:
        directory = self.mktemp()
        shutil.copytree(EXAMPLES, directory)
        with open(os.path.join(directory, "trouble.yaml"), "w") as f:
            f.write(TROUBLE)
        with open(os.path.join(directory, "syntax.yaml"), "w") as f:
            f.write("kind: [unclosed\n")
        clock = Clock()
        gateway = Gateway(clock, ServedState(compileTable((), generation=0).table, {}, 0, False), pool=None)  # type: ignore[arg-type]
        reconciler = Reconciler(clock, gateway)

        def rebuild() -> None:
            docs, errors = loadDirectory(directory)
            reconciler.inventory.replaceAll(docs, errors)
            replaced = [gateway.state, reconciler.report]
            report = reconciler.rebuild()
            self.assertTrue(report.problems)  # the trouble was seen, so its parts were built
            release(replaced)

        rebuild()
        gc.unfreeze()
        gc.collect()
        wasEnabled = gc.isenabled()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            rebuild()
            rebuild()
            gc.collect()
            left = Counter(type(obj).__name__ for obj in gc.garbage)
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
            if wasEnabled:
                gc.enable()
        self.assertEqual(left, Counter(), "left for the cycle collector")
