"""
TLS termination (SNI, reload without dropping connections, versions, ALPN, the C{ksproxy-tls:} endpoint string)
and upstream client certificates (mTLS), with real handshakes on 127.0.0.1 against a test CA.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import tempfile
import warnings
from typing import List, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.internet.task import Clock, deferLater
from twisted.protocols import policies
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from ksproxy.http.server import HTTPServerFactory
from ksproxy.http.upstream import tlsCreator
from ksproxy.model.parse import parseResource
from ksproxy.model.types import ClientCertificate, TLSSettings
from ksproxy.tls.client import ClientCertificateCreator
from ksproxy.tls.endpoint import TLSServerEndpoint
from ksproxy.tls.server import CertificateError, CertificateSource, CertificateStore
from tests.integration.gateway import RunningGateway
from tests.integration.testca import TestCA, _atomicWrite, commonName
from tests.util import RecordingUpstream, listenUpstream, readUntilClosed

TIMEOUT = 10.0


class _Info:
    """Answers with what the server knows about the connection."""

    def handleRequest(self, exchange) -> None:  # type: ignore[no-untyped-def]
        exchange.discardBody()
        body = b"secure=%d path=%s" % (exchange.secure, exchange.target)
        exchange.writeHead(200, [(b"Content-Type", b"text/plain")], length=len(body))
        exchange.write(body)
        exchange.finish()


def _clientContext(
    ca: TestCA, alpn: Optional[List[str]] = None, maxVersion=None, minVersion=None
) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    ctx = ssl.create_default_context(cadata=ca.certPEM.decode())
    ctx.check_hostname = False  # we compare the certificate we got instead
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if minVersion is not None:
        ctx.minimum_version = minVersion
    if maxVersion is not None:
        ctx.maximum_version = maxVersion
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


class TLSClient:
    """A blocking TLS client connection (used from threads)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, serverName: Optional[str]) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock = ctx.wrap_socket(raw, server_hostname=serverName)
        self.der = self.sock.getpeercert(True)

    @property
    def cn(self) -> str:
        return commonName(self.der)

    def get(self, path: str) -> bytes:
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        data = b""
        while b"secure=" not in data or not data.endswith(path.encode()):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def connect(port: int, ctx: ssl.SSLContext, serverName: Optional[str]) -> defer.Deferred:
    return threads.deferToThread(TLSClient, port, ctx, serverName)


