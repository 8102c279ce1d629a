"""
C{twistd ksproxy}: options and the service tree.  The only place where things are wired together.

    twistd -n ksproxy run --listen tcp:8080 --source dir:examples
    twistd -n ksproxy run --listen tcp:8080 --listen ksproxy-tls:port=8443:certDir=/etc/ksproxy/certs \\
        --admin-listen tcp:9090:interface=127.0.0.1 --source kubernetes
    twistd ksproxy check examples/
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Optional

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from .accesslog import AccessLog
from .auth import AuthOptionsMixin, buildGate
from .bundles import BundleFetcher
from .fetch import OutOfBandClient
from .health import HealthRegistry, checksOf, httpProbe
from .http.server import HTTPServerFactory, ServerLimits
from .http.upstream import UpstreamPool
from .metrics import install as installMetrics
from .model.types import Endpoint, JSBundle
from .proxy.defaultupstream import IN_CLUSTER, KubeAPICredentials, endpointWithCA, inClusterEndpoint
from .proxy.dispatch import Gateway, ServedState
from .proxy.forward import Timeouts
from .reconcile import Reconciler, statusInputs
from .routing import compileTable
from .services import SequentialMultiService
from .workermetrics import WORKER_COUNT, WORKER_DIR, AllWorkersMetrics, metricsSocket, unixFetcher
from .workers import LISTEN_FDS, ParentWatch, Supervisor, bindListening, inheritedEndpoint, workerArgv

__all__ = ["Options", "RunOptions", "makeService"]

log = Logger()


def _seconds(value: str) -> float:
    from .model.parse import parseDuration

    try:
        return parseDuration(value)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


# Longer spins buy little (an answer that takes longer is better waited for asleep) and burn a core.
MAX_BUSY_POLL = 0.005
# The smallest --max-header-bytes / --max-url-bytes accepted.
MIN_HEAD_LIMIT = 1024


class RunOptions(AuthOptionsMixin, usage.Options):
    synopsis = "[options]"
    longdesc = "Serve the APIService, JSBundle and ReverseProxy resources of a source."

    optParameters = [
        ["source", "s", None, "Where resources come from: dir:PATH, or kubernetes[:KUBECONFIG]."],
        ["admin-listen", None, "tcp:9090:interface=127.0.0.1", "Endpoint for /healthz, /readyz, /metrics, /debug."],
        ["state-gate", None, None, "'kubesphere': serve only objects whose status.state is Available."],
        ["default-upstream", None, None, "Unmatched /api and /apis requests go here: a kube-apiserver URL, or 'in-cluster'."],
        ["default-upstream-ca", None, None, "PEM CA bundle file for --default-upstream."],
        ["default-upstream-token-file", None, None, "Bearer token file ksproxy uses at --default-upstream."],
        ["status-namespace", None, None, "Namespace of the status-writer Lease (default $POD_NAMESPACE, else ksproxy-system)."],
        ["connect-timeout", None, "10s", "Upstream connect timeout."],
        ["response-header-timeout", None, "60s", "Time allowed from request sent to response headers."],
        ["idle-timeout", None, "15m", "Streaming responses: longest silence between bytes."],
        ["tunnel-idle-timeout", None, "1h", "Upgraded connections (exec, WebSocket): longest silence."],
        ["header-timeout", None, "30s", "Clients: time allowed to send the request headers."],
        ["keepalive-timeout", None, "2m", "Clients: idle keep-alive connections are closed after this."],
        ["drain-grace", None, "25s", "On SIGTERM: how long in-flight requests may take to finish."],
        [
            "max-header-bytes",
            None,
            "65536",
            "Largest request header block (431 above), and upstream response header block (502 above).",
        ],
        ["max-url-bytes", None, "16384", "Longest request target (414 above)."],
        ["log-format", None, "text", "text, or json (one JSON object per line)."],
        [
            "busy-poll",
            None,
            "200us",
            "After a request goes upstream, poll this long for the answer before sleeping (lower latency); 0 = off.",
        ],
        ["workers", None, "1", "Worker processes sharing the tcp: listeners; 1 = this process serves."],
        ["worker-index", None, None, "(internal) set by the supervisor on each worker process."],
    ]
    optFlags = [
        ["manage-state", None, "Write status.state (Available/Unavailable); never overrides Disabled."],
        ["no-access-log", None, "Do not log one line per request."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["trusted-proxy"] = []

    def parseOptions(self, options=None) -> None:  # type: ignore[no-untyped-def]
        # Kept so that --workers can start workers with the same arguments.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, endpoint: str) -> None:
        """Proxy listener, a Twisted endpoint string (tcp:8080, ksproxy-tls:port=8443:certDir=DIR, unix:/run/ksproxy.sock). Repeatable."""
        self["listen"].append(endpoint)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """Address or CIDR whose X-Forwarded-Proto/Host are kept. Repeatable."""
        import ipaddress

        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxy {cidr}: {e}") from None
        self["trusted-proxy"].append(cidr)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = ["tcp:8080"]
        source = self["source"]
        if not source:
            raise usage.UsageError("--source is required: dir:PATH or kubernetes[:KUBECONFIG]")
        if not (source.startswith("dir:") or source == "kubernetes" or source.startswith("kubernetes:")):
            raise usage.UsageError(f"--source {source}: expected dir:PATH or kubernetes[:KUBECONFIG]")
        if self["state-gate"] not in (None, "kubesphere"):
            raise usage.UsageError("--state-gate takes only 'kubesphere'")
        for name in (
            "connect-timeout",
            "response-header-timeout",
            "idle-timeout",
            "tunnel-idle-timeout",
            "header-timeout",
            "keepalive-timeout",
            "drain-grace",
            "busy-poll",
        ):
            self[name] = _seconds(self[name])
        for name in ("connect-timeout", "response-header-timeout", "idle-timeout", "tunnel-idle-timeout",
                     "header-timeout", "keepalive-timeout"):
            # A timeout of 0 would fail every request at once (a typo, not a setting); none means "never" here.
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be longer than zero")
        if self["drain-grace"] < 0:
            raise usage.UsageError("--drain-grace cannot be negative (0: stop without waiting)")
        if not 0 <= self["busy-poll"] <= MAX_BUSY_POLL:
            raise usage.UsageError(f"--busy-poll must be between 0 and {MAX_BUSY_POLL * 1000:g}ms")
        for name in ("max-header-bytes", "max-url-bytes", "workers"):
            try:
                self[name] = int(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be a whole number") from None
        for name in ("max-header-bytes", "max-url-bytes"):
            # Below this every ordinary request would be refused: a typo, not a setting.
            if self[name] < MIN_HEAD_LIMIT:
                raise usage.UsageError(f"--{name} must be at least {MIN_HEAD_LIMIT} bytes, not {self[name]}")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format takes text or json")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["workers"] > 1 or self["worker-index"] is not None:
            for endpoint in self["listen"]:
                if not endpoint.startswith("tcp:"):
                    raise usage.UsageError(f"--workers supports tcp: listeners only, not {endpoint!r}")
        if self["manage-state"] and self["state-gate"]:
            raise usage.UsageError(
                "--manage-state and --state-gate=kubesphere exclude each other: either ksproxy owns status.state or "
                "KubeSphere's extension manager does"
            )
        if self["manage-state"] and not source.startswith("kubernetes"):
            raise usage.UsageError("--manage-state needs --source kubernetes (the file source has no status to write)")
        self["default-upstream-credentials"] = None
        if self["default-upstream"]:
            try:
                if self["default-upstream"] == IN_CLUSTER:
                    endpoint, tokenFile = inClusterEndpoint()
                else:
                    endpoint = endpointWithCA(endpointFromURL(self["default-upstream"]), self["default-upstream-ca"])
                    tokenFile = self["default-upstream-token-file"]
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--default-upstream: {e}") from None
            self["default-upstream"] = endpoint
            self["default-upstream-token-file"] = tokenFile
        super().postOptions()


class _PathOptions(usage.Options):
    def parseArgs(self, path: str) -> None:
        self["path"] = path


class CheckOptions(_PathOptions):
    synopsis = "PATH"
    longdesc = "Validate manifests offline; exit non-zero on any rejection, conflict or syntax error."


class RoutesOptions(_PathOptions):
    synopsis = "PATH"
    longdesc = "Print the compiled route table of the manifests under PATH."


class Options(usage.Options):
    synopsis = "run|check|routes [options]"
    subCommands = [
        ["run", None, RunOptions, "Run the gateway."],
        ["check", None, CheckOptions, "Validate manifests."],
        ["routes", None, RoutesOptions, "Print the compiled routes."],
    ]

    def getSynopsis(self) -> str:
        synopsis = super().getSynopsis()
        if getattr(self, "subCommand", None):
            # A subcommand's usage line is this one plus its own: without ours, it reads
            # "ksproxy run [options]", not "ksproxy run|check|routes [options] run [options]".
            return synopsis[: -len(" " + self.synopsis)]
        return synopsis

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a subcommand: run, check or routes")


class ProxyListeners(service.MultiService):
    """
    The proxy listeners, stopped gracefully: stop accepting, let in-flight requests finish for up to C{grace}
    seconds, then cut what is left (SPEC 10).
    """

    def __init__(
        self,
        factory: HTTPServerFactory,
        clock,
        grace: float,
        startWhen: Optional[Callable[[], defer.Deferred]] = None,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.clock = clock
        self.grace = grace
        # With --workers the sockets are already bound: a worker starts accepting only once its table is
        # live, so a connection never reaches a worker that would answer 404 for a route it has not loaded.
        self.startWhen = startWhen

    def privilegedStartService(self) -> None:
        # twistd binds ports here, before startService; with startWhen the (already bound) sockets are adopted
        # in startService instead, once the table is live.
        if self.startWhen is None:
            super().privilegedStartService()

    def startService(self) -> None:
        if self.startWhen is None:
            super().startService()
            return
        service.Service.startService(self)
        self.startWhen().addCallback(lambda _: self.running and [child.startService() for child in self])

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        service.Service.stopService(self)
        # Close the listening ports (those that were started).
        yield defer.DeferredList([defer.maybeDeferred(c.stopService) for c in list(self) if c.running])
        factory = self.factory
        factory.drain()
        deadline = self.clock.seconds() + self.grace
        while factory.connections and self.clock.seconds() < deadline:
            yield task.deferLater(self.clock, 0.05, lambda: None)
        left = list(factory.connections)
        if left:
            log.warn("drain grace over: closing {n} connections still busy", n=len(left))
            for proto in left:
                proto.transport.abortConnection()


class GatewayService(SequentialMultiService):
    """
    The top of the tree.  With C{jsonLogs} it gives twistd's application a JSON log observer: twistd builds the
    service before it starts logging, and uses the application's L{ILogObserver} component when there is one.
    """

    def __init__(self, jsonLogs: bool = False) -> None:
        super().__init__()
        self.jsonLogs = jsonLogs

    def setServiceParent(self, parent) -> None:  # type: ignore[no-untyped-def]
        if self.jsonLogs and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            from .logfmt import jsonLogObserver

            parent.setComponent(ILogObserver, jsonLogObserver())
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd binds the listeners (proxy and admin) here, before the reactor runs: a port in use is an
        # operator's mistake that deserves one line naming the address, not twistd's traceback.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(_cannotListen(e)) from None
        except (OSError, OverflowError) as e:
            # A port out of range, a UNIX socket in a folder that does not exist.
            raise SystemExit(f"ksproxy: cannot listen: {e}") from None


def _cannotListen(e: CannotListenError) -> str:
    reason = getattr(e.socketError, "strerror", None) or e.socketError
    return f"ksproxy: cannot listen on {e.interface or '*'}:{e.port}: {reason}"


def _endpointService(option: str, description: str, factory, reactor) -> service.Service:  # type: ignore[no-untyped-def]
    """C{strports.service}, with a mistyped endpoint string (an unknown type, a port that is not a number, a
    certificate file that cannot be read) as one line naming the option, not a traceback."""
    try:
        return strports.service(description, factory, reactor=reactor)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise SystemExit(f"ksproxy: --{option} {description}: {e}") from None


class _Cleanup(service.Service):
    """At the very end of a stop: health checkers, bundle fetches and idle upstream connections."""

    def __init__(self, pool: UpstreamPool, health: HealthRegistry, fetcher: BundleFetcher, client: OutOfBandClient):
        self.pool = pool
        self.health = health
        self.fetcher = fetcher
        self.client = client

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.health.stopAll()
        self.fetcher.stop()
        self.pool.close()
        return self.client.close()


def makeService(options: usage.Options, reactor=None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    if options.subCommand in ("check", "routes"):
        from .cli import check, routes

        command = check if options.subCommand == "check" else routes
        raise SystemExit(command(options.subOptions["path"], sys.stdout))
    return makeRunService(options.subOptions, reactor)


def makeRunService(config: RunOptions, reactor) -> service.MultiService:
    """Build the service tree for C{run}: source, reconciler, listeners, admin (or, with --workers, a supervisor)."""
    from .admin import adminSite

    # Started in the order added; stopped in reverse, one after another: the listeners drain first, then the
    # status writer and the source stop, then the admin listener, and last the pools, checkers and fetches.
    top = GatewayService(jsonLogs=config["log-format"] == "json")
    workerIndex = config["worker-index"]
    if config["workers"] > 1 and workerIndex is None:
        # Grace for the workers: their own drain, plus a little to exit.
        try:
            listening = [bindListening(endpoint) for endpoint in config["listen"]]
        except CannotListenError as e:
            raise SystemExit(_cannotListen(e)) from None
        except ValueError as e:
            raise SystemExit(f"ksproxy: cannot listen: {e}") from None
        Supervisor(
            reactor, workerArgv(config.argv), config["workers"], config["drain-grace"] + 5, listening
        ).setServiceParent(top)
        return top
    if hasattr(reactor, "busyPoll"):  # the supervisor above has no traffic to wait for
        reactor.busyPoll = config["busy-poll"]
    # Upstream response heads get the same limit as client request heads.
    pool = UpstreamPool(
        reactor, connectTimeout=config["connect-timeout"], maxHeadBytes=config["max-header-bytes"]
    )
    outOfBand = OutOfBandClient(reactor)
    health = HealthRegistry(reactor, httpProbe(outOfBand))
    fetcher = BundleFetcher(reactor, outOfBand.fetchBytes)
    _Cleanup(pool, health, fetcher, outOfBand).setServiceParent(top)
    # The admin site needs the parts built below; its service is added here so that it stops after the drain.
    admin = None
    if config["admin-listen"] and config["admin-listen"] != "none" and workerIndex in (None, "0"):
        # With --workers only the first worker serves the admin endpoints (they share one port).
        admin = _endpointService("admin-listen", config["admin-listen"], None, reactor)
        admin.setServiceParent(top)
    timeouts = Timeouts(
        connect=config["connect-timeout"],
        responseHeader=config["response-header-timeout"],
        idle=config["idle-timeout"],
        tunnelIdle=config["tunnel-idle-timeout"],
    )
    empty = compileTable((), generation=0).table
    gateway = Gateway(
        reactor,
        ServedState(empty, {}, 0, False),
        pool,
        timeouts=timeouts,
        health=health,
        fetchedBundle=fetcher.get,
        defaultUpstream=config["default-upstream"] or None,
        defaultUpstreamHeaders=KubeAPICredentials(reactor, config["default-upstream-token-file"]),
        trustedProxies=config["trusted-proxy"],
    )
    reconciler = Reconciler(reactor, gateway, stateGate=config["state-gate"], threaded=True)
    reconciler.observers.append(lambda report: pool.prune(_liveKeys(report)))
    reconciler.observers.append(lambda report: health.reconcile(checksOf(report.snapshot.resources)))
    reconciler.observers.append(
        lambda report: fetcher.reconcile([r for r in report.snapshot.resources if isinstance(r, JSBundle)])
    )

    source = _makeSource(config["source"], reconciler, reactor)
    source.setServiceParent(top)
    _whenSynced(source, reconciler)
    apiClient = None
    if config["source"].startswith("kubernetes"):
        from kubernetes import client as kclient

        from .status_writer import makeStatusService

        apiClient = kclient.ApiClient(configuration=source.configuration)
        statusService, writer = makeStatusService(
            apiClient,
            reactor,
            namespace=config["status-namespace"] or os.environ.get("POD_NAMESPACE") or "ksproxy-system",
            manageState=config["manage-state"],
            stateGate=config["state-gate"] is not None,
        )
        statusService.setServiceParent(top)
        reconciler.observers.append(lambda report: writer.update(statusInputs(report, health)))
        health.listeners.append(
            lambda checker: reconciler.report is not None and writer.update(statusInputs(reconciler.report, health))
        )
    # Authentication reviews (TokenReview, SubjectAccessReview) use the source's cluster credentials.
    try:
        gateway.gate = buildGate(config, reactor, kubeApiClient=apiClient)
    except usage.UsageError as e:
        # Key and policy files are read here, after option parsing: a bad one is still one line, not a traceback.
        raise SystemExit(f"ksproxy: {e}") from None

    limits = ServerLimits(
        maxUrlBytes=config["max-url-bytes"],
        maxHeaderBytes=config["max-header-bytes"],
        headerTimeout=config["header-timeout"],
        keepAliveTimeout=config["keepalive-timeout"],
    )
    factory = HTTPServerFactory(gateway, reactor, limits, AccessLog(reactor, enabled=not config["no-access-log"]))
    listeners = ProxyListeners(
        factory, reactor, config["drain-grace"], reconciler.whenReady if workerIndex is not None else None
    )
    if workerIndex is not None:
        ParentWatch(reactor).setServiceParent(top)
        for fd in os.environ.get(LISTEN_FDS, "").split(","):
            StreamServerEndpointService(inheritedEndpoint(reactor, int(fd)), factory).setServiceParent(listeners)
    else:
        for endpoint in config["listen"]:
            _endpointService("listen", endpoint, factory, reactor).setServiceParent(listeners)
    listeners.setServiceParent(top)
    metrics = installMetrics(reconciler, gateway, pool, health, factory, source)
    if admin is not None:
        admin.factory = adminSite(
            reconciler, gateway, pool, _allWorkers(metrics, reactor, workerIndex), draining=lambda: factory.draining
        )
    elif workerIndex is not None and config["admin-listen"] != "none":
        _serveWorkerMetrics(metrics, reactor, int(workerIndex)).setServiceParent(top)
    # For tests and embedding: the parts, by name.
    top.gateway = gateway  # type: ignore[attr-defined]
    top.reconciler = reconciler  # type: ignore[attr-defined]
    top.pool = pool  # type: ignore[attr-defined]
    top.factory = factory  # type: ignore[attr-defined]
    top.source = source  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    top.health = health  # type: ignore[attr-defined]
    return top


def _allWorkers(metrics, reactor, workerIndex: Optional[str]):  # type: ignore[no-untyped-def]
    """Worker 0's /metrics under --workers: every worker's (L{ksproxy.workermetrics}); else this process's."""
    directory, count = os.environ.get(WORKER_DIR), int(os.environ.get(WORKER_COUNT) or 1)
    if workerIndex is None or not directory or count < 2:
        return metrics
    return AllWorkersMetrics(metrics, count, unixFetcher(reactor, directory))


