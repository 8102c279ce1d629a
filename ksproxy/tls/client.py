# -*- test-case-name: tests.integration.test_tls -*-
"""
Upstream TLS with a client certificate (mTLS), for Endpoints with C{clientCertificate: {certFile, keyFile}}.

The upstream pool builds one connection creator per upstream identity and keeps it; the certificate files are
checked again (modification time, size, inode) at most every C{recheck} seconds when a connection is made, so a
rotated certificate is used from the next connection on without a restart.  A file that cannot be read makes
the connection fail (the forwarder answers 502 and says why); the resource itself stays accepted, because the
files belong to the pod, not to the manifest.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Dict, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from zope.interface import implementer

from ..model.types import ClientCertificate, TLSSettings
from .server import CertificateError, _readFile, _splitCertificates

__all__ = ["ClientCertificateCreator", "upstreamTLSCreator"]


def _fileSignature(paths: Tuple[str, ...]) -> Tuple[Tuple[int, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((-1, -1, -1))
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without verifying the upstream (C{insecureSkipVerify: true}), still sending SNI and our certificate."""

    def __init__(self, hostname: str, options: CertificateOptions) -> None:
        self._hostname = None if _isIP(hostname) else hostname.encode("idna")
        self._context = options.getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._hostname:
            connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection


def _loadClientCertificate(client: ClientCertificate) -> Dict[str, Any]:
    """The key, certificate and chain as C{CertificateOptions} keyword arguments."""
    pems = _splitCertificates(_readFile(client.certFile))
    if not pems:
        raise CertificateError(f"{client.certFile}: no PEM certificate found")
    keyPem = _readFile(client.keyFile)
    try:
        key = load_pem_private_key(keyPem, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"{client.keyFile}: no usable (unencrypted) PEM private key") from None
    try:
        chain = [x509.load_pem_x509_certificate(p) for p in pems]
    except ValueError:
        raise CertificateError(f"{client.certFile}: a certificate cannot be parsed") from None
    return {"privateKey": key, "certificate": chain[0], "extraCertChain": chain[1:]}


def _buildCreator(host: str, tls: TLSSettings) -> IOpenSSLClientConnectionCreator:
    assert tls.clientCertificate is not None
    material = _loadClientCertificate(tls.clientCertificate)
    if tls.insecureSkipVerify:
        return _Unverified(host, CertificateOptions(verify=False, **material))
    trustRoot = None
    if tls.caBundle is not None:
        trustRoot = trustRootFromCertificates(
            [Certificate.loadPEM(p) for p in _splitCertificates(tls.caBundle)]
        )
    try:
        # Builds the context now (so a key that does not match its certificate shows here, once).
        return optionsForClientTLS(host, trustRoot=trustRoot, extraCertificateOptions=material)
    except SSL.Error as e:
        raise CertificateError(f"client certificate {tls.clientCertificate.certFile}: {e}") from None


@implementer(IOpenSSLClientConnectionCreator)
class ClientCertificateCreator:
    """The connection creator for one upstream with a client certificate; re-reads changed files."""

    def __init__(self, host: str, tls: TLSSettings, clock: Any = None, recheck: float = 10.0) -> None:
        if tls.clientCertificate is None:
            raise ValueError("no client certificate in these TLS settings")
        self.host = host
        self.tls = tls
        self.clock = clock
        self.recheck = recheck
        self._paths = (tls.clientCertificate.certFile, tls.clientCertificate.keyFile)
        self._signature: Optional[tuple] = None
        self._checkedAt: Optional[float] = None
        self._inner: Optional[IOpenSSLClientConnectionCreator] = None

    def _current(self) -> IOpenSSLClientConnectionCreator:
        now = self.clock.seconds() if self.clock is not None else None
        due = (
            self._inner is None
            or now is None
            or self._checkedAt is None
            or now - self._checkedAt >= self.recheck
        )
        if due:
            self._checkedAt = now
            signature = _fileSignature(self._paths)
            if self._inner is None or signature != self._signature:
                # Raises CertificateError when the files are unusable: this connection attempt fails with it.
                self._inner = _buildCreator(self.host, self.tls)
                self._signature = signature
        assert self._inner is not None
        return self._inner

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self._current().clientConnectionForTLS(tlsProtocol)


def upstreamTLSCreator(
    host: str, tls: TLSSettings, clock: Any = None
) -> Optional[IOpenSSLClientConnectionCreator]:
    """A creator for C{tls} when it carries a client certificate, else None (the pool's own creator applies)."""
    if tls.clientCertificate is None:
        return None
    return ClientCertificateCreator(host, tls, clock)