class TerminationTests(TestCase):
    def setUp(self):  # type: ignore[no-untyped-def]
        self.ca = TestCA()
        self.dir = tempfile.mkdtemp(prefix="ksproxy-certs-")
        self.addCleanup(shutil.rmtree, self.dir)
        self.ca.writePair(self.dir, "a", ["a.example.test"])
        cert, key = self.ca.issue(["b.example.test"])
        _atomicWrite(
            os.path.join(self.dir, "b.pem"), key + cert + self.ca.certPEM
        )  # key and chain in one file
        os.mkdir(os.path.join(self.dir, "wild"))  # a Kubernetes TLS Secret mount
        cert, key = self.ca.issue(["*.wild.test"], cn="wildcard")
        _atomicWrite(os.path.join(self.dir, "wild", "tls.crt"), cert)
        _atomicWrite(os.path.join(self.dir, "wild", "tls.key"), key)
        self.ca.writePair(self.dir, "default", ["default.example.test"])
        self.clock = Clock()
        self.clients: List[TLSClient] = []

    @defer.inlineCallbacks
    def listen(self, alpn=("h2", "http/1.1")):  # type: ignore[no-untyped-def]
        self.store = CertificateStore(CertificateSource(certDir=self.dir), [p.encode() for p in alpn])
        endpoint = TLSServerEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), self.store, self.clock, reloadInterval=10
        )
        self.factory = HTTPServerFactory(_Info(), reactor)
        self.port = yield endpoint.listen(self.factory)
        self.addCleanup(self.port.stopListening)
        return self.port.getHost().port

    @defer.inlineCallbacks
    def client(self, serverName: Optional[str], **kw):  # type: ignore[no-untyped-def]
        c = yield connect(self.portNumber, _clientContext(self.ca, **kw), serverName)
        self.clients.append(c)
        return c

    def tearDown(self) -> None:
        for c in self.clients:
            c.close()

    @defer.inlineCallbacks
    def test_sniChoosesCertificate(self):  # type: ignore[no-untyped-def]
        self.portNumber = yield self.listen()
        for name, cn in [
            ("a.example.test", "a.example.test"),
            ("B.Example.Test", "b.example.test"),
            ("x.wild.test", "wildcard"),
            ("deep.x.wild.test", "default.example.test"),  # a wildcard covers one label only
            ("unknown.test", "default.example.test"),
            (None, "default.example.test"),
        ]:
            c = yield self.client(name)
            self.assertEqual(c.cn, cn, name)
        response = yield threads.deferToThread(c.get, "/x")
        self.assertIn(b"secure=1 path=/x", response)

    @defer.inlineCallbacks
    def test_versionsAndALPN(self):  # type: ignore[no-untyped-def]
        self.portNumber = yield self.listen()
        c = yield self.client("a.example.test", alpn=["h2", "http/1.1"])
        self.assertEqual(c.sock.selected_alpn_protocol(), "h2")
        self.assertIn(c.sock.version(), ("TLSv1.2", "TLSv1.3"))
        c = yield self.client("a.example.test", alpn=["http/1.1"], maxVersion=ssl.TLSVersion.TLSv1_2)
        self.assertEqual((c.sock.selected_alpn_protocol(), c.sock.version()), ("http/1.1", "TLSv1.2"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the point: clients with deprecated versions
            old = [
                _clientContext(self.ca, minVersion=ssl.TLSVersion.TLSv1, maxVersion=v)
                for v in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
            ]
        for ctx in old:
            yield self.assertFailure(
                threads.deferToThread(TLSClient, self.portNumber, ctx, "a.example.test"),
                ssl.SSLError,
                OSError,
            )

    @defer.inlineCallbacks
    def test_alpnWithoutH2(self):  # type: ignore[no-untyped-def]
        self.portNumber = yield self.listen(alpn=("http/1.1",))
        c = yield self.client("b.example.test", alpn=["h2", "http/1.1"])
        self.assertEqual(c.sock.selected_alpn_protocol(), "http/1.1")

    # Twisted's ssl: endpoint hands pyOpenSSL objects to pyOpenSSL, which deprecates them: not ours to fix.
    @pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
    @defer.inlineCallbacks
    def test_twistedsOwnSSLEndpointSpeaksALPN(self):  # type: ignore[no-untyped-def]
        """
        `--listen ssl:...` (Twisted's endpoint, as the README shows): a client that offers ALPN, as every browser
        and curl does, completes its handshake (Twisted 26 answers it with an internal-error alert when the
        factory names no protocol) and gets a protocol the server speaks.
        """
        certFile, keyFile = (os.path.join(self.dir, name) for name in ("a.crt", "a.key"))
        endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={keyFile}:certKey={certFile}")
        port = yield endpoint.listen(HTTPServerFactory(_Info(), reactor))
        self.addCleanup(port.stopListening)
        self.portNumber = port.getHost().port
        for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
            c = yield self.client("a.example.test", alpn=offered)
            self.assertEqual(c.sock.selected_alpn_protocol(), chosen)
        response = yield threads.deferToThread(c.get, "/alpn")
        self.assertIn(b"secure=1 path=/alpn", response)

    @defer.inlineCallbacks
    def test_reloadKeepsConnections(self):  # type: ignore[no-untyped-def]
        self.portNumber = yield self.listen()
        old = yield self.client("a.example.test")
        first = yield threads.deferToThread(old.get, "/1")
        self.assertIn(b"path=/1", first)
        oldDer = old.der
        self.ca.writePair(self.dir, "a", ["a.example.test", "a2.example.test"])
        self.clock.advance(9.9)
        self.assertEqual(self.store.generation, 1)
        self.clock.advance(0.2)
        self.assertEqual(self.store.generation, 2)
        # The connection made before the reload goes on, on the certificate it started with.
        again = yield threads.deferToThread(old.get, "/2")
        self.assertIn(b"path=/2", again)
        new = yield self.client("a.example.test")
        self.assertNotEqual(new.der, oldDer)
        new2 = yield self.client("a2.example.test")
        self.assertEqual(new2.der, new.der)
        # Nothing changed: nothing reloaded.
        self.clock.advance(10)
        self.assertEqual(self.store.generation, 2)

    @defer.inlineCallbacks
    def test_brokenFilesKeepTheOldCertificates(self):  # type: ignore[no-untyped-def]
        self.portNumber = yield self.listen()
        before = yield self.client("a.example.test")
        _atomicWrite(os.path.join(self.dir, "a.crt"), b"not a certificate")
        self.clock.advance(10)
        self.assertEqual(self.store.generation, 1)
        during = yield self.client("a.example.test")
        self.assertEqual(during.der, before.der)
        cert, key = self.ca.issue(["a.example.test"])
        _atomicWrite(os.path.join(self.dir, "a.key"), self.ca.issue(["other"])[1])  # a key of another cert
        _atomicWrite(os.path.join(self.dir, "a.crt"), cert)
        self.clock.advance(10)
        self.assertEqual(self.store.generation, 1)
        _atomicWrite(os.path.join(self.dir, "a.key"), key)
        self.clock.advance(10)
        self.assertEqual(self.store.generation, 2)
        after = yield self.client("a.example.test")
        self.assertNotEqual(after.der, before.der)

    @defer.inlineCallbacks
    def test_endpointString(self):  # type: ignore[no-untyped-def]
        endpoint = serverFromString(
            reactor, f"ksproxy-tls:port=0:interface=127.0.0.1:certDir={self.dir}:reload=0"
        )
        self.assertIsInstance(endpoint, TLSServerEndpoint)
        port = yield endpoint.listen(HTTPServerFactory(_Info(), reactor))
        self.addCleanup(port.stopListening)
        self.portNumber = port.getHost().port
        c = yield self.client("x.wild.test")
        self.assertEqual(c.cn, "wildcard")
        certFile, keyFile = os.path.join(self.dir, "a.crt"), os.path.join(self.dir, "a.key")
        single = serverFromString(reactor, f"ksproxy-tls:0:interface=127.0.0.1:cert={certFile}:key={keyFile}")
        port = yield single.listen(HTTPServerFactory(_Info(), reactor))
        self.addCleanup(port.stopListening)
        self.portNumber = port.getHost().port
        c = yield self.client("whatever.test")
        self.assertEqual(c.cn, "a.example.test")

    def test_endpointStringErrors(self) -> None:
        empty = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, empty)
        for text, error in [
            ("ksproxy-tls:port=0", ValueError),
            (f"ksproxy-tls:port=0:certDir={self.dir}:cert=x", ValueError),
            (f"ksproxy-tls:port=0:certDir={self.dir}:colour=blue", ValueError),
            (f"ksproxy-tls:certDir={self.dir}", ValueError),
            (f"ksproxy-tls:port=0:certDir={empty}", CertificateError),
            ("ksproxy-tls:port=0:certDir=/nonexistent/ksproxy", CertificateError),
            (f"ksproxy-tls:port=0:certDir={self.dir}:alpn=h3", ValueError),
            (f"ksproxy-tls:port=0:certDir={self.dir}:alpn=", ValueError),
        ]:
            self.assertRaises(error, serverFromString, reactor, text)

    def test_aMissingDefaultIsLogged(self) -> None:
        """default=NAME with no such certificate: the store starts (the file may come later) and says which
        certificate clients without SNI get instead."""
        from twisted.logger import globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        CertificateStore(CertificateSource(certDir=self.dir, defaultName="zzz"))
        warned = [e for e in events if "no such certificate" in e.get("log_format", "")]
        self.assertEqual([(e["wanted"], e["used"]) for e in warned], [("zzz", "default")])

    @defer.inlineCallbacks
    def test_gatewayOverTLS(self):  # type: ignore[no-untyped-def]
        upstream = RecordingUpstream()
        upPort, up = listenUpstream(reactor, upstream)
        self.addCleanup(upPort.stopListening)
        manifest = (
            "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: ReverseProxy\nmetadata: {name: app}\n"
            f"spec:\n  matcher: {{path: /app/*, method: GET}}\n  upstream: {{url: 'http://127.0.0.1:{up}'}}\n"
        )
        gw = RunningGateway(
            {"rp.yaml": manifest}, ["--listen", f"ksproxy-tls:port=0:interface=127.0.0.1:certDir={self.dir}"]
        )
        yield gw.start()
        self.addCleanup(gw.stop)
        self.portNumber = gw.port  # the last --listen: the TLS one
        c = yield self.client("a.example.test")
        self.assertEqual(c.cn, "a.example.test")
        c.sock.sendall(b"GET /app/x HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n")
        data = yield threads.deferToThread(readUntilClosed, c.sock)
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:200])
        self.assertEqual(upstream.last.header(b"x-forwarded-proto"), b"https")
        c.close()  # (cleanups run before tearDown under pytest: close before the gateway drains)


