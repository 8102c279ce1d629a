"""
C{--workers N}: one ksproxy process per core.

A Python process uses one core; a host has several.  The parent (L{Supervisor}) runs no gateway: it binds
the listening sockets, starts N worker processes that inherit them, restarts one that dies (with a growing
delay, so a worker that cannot start does not spin), and passes SIGTERM on when it stops, waiting for the
workers' own graceful drain.  Each worker is a complete ksproxy with its own source and table, accepting
from the shared sockets.  One accept queue per port (rather than one per worker with SO_REUSEPORT) means a
worker that dies loses no connection waiting to be accepted: the others take it.  Each worker takes one
connection per wake-up (L{ksproxy.reactor.SharedPort}), so a burst of connections spreads over the workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Dict, List, Optional

from twisted.application import service
from twisted.internet import defer, fdesc, protocol, tcp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from .workermetrics import WORKER_COUNT, WORKER_DIR

__all__ = ["OneAcceptPerWakeUp", "Supervisor", "bindListening", "inheritedEndpoint", "workerArgv", "packageRoot", "LISTEN_FDS"]

# The environment variable that tells a worker which descriptors hold its --listen sockets, in order.
LISTEN_FDS = "KSPROXY_LISTEN_FDS"
SUPERVISOR_PID = "KSPROXY_SUPERVISOR_PID"
_FIRST_FD = 3

log = Logger()


def bindListening(description: str) -> socket.socket:
    """
    Bind C{tcp:PORT[:interface=ADDR][:backlog=N]} for the workers to share: L{CannotListenError} (as Twisted's
    own listeners raise it) when the address is taken, ValueError for anything else.
    """
    parts = description.split(":")
    if parts[0] != "tcp":
        raise ValueError(f"--workers supports tcp: listeners only, not {description!r}")
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = int(kwargs.pop("port", args[0] if args else 0))
    interface = kwargs.pop("interface", "")
    backlog = int(kwargs.pop("backlog", 511))
    if kwargs:
        raise ValueError(f"unsupported tcp: options with --workers: {', '.join(kwargs)}")
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(backlog)
    except (OSError, OverflowError) as e:  # (OverflowError: a port out of range)
        sock.close()
        raise CannotListenError(interface, port, e) from None
    sock.setblocking(False)
    return sock


class OneAcceptPerWakeUp:
    """
    Mixed into a listening port whose socket other processes accept from too (C{--workers}): it takes one
    connection per wake-up, as nginx does with C{multi_accept off}.  Twisted's batch of up to
    C{numberAccepts} (100 and growing) handed a burst to whichever worker woke first: the 50 keep-alive
    connections of a client pool all landed on one worker and the other stayed idle.
    """

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass  # doRead grows it after a full batch; here a batch is always one


class _OneAcceptPort(OneAcceptPerWakeUp, tcp.Port):
    """The shared port on reactors other than ksproxy's (which has its own, L{ksproxy.reactor.SharedPort})."""


@implementer(IStreamServerEndpoint)
class SharedSocketEndpoint:
    """Listen on a socket inherited from the supervisor (descriptor C{fd}) and shared with the other workers."""

    def __init__(self, reactor, fd: int) -> None:
        probe = socket.socket(fileno=os.dup(fd))
        self.family = probe.family
        probe.close()
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory: protocol.Factory) -> defer.Deferred:
        try:
            fdesc.setNonBlocking(self.fd)
            adopt = getattr(self.reactor, "adoptSharedStreamPort", None)
            if adopt is not None:
                port = adopt(self.fd, self.family, factory)
            else:
                port = _OneAcceptPort._fromListeningDescriptor(self.reactor, self.fd, self.family, factory)
                port.startListening()
            os.close(self.fd)  # the port holds its own duplicate, as with adoptStreamPort
        except BaseException:
            return defer.fail()
        return defer.succeed(port)


def inheritedEndpoint(reactor, fd: int) -> SharedSocketEndpoint:
    """The endpoint for a listening socket inherited from the supervisor at descriptor C{fd}."""
    return SharedSocketEndpoint(reactor, fd)


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:  # type: ignore[no-untyped-def]
        self.ended.callback(reason.value)
        self.supervisor._ended(self, reason.value)


