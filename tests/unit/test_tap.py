"""
The twistd plugin's options and service tree: real option lists parsed, the tree inspected (no reactor run).
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet.task import Clock
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.logfmt import JSONLineObserver
from ksproxy.tap import Options, ProxyListeners, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        run = parse("run", "--source", "dir:examples").subOptions
        self.assertEqual(run["listen"], ["tcp:8080"])
        self.assertEqual(run["admin-listen"], "tcp:9090:interface=127.0.0.1")
        self.assertEqual(run["drain-grace"], 25.0)
        self.assertEqual(run["idle-timeout"], 900.0)
        self.assertAlmostEqual(run["busy-poll"], 0.0002)
        self.assertEqual(parse("run", "--source", "dir:x", "--busy-poll", "0").subOptions["busy-poll"], 0.0)

    def test_usageLines(self) -> None:
        """`ksproxy run --help` reads "ksproxy run [options]", not the parent's synopsis followed by its own."""
        self.assertIn("run|check|routes [options]", Options().getSynopsis())
        top = parse("run", "--source", "dir:examples")
        self.assertNotIn("run|check|routes", top.subOptions.getSynopsis())
        self.assertTrue(top.subOptions.getSynopsis().endswith(" run [options]"), top.subOptions.getSynopsis())

    def test_repeatableListen(self) -> None:
        run = parse("run", "--source", "dir:x", "--listen", "tcp:1", "--listen", "unix:/tmp/s").subOptions
        self.assertEqual(run["listen"], ["tcp:1", "unix:/tmp/s"])

    def test_refusals(self) -> None:
        for args, fragment in [
            (["run"], "--source is required"),
            (["run", "--source", "ftp:x"], "expected dir:PATH"),
            (["run", "--source", "dir:x", "--state-gate", "other"], "kubesphere"),
            (["run", "--source", "dir:x", "--manage-state"], "needs --source kubernetes"),
            (["run", "--source", "kubernetes", "--manage-state", "--state-gate", "kubesphere"], "exclude each other"),
            (["run", "--source", "dir:x", "--idle-timeout", "soon"], "duration"),
            (["run", "--source", "dir:x", "--workers", "2", "--listen", "unix:/tmp/s"], "tcp: listeners only"),
            (["run", "--source", "dir:x", "--default-upstream", "ftp://k"], "--default-upstream"),
            (["run", "--source", "dir:x", "--log-format", "xml"], "text or json"),
            (["run", "--source", "dir:x", "--busy-poll", "1s"], "--busy-poll must be between 0 and 5ms"),
            (["run", "--source", "dir:x", "--busy-poll", "-1us"], "--busy-poll must be between 0 and 5ms"),
            (["run", "--source", "dir:x", "--max-header-bytes", "-5"], "--max-header-bytes must be at least 1024"),
            (["run", "--source", "dir:x", "--response-header-timeout", "0"], "must be longer than zero"),
            (["run", "--source", "dir:x", "--idle-timeout", "-1s"], "must be longer than zero"),
            (["run", "--source", "dir:x", "--drain-grace", "-5s"], "--drain-grace cannot be negative"),
            (["run", "--source", "dir:x", "--max-url-bytes", "100"], "--max-url-bytes must be at least 1024"),
            (["run", "--source", "dir:x", "--max-url-bytes", "lots"], "--max-url-bytes must be a whole number"),
            ([], "subcommand"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(*args)
            self.assertIn(fragment, str(caught.exception), args)


class ServiceTreeTests(SynchronousTestCase):
    def test_aBadAuthFileIsOneLine(self) -> None:
        """Authentication key and policy files are read when the service is built: a bad one is still one line."""
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".secret") as short:
            short.write(b"short")
            short.flush()
            for args, fragment in [
                (["--jwt-hs256-secret-file", short.name], "at least 32 are needed"),
                (["--token-file", "/nonexistent/tokens.csv"], "No such file"),
            ]:
                with self.assertRaises(SystemExit) as caught:
                    makeService(parse("run", "--source", "dir:/x", *args), Clock())
                self.assertTrue(str(caught.exception).startswith("ksproxy: "), caught.exception)
                self.assertIn(fragment, str(caught.exception))

    def test_aMistypedEndpointIsOneLine(self) -> None:
        """An endpoint string Twisted cannot use stops start-up with one line naming the option, not a
        traceback."""
        for option, value, fragment in [
            ("--listen", "garbage:1", "Unknown endpoint type: 'garbage'"),
            ("--listen", "tcp:abc", "invalid literal"),
            ("--listen", "ssl:8443:privateKey=/nonexistent/key.pem", "No such file"),
            ("--admin-listen", "foo:1", "Unknown endpoint type: 'foo'"),
        ]:
            with self.assertRaises(SystemExit) as caught:
                makeService(parse("run", "--source", "dir:/x", option, value), Clock())
            self.assertTrue(str(caught.exception).startswith(f"ksproxy: {option} {value}: "), caught.exception)
            self.assertIn(fragment, str(caught.exception))

    def test_tree(self) -> None:
        top = makeService(parse("run", "--source", "dir:/nonexistent", "--listen", "tcp:0"), Clock())
        kinds = [type(child).__name__ for child in top]
        # Stopped in reverse: the listeners drain before the source, the admin listener and the cleanup stop.
        self.assertEqual(kinds, ["_Cleanup", "StreamServerEndpointService", "FileSource", "ProxyListeners"])
        listeners = [c for c in top if isinstance(c, ProxyListeners)][0]
        self.assertEqual(len(list(listeners)), 1)

    def test_noAdmin(self) -> None:
        top = makeService(parse("run", "--source", "dir:/x", "--admin-listen", "none"), Clock())
        self.assertNotIn("StreamServerEndpointService", [type(c).__name__ for c in top])

    def test_jsonLogs(self) -> None:
        top = makeService(parse("run", "--source", "dir:/x", "--log-format", "json"), Clock())
        application = service.Application("ksproxy")
        top.setServiceParent(application)
        self.assertIsInstance(application.getComponent(ILogObserver), JSONLineObserver)

    def test_textLogsLeaveTwistdAlone(self) -> None:
        top = makeService(parse("run", "--source", "dir:/x"), Clock())
        application = service.Application("ksproxy")
        top.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))


