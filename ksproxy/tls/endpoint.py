# -*- test-case-name: tests.integration.test_tls -*-
"""
The C{ksproxy-tls:} server endpoint: TLS termination for any listener, with no new ksproxy option.

    --listen ksproxy-tls:port=8443:certDir=/etc/ksproxy/certs
    --listen ksproxy-tls:port=8443:interface=127.0.0.1:cert=/etc/tls/tls.crt:key=/etc/tls/tls.key
    --listen ksproxy-tls:8443:certDir=/certs:reload=30:default=wildcard:alpn=http/1.1

Parameters: C{port} (or the first positional argument), C{interface} (an IPv6 address listens on TCP6),
C{backlog}; C{certDir}, or C{cert} with C{key} (C{key} may be left out when C{cert} holds both); C{default}
(the certificate for clients without SNI, see L{ksproxy.tls.server}); C{reload} (seconds between checks of the
files, default 10, 0 to never reload); C{alpn} (comma-separated, default C{h2,http/1.1}).

The plugin that registers the prefix is C{twisted/plugins/ksproxy_tls.py}; it imports nothing from here until
an endpoint is parsed.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from .server import DEFAULT_ALPN, CertificateSource, CertificateStore, SNIConnectionCreator

__all__ = ["TLSServerEndpoint", "parseTLSServer"]

log = Logger()


@implementer(IListeningPort)
class _ReloadingPort:
    """The listening port, with the certificate reload timer that lives as long as it does."""

    def __init__(self, port: IListeningPort, timer: Optional[LoopingCall]) -> None:
        self.port = port
        self.timer = timer

    def startListening(self) -> None:
        self.port.startListening()

    def stopListening(self) -> defer.Deferred[None]:
        if self.timer is not None and self.timer.running:
            self.timer.stop()
        return defer.maybeDeferred(self.port.stopListening)

    def getHost(self) -> Any:
        return self.port.getHost()


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    Wraps a stream server endpoint in TLS with certificates from a L{CertificateStore}, checked for changes
    every C{reloadInterval} seconds on C{clock} while listening.
    """

    def __init__(
        self, wrapped: IStreamServerEndpoint, store: CertificateStore, clock: Any, reloadInterval: float
    ) -> None:
        self.wrapped = wrapped
        self.store = store
        self.clock = clock
        self.reloadInterval = reloadInterval

    def listen(self, protocolFactory: Any) -> defer.Deferred[IListeningPort]:
        tlsFactory = TLSMemoryBIOFactory(SNIConnectionCreator(self.store), False, protocolFactory)
        d = self.wrapped.listen(tlsFactory)

        def listening(port: IListeningPort) -> IListeningPort:
            timer = None
            if self.reloadInterval > 0:
                timer = LoopingCall(self.store.refresh)
                timer.clock = self.clock
                timer.start(self.reloadInterval, now=False).addErrback(
                    lambda f: log.failure("certificate reload timer failed", f)
                )
            return _ReloadingPort(port, timer)

        return d.addCallback(listening)


def parseTLSServer(reactor: Any, *args: str, **kwargs: str) -> TLSServerEndpoint:
    """Build a L{TLSServerEndpoint} from C{ksproxy-tls:} endpoint string arguments."""
    kwargs = dict(kwargs)
    port = kwargs.pop("port", None)
    if args:
        if port is not None or len(args) > 1:
            raise ValueError(f"ksproxy-tls: unexpected positional arguments {args!r}")
        port = args[0]
    if port is None:
        raise ValueError("ksproxy-tls: port= is required")
    interface = kwargs.pop("interface", "")
    backlog = int(kwargs.pop("backlog", "50"))
    certDir = kwargs.pop("certDir", None)
    cert = kwargs.pop("cert", None)
    key = kwargs.pop("key", None)
    default = kwargs.pop("default", None)
    reload = float(kwargs.pop("reload", "10"))
    alpnText = kwargs.pop("alpn", None)
    if kwargs:
        raise ValueError(f"ksproxy-tls: unknown parameters {', '.join(sorted(kwargs))}")
    if (certDir is None) == (cert is None):
        raise ValueError("ksproxy-tls: give certDir=FOLDER, or cert=FILE (with key=FILE when separate)")
    alpn = (
        DEFAULT_ALPN
        if alpnText is None
        else tuple(p.strip().encode("ascii") for p in alpnText.split(",") if p.strip())
    )
    unknown = [p.decode() for p in alpn if p not in DEFAULT_ALPN]
    if unknown or not alpn:
        # Anything else would be offered to clients and then spoken as HTTP/1.1.
        raise ValueError(f"ksproxy-tls: alpn= takes h2 and/or http/1.1, not {alpnText!r}")
    store = CertificateStore(
        CertificateSource(certDir=certDir, certFile=cert, keyFile=key, defaultName=default), alpn
    )
    endpointClass = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
    wrapped = endpointClass(reactor, int(port), backlog=backlog, interface=interface)
    return TLSServerEndpoint(wrapped, store, reactor, reload)