class Supervisor(service.Service):
    """
    Starts C{count} workers running C{argv} (with C{--worker-index i} appended), restarts any that exits
    while the supervisor runs, and on stop sends SIGTERM and waits up to C{grace} seconds before SIGKILL.
    The workers get a private directory for their metrics sockets (L{ksproxy.workermetrics}), removed at stop.
    """

    def __init__(
        self,
        reactor,
        argv: List[str],
        count: int,
        grace: float,
        listening: List[socket.socket],
        env: Optional[Dict[str, str]] = None,
    ):
        self.reactor = reactor
        self.argv = argv
        self.listening = listening
        self.count = count
        self.grace = grace
        self.env = dict(os.environ if env is None else env)
        self.workers: Dict[int, _WorkerProcess] = {}
        self.transports: Dict[int, object] = {}
        self.restarts = 0
        self._delays: Dict[int, float] = {}
        self._timers: Dict[int, object] = {}
        self.directory: Optional[str] = None

    def startService(self) -> None:
        super().startService()
        self.directory = tempfile.mkdtemp(prefix="ksproxy-workers-")  # mode 0700: this user's workers only
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        proto = _WorkerProcess(self, index)
        argv = [*self.argv, "--worker-index", str(index)]
        fds = {0: 0, 1: 1, 2: 2}
        for offset, sock in enumerate(self.listening):
            fds[_FIRST_FD + offset] = sock.fileno()
        inherited = ",".join(str(_FIRST_FD + i) for i in range(len(self.listening)))
        env = dict(
            self.env,
            KSPROXY_WORKER=str(index),
            **{
                LISTEN_FDS: inherited,
                SUPERVISOR_PID: str(os.getpid()),
                WORKER_COUNT: str(self.count),
                WORKER_DIR: self.directory or "",
            },
        )
        self.transports[index] = self.reactor.spawnProcess(proto, argv[0], argv, env=env, childFDs=fds)
        self.workers[index] = proto
        log.info("started worker {index} (pid {pid})", index=index, pid=self.transports[index].pid)

    def _ended(self, proto: _WorkerProcess, why: object) -> None:
        index = proto.index
        if self.workers.get(index) is not proto:
            return
        del self.workers[index]
        self.transports.pop(index, None)
        if not self.running:
            return
        delay = min(self._delays.get(index, 0.5) * 2, 30.0)
        self._delays[index] = delay
        self.restarts += 1
        log.warn("worker {index} exited ({why}); restarting in {delay:g}s", index=index, why=why, delay=delay)
        self._timers[index] = self.reactor.callLater(delay, self._spawn, index)

    def signalAll(self, signum: int) -> None:
        for transport in list(self.transports.values()):
            try:
                transport.signalProcess(signum)  # type: ignore[attr-defined]
            except Exception:
                pass  # already gone

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for timer in self._timers.values():
            if timer.active():  # type: ignore[attr-defined]
                timer.cancel()  # type: ignore[attr-defined]
        self._timers.clear()
        ended = [w.ended for w in self.workers.values()]
        self.signalAll(signal.SIGTERM)
        # The workers stop accepting at once and drain what they accepted; our copy of the sockets must go too,
        # or the kernel keeps completing handshakes into the backlog, for clients nobody will ever answer.
        for sock in self.listening:
            sock.close()
        killer = self.reactor.callLater(self.grace, self.signalAll, signal.SIGKILL)

        def done(_: object) -> None:
            if killer.active():
                killer.cancel()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

        return defer.DeferredList(ended).addCallback(done)


class ParentWatch(service.Service):
    """
    In a worker: if the supervisor dies without stopping us (SIGKILL, OOM), stop gracefully rather than keep
    serving an old configuration on a port nobody supervises.  Checked once a second.
    """

    def __init__(self, reactor, interval: float = 1.0) -> None:
        from twisted.internet.task import LoopingCall

        self.reactor = reactor
        # From the supervisor itself: if it died before this worker got here, getppid() is already someone else.
        self.supervisorPid = int(os.environ.get(SUPERVISOR_PID, os.getppid()))
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        if os.getppid() != self.supervisorPid:
            log.warn("the supervisor (pid {pid}) is gone: stopping this worker", pid=self.supervisorPid)
            self._loop.stop()
            # Also when the supervisor died while this worker was starting (before the reactor ran).
            self.reactor.callWhenRunning(self.reactor.stop)


def workerArgv(argv: List[str]) -> List[str]:
    """The command line of a worker: this program's own `run` arguments without `--workers`."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [sys.executable, "-c", _BOOTSTRAP.format(root=packageRoot()), "run", *out]


def packageRoot() -> str:
    """The directory that holds the ksproxy package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A worker imports the supervisor's own ksproxy.  Not `python -m ksproxy.cli`: that puts the current directory
# first, where a folder named ksproxy (/etc/ksproxy with its manifests, a checkout's parent directory) would
# shadow the package and every worker would die.  The current directory's entry is dropped; the directory that
# holds the package takes its place only when it is not on the path already (a source checkout run without an
# install), so an installed package's site-packages never moves ahead of the standard library.
_BOOTSTRAP = (
    "import sys; sys.path[:] = [p for p in sys.path if p != '']; "
    "{root!r} in sys.path or sys.path.insert(0, {root!r}); "
    "from ksproxy.cli import main; sys.exit(main())"
)