# -- upstream mTLS ---------------------------------------------------------------------------------------------


class _PeerName(resource.Resource):
    isLeaf = True

    def render(self, request):  # type: ignore[no-untyped-def]
        peer = request.channel.transport.getPeerCertificate()
        if peer is None:
            return b"anonymous"
        return commonName(peer.to_cryptography().public_bytes(serialization.Encoding.DER)).encode()


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:  # type: ignore[no-untyped-def]
        self.done.callback(self.data)


def _listenMutualTLS(ca: TestCA) -> Tuple[object, int]:
    cert, key = ca.issue(["localhost"], ips=["127.0.0.1"])
    options = CertificateOptions(
        privateKey=serialization.load_pem_private_key(key, None),
        certificate=x509.load_pem_x509_certificate(cert),
        verify=True,
        caCerts=[Certificate.loadPEM(ca.certPEM).original],
        requireCertificate=True,
    )
    site = server.Site(_PeerName())
    site.log = lambda request: None  # type: ignore[method-assign]
    tracking = policies.WrappingFactory(site)  # its .protocols: the connections still open
    port = reactor.listenSSL(0, tracking, options, interface="127.0.0.1")
    port.tracking = tracking  # type: ignore[attr-defined]
    return port, port.getHost().port


class MutualTLSTests(TestCase):
    def setUp(self):  # type: ignore[no-untyped-def]
        self.ca = TestCA()
        self.dir = tempfile.mkdtemp(prefix="ksproxy-client-")
        self.addCleanup(shutil.rmtree, self.dir)
        self.certFile, self.keyFile = self.ca.writePair(self.dir, "client", cn="ksproxy-1", client=True)
        self.upPort, self.up = _listenMutualTLS(self.ca)
        self.addCleanup(self.upPort.stopListening)
        self.settings = TLSSettings(
            caBundle=self.ca.certPEM, clientCertificate=ClientCertificate(self.certFile, self.keyFile)
        )

    @defer.inlineCallbacks
    def fetch(self, creator):  # type: ignore[no-untyped-def]
        proto = _Collect()
        yield connectProtocol(
            wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.up)), proto
        )
        data = yield proto.done
        return data.partition(b"\r\n\r\n")[2]

    @defer.inlineCallbacks
    def test_clientCertificatePresentedAndRotated(self):  # type: ignore[no-untyped-def]
        clock = Clock()
        creator = ClientCertificateCreator("127.0.0.1", self.settings, clock, recheck=10)
        body = yield self.fetch(creator)
        self.assertEqual(body, b"ksproxy-1")
        self.ca.writePair(self.dir, "client", cn="ksproxy-2", client=True)
        clock.advance(9.9)
        body = yield self.fetch(creator)
        self.assertEqual(body, b"ksproxy-1")  # not looked at again yet
        clock.advance(0.2)
        body = yield self.fetch(creator)
        self.assertEqual(body, b"ksproxy-2")

    @defer.inlineCallbacks
    def test_insecureSkipVerifyStillPresentsCertificate(self):  # type: ignore[no-untyped-def]
        settings = TLSSettings(insecureSkipVerify=True, clientCertificate=self.settings.clientCertificate)
        body = yield self.fetch(ClientCertificateCreator("127.0.0.1", settings))
        self.assertEqual(body, b"ksproxy-1")

    @defer.inlineCallbacks
    def test_withoutClientCertificateRefused(self):  # type: ignore[no-untyped-def]
        proto = _Collect()
        creator = tlsCreator("127.0.0.1", TLSSettings(caBundle=self.ca.certPEM))
        yield connectProtocol(
            wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.up)), proto
        )
        data = yield proto.done
        self.assertEqual(data, b"")

    def test_unreadableFilesFailTheConnection(self) -> None:
        settings = TLSSettings(
            caBundle=self.ca.certPEM, clientCertificate=ClientCertificate("/nonexistent.crt", self.keyFile)
        )
        creator = ClientCertificateCreator("127.0.0.1", settings)
        self.assertRaises(CertificateError, creator.clientConnectionForTLS, None)

    @defer.inlineCallbacks
    def test_throughGateway(self):  # type: ignore[no-untyped-def]
        if not isinstance(tlsCreator("127.0.0.1", self.settings), ClientCertificateCreator):
            raise self.skipTest("ksproxy.http.upstream.tlsCreator does not use ksproxy.tls.client yet")
        from tests.util import httpRequest

        manifest = (
            "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: ReverseProxy\nmetadata: {name: m}\n"
            "spec:\n  matcher: {path: /m/*, method: GET}\n  upstream:\n"
            f"    url: 'https://127.0.0.1:{self.up}'\n    caBundle: {base64.b64encode(self.ca.certPEM).decode()}\n"
            f"    clientCertificate: {{certFile: {self.certFile}, keyFile: {self.keyFile}}}\n"
        )
        gw = RunningGateway({"m.yaml": manifest})
        yield gw.start()
        try:
            status, _, body = yield httpRequest(gw.port, "GET", "/m/x")
            self.assertEqual((status, body), (200, b"ksproxy-1"))
        finally:
            yield gw.stop()
        # The pooled upstream connection closes with a TLS close_notify exchange: let it finish.
        for _ in range(200):
            if not self.upPort.tracking.protocols:
                break
            yield deferLater(reactor, 0.01, lambda: None)


