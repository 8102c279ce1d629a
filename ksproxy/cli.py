"""
The C{ksproxy} command: offline checks and a shortcut to run the gateway.

    ksproxy check PATH     validate manifests; non-zero exit on any rejection, conflict or syntax error
    ksproxy routes PATH    print the compiled route table
    ksproxy run ...        the same as `twistd -n --pidfile= ksproxy run ...`
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, TextIO

__all__ = ["main", "check", "routes", "loadReport"]


def loadReport(path: str):  # type: ignore[no-untyped-def]
    """Load a directory (or one file) the way the file source does, and build the table once."""
    from twisted.internet.task import Clock

    from .proxy.dispatch import Gateway, ServedState
    from .reconcile import Reconciler
    from .routing import compileTable
    from .sources.files import loadDirectory, loadFile
    from .sources.inventory import SourceError

    clock = Clock()
    gateway = Gateway(clock, ServedState(compileTable((), generation=0).table, {}, 0, False), pool=None)  # type: ignore[arg-type]
    reconciler = Reconciler(clock, gateway)
    if os.path.isfile(path):
        loaded = loadFile(path)
        docs, errors = loaded if loaded is not None else ([], [SourceError(path, f"{path}: cannot be read")])
    else:
        docs, errors = loadDirectory(path)
    reconciler.inventory.replaceAll(docs, errors)
    return reconciler.rebuild()


def _problems(report) -> List[str]:  # type: ignore[no-untyped-def]
    snap = report.snapshot
    # A SourceError's message already starts with its path (and line): do not say the path twice.
    out = [f"syntax: {e.message}" for e in snap.sourceErrors]
    out += [f"rejected: {r.rejection}" for r in snap.records.values() if r.rejection is not None]
    out += [f"conflict: {c.message}" for c in report.compiled.conflicts]
    out += [f"duplicate: {d}" for d in snap.duplicates]
    return out


def check(path: str, out: TextIO) -> int:
    report = loadReport(path)
    snap = report.snapshot
    for _key, record in sorted(snap.records.items()):
        for warning in record.warnings:
            out.write(f"warning: {warning}\n")
        for note in record.notes:
            # Unknown fields are ignored when serving; a manifest check is where a typo should show.
            out.write(f"note: {note}\n")
    for name, why in sorted(report.refErrors.items()):
        out.write(f"unresolved: JSBundle/{name}: {why} (fine if it exists in the cluster; served as 503 until then)\n")
    for skipped in snap.skipped:
        out.write(f"skipped: {skipped}\n")
    problems = _problems(report)
    for line in problems:
        out.write(line + "\n")
    out.write(
        f"{len(snap.resources)} resources accepted, {len(problems)} problem{'s' if len(problems) != 1 else ''}\n"
    )
    return 1 if problems else 0


def routes(path: str, out: TextIO) -> int:
    from .admin import describeReport

    report = loadReport(path)
    out.write(json.dumps(describeReport(report), indent=2, sort_keys=True, default=str) + "\n")
    return 1 if _problems(report) else 0


def _findPlugin() -> None:
    """
    Let twistd find our plugin from a source checkout too (an editable install puts ksproxy, not the
    checkout's twisted/plugins folder, on the path).  twistd scans sys.path for twisted/plugins folders.
    From this module's own file: C{ksproxy.__file__} is None when a folder named ksproxy in the current
    directory made C{ksproxy} a namespace package.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, "twisted", "plugins", "ksproxy_plugin.py")) and root not in sys.path:
        sys.path.append(root)


def _reactorArgs() -> List[str]:
    """
    twistd's reactor option for C{ksproxy run}: our epoll reactor (ksproxy/reactor.py) where epoll exists,
    unless KSPROXY_REACTOR names another twistd reactor (C{twistd --help-reactors}), or "default".
    """
    import select

    choice = os.environ.get("KSPROXY_REACTOR", "")
    if choice == "default":
        return []
    if choice:
        return [f"--reactor={choice}"]
    return ["--reactor=ksproxy"] if hasattr(select, "epoll") else []


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: ksproxy check PATH | ksproxy routes PATH | ksproxy run [run options]\n"
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(usage)
        return 0
    command, rest = args[0], args[1:]
    if command in ("check", "routes"):
        if len(rest) != 1:
            sys.stderr.write(usage)
            return 2
        return (check if command == "check" else routes)(rest[0], sys.stdout)
    if command == "run":
        _findPlugin()
        from twisted.scripts.twistd import run

        sys.argv = ["twistd", "-n", "--pidfile=", *_reactorArgs(), "ksproxy", "run", *rest]
        run()
        return 0
    sys.stderr.write(usage)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
