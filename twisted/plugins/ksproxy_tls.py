"""Registers the C{ksproxy-tls:} server endpoint string prefix (see L{ksproxy.tls.endpoint}); imports lazily."""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _KSProxyTLSParser:
    prefix = "ksproxy-tls"

    def parseStreamServer(self, reactor, *args, **kwargs):  # type: ignore[no-untyped-def]
        from ksproxy.tls.endpoint import parseTLSServer

        return parseTLSServer(reactor, *args, **kwargs)


ksproxyTLS = _KSProxyTLSParser()