class ClientCertificateParseTests(SynchronousTestCase):
    def parse(self, upstream: dict):  # type: ignore[no-untyped-def]
        return parseResource(
            {
                "apiVersion": "extensions.kubesphere.io/v1alpha1",
                "kind": "ReverseProxy",
                "metadata": {"name": "m"},
                "spec": {"matcher": {"path": "/m/*", "method": "GET"}, "upstream": upstream},
            }
        )

    def test_files(self) -> None:
        result = self.parse(
            {
                "url": "https://up:8443",
                "clientCertificate": {"certFile": "/c/tls.crt", "keyFile": "/c/tls.key"},
            }
        )
        tls = result.obj.upstream.tls
        self.assertEqual(tls.clientCertificate, ClientCertificate("/c/tls.crt", "/c/tls.key"))
        self.assertIn("+client-", tls.fingerprint)
        other = self.parse(
            {
                "url": "https://up:8443",
                "clientCertificate": {"certFile": "/d/tls.crt", "keyFile": "/c/tls.key"},
            }
        )
        self.assertNotEqual(result.obj.upstream.key, other.obj.upstream.key)

    def test_rejections(self) -> None:
        for cc, field in [
            ({"certFile": "/c/tls.crt"}, "keyFile"),
            ({"certFile": "relative.crt", "keyFile": "/k"}, "certFile"),
            ({"secretRef": {"namespace": "ns", "name": "s"}}, "secretRef"),
            ("a string", "clientCertificate"),
        ]:
            result = self.parse({"url": "https://up:8443", "clientCertificate": cc})
            self.assertIsNone(result.obj, cc)
            self.assertIn(field, result.rejection.field)
