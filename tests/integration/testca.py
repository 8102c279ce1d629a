"""
A throwaway certificate authority for TLS tests, built with C{cryptography} (EC P-256 keys: fast to make).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _pemKey(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A CA that issues server and client certificates; C{certPEM} is what clients trust."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "ksproxy test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.certPEM = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        names: Iterable[str] = (),
        cn: Optional[str] = None,
        client: bool = False,
        ips: Iterable[str] = (),
    ) -> Tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for C{names} (DNS SANs); a client certificate when C{client}."""
        names = list(names)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, cn or (names[0] if names else "client"))]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
        )
        sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pemKey(key)

    def writePair(self, folder: str, base: str, names: Iterable[str] = (), **kw) -> Tuple[str, str]:  # type: ignore[no-untyped-def]
        """Write C{base}.crt and C{base}.key into C{folder}; return their paths."""
        cert, key = self.issue(names, **kw)
        certPath, keyPath = os.path.join(folder, base + ".crt"), os.path.join(folder, base + ".key")
        _atomicWrite(certPath, cert)
        _atomicWrite(keyPath, key)
        return certPath, keyPath


def _atomicWrite(path: str, data: bytes) -> None:
    tmp = path + ".tmp~"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def commonName(der: bytes) -> str:
    """The subject CN of a DER certificate (as C{ssl.SSLSocket.getpeercert(True)} returns it)."""
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