class PackagingTests(SynchronousTestCase):
    """An installed ksproxy must carry its twistd plugins (twisted/plugins has no __init__.py, on purpose)."""

    def test_pluginsArePackaged(self) -> None:
        import configparser
        import os

        from setuptools import find_namespace_packages

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        cfg = configparser.ConfigParser()
        cfg.read(os.path.join(root, "setup.cfg"))
        self.assertEqual(cfg["options"]["packages"].strip(), "find_namespace:")
        include = cfg["options.packages.find"]["include"].split()
        packages = find_namespace_packages(where=root, include=include)
        self.assertIn("twisted.plugins", packages)
        self.assertNotIn("twisted", packages)  # never shadow Twisted's own package
        self.assertIn("ksproxy.http", packages)
        self.assertTrue(os.path.exists(os.path.join(root, "twisted", "plugins", "ksproxy_plugin.py")))
        self.assertFalse(os.path.exists(os.path.join(root, "twisted", "plugins", "__init__.py")))


class ParentWatchTests(SynchronousTestCase):
    def test_stopsWhenTheSupervisorIsGone(self) -> None:
        import os

        from ksproxy.workers import ParentWatch

        class FakeReactor(Clock):
            stopped = False

            def stop(self) -> None:
                self.stopped = True

            def callWhenRunning(self, f) -> None:  # type: ignore[no-untyped-def]
                f()

        reactor = FakeReactor()
        watch = ParentWatch(reactor)
        watch.startService()
        reactor.advance(1.0)
        self.assertFalse(reactor.stopped)
        watch.supervisorPid = os.getppid() + 1  # as if we had been re-parented
        reactor.advance(1.0)
        self.assertTrue(reactor.stopped)