def _serveWorkerMetrics(metrics, reactor, index: int) -> service.Service:  # type: ignore[no-untyped-def]
    """A worker other than 0: its own /metrics on its private socket, for worker 0 to read."""
    directory = os.environ.get(WORKER_DIR)
    if not directory:
        return service.Service()  # started by hand, without a supervisor: nobody to read it
    path = metricsSocket(directory, index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by this worker's predecessor if it was killed
    root = Resource()
    root.putChild(b"metrics", metrics.resource())
    site = Site(root)
    site.displayTracebacks = False
    return StreamServerEndpointService(UNIXServerEndpoint(reactor, path, mode=0o600), site)


def _makeSource(spec: str, reconciler: Reconciler, reactor) -> service.Service:
    if spec.startswith("dir:"):
        from .sources.files import FileSource

        return FileSource(spec[len("dir:") :], reconciler.inventory, reactor)
    from .sources.kube import KubeSource

    kubeconfig: Optional[str] = spec[len("kubernetes:") :] if spec.startswith("kubernetes:") else None
    return KubeSource(reconciler.inventory, reactor, kubeconfig=kubeconfig or None)


def _whenSynced(source: service.Service, reconciler: Reconciler) -> None:
    """Ready once the source's first complete snapshot is in (the Deferred exists once the source is built)."""
    synced = getattr(source, "synced", None)
    if synced is None:
        reconciler.markReady()
    else:
        synced.addCallback(reconciler.markReady)


def _liveKeys(report) -> set[str]:  # type: ignore[no-untyped-def]
    from .model.types import APIService, ReverseProxy

    keys = set()
    for resource in report.snapshot.resources:
        if isinstance(resource, ReverseProxy):
            keys.add(resource.upstream.key)
        elif isinstance(resource, APIService):
            keys.add(resource.endpoint.key)
    return keys


def endpointFromURL(url: str) -> Endpoint:
    """An http(s) URL as an L{Endpoint} with the system trust store (for --default-upstream)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return Endpoint(parts.scheme, parts.hostname, port, parts.path)