class ListenerGateTests(SynchronousTestCase):
    """With --workers, a worker adopts the shared sockets only once its table is live (never a 404 for a route
    it has not loaded yet)."""

    def test_listensOnlyWhenReady(self) -> None:
        from twisted.application.internet import StreamServerEndpointService
        from twisted.internet import defer

        from ksproxy.http.server import HTTPServerFactory

        listened = []

        class Endpoint:
            def listen(self, factory):  # type: ignore[no-untyped-def]
                listened.append(factory)
                return defer.Deferred()

        ready: defer.Deferred = defer.Deferred()
        factory = HTTPServerFactory(handler=None, clock=Clock())  # type: ignore[arg-type]
        listeners = ProxyListeners(factory, Clock(), 1.0, startWhen=lambda: ready)
        StreamServerEndpointService(Endpoint(), factory).setServiceParent(listeners)
        listeners.privilegedStartService()
        listeners.startService()
        self.assertEqual(listened, [])
        ready.callback(None)
        self.assertEqual(listened, [factory])


class FindPluginTests(SynchronousTestCase):
    def test_namespaceShadowedPackage(self) -> None:
        """A folder named ksproxy in the current directory makes C{ksproxy} a namespace package (no __file__)."""
        import os
        import sys

        import ksproxy
        from ksproxy.cli import _findPlugin

        self.patch(ksproxy, "__file__", None)
        self.patch(sys, "path", [p for p in sys.path if not os.path.exists(os.path.join(p, "ksproxy", "cli.py"))])
        _findPlugin()
        # The checkout holding ksproxy/cli.py, where twisted/plugins/ksproxy_plugin.py is.
        root = os.path.dirname(os.path.dirname(os.path.abspath(ksproxy.cli.__file__)))
        self.assertIn(root, sys.path)


class SupervisorStopTests(SynchronousTestCase):
    """On stop the supervisor lets go of the listening sockets at once, not after the workers' drain."""

    def test_closesListeningSocketsWhenStopping(self) -> None:
        import signal
        import socket

        from ksproxy.workers import Supervisor

        signals = []

        class Transport:
            pid = 4242

            def signalProcess(self, signum: int) -> None:
                signals.append(signum)

        class FakeReactor(Clock):
            def spawnProcess(self, proto, executable, args, env, childFDs):  # type: ignore[no-untyped-def]
                return Transport()

        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(5)
        reactor = FakeReactor()
        supervisor = Supervisor(reactor, ["worker"], 2, 10.0, [sock], env={})
        supervisor.startService()
        self.assertEqual(len(supervisor.workers), 2)
        stopped = supervisor.stopService()
        self.assertEqual(signals, [signal.SIGTERM, signal.SIGTERM])
        # The workers are still draining, and the port is closed already.
        self.assertNoResult(stopped)
        self.assertEqual(sock.fileno(), -1)
        for proto in list(supervisor.workers.values()):
            proto.processEnded(_Ended())
        self.successResultOf(stopped)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_workersGetAPrivateMetricsDirectoryRemovedAtStop(self) -> None:
        import os
        import stat
        import tempfile

        from ksproxy.workermetrics import WORKER_COUNT, WORKER_DIR
        from ksproxy.workers import Supervisor

        envs = []

        class Transport:
            pid = 4242

            def signalProcess(self, signum: int) -> None:
                pass

        class FakeReactor(Clock):
            def spawnProcess(self, proto, executable, args, env, childFDs):  # type: ignore[no-untyped-def]
                envs.append(env)
                return Transport()

        supervisor = Supervisor(FakeReactor(), ["worker"], 3, 10.0, [], env={})
        supervisor.startService()
        directory = supervisor.directory
        self.assertEqual([e[WORKER_DIR] for e in envs], [directory] * 3)
        self.assertEqual([e[WORKER_COUNT] for e in envs], ["3"] * 3)
        self.assertTrue(directory.startswith(tempfile.gettempdir()))
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        stopped = supervisor.stopService()
        for proto in list(supervisor.workers.values()):
            proto.processEnded(_Ended())
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(directory))


class _Ended:
    value = "exited"
