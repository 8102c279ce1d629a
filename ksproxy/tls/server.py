# -*- test-case-name: tests.integration.test_tls -*-
"""
TLS termination: certificates from files, chosen by SNI, reloaded when the files change.

A L{CertificateStore} reads a folder of certificates (or one certificate/key pair) into one OpenSSL context per
certificate and indexes them by the DNS names the certificates themselves name (subjectAltName, else the common
name; wildcards match one label).  L{SNIConnectionCreator} gives each new connection a context that switches to
the right certificate in the SNI callback.  L{CertificateStore.refresh}, run on a timer, rebuilds the index
when a file's modification time, size or inode changes; established connections keep the context they
started with, so a reload never drops a connection.

Choices where the SPEC is silent:
 - Folder layout (any mix): C{NAME.pem} holding the private key and the certificate chain (leaf first), the
   txsni convention; C{NAME.crt} with C{NAME.key}; a sub-folder C{NAME/} with C{tls.crt} and C{tls.key}, which
   is how a Kubernetes TLS Secret is mounted (its C{..data} symlink swap changes the resolved file's inode).
 - The certificate for clients without SNI, or with a name no certificate covers: the one called C{default}
   (C{default.pem}, C{default.crt}/C{.key}, C{default/}), else the one named by the endpoint's C{default=}
   parameter, else the first by file name.
 - A folder that fails to load (a half-written renewal, a key that does not match its certificate) keeps the
   certificates in use and logs the error; the next check tries again.  At start-up the error is raised.
 - TLS 1.2 and newer only; Twisted's default cipher list (ECDHE with AES-GCM or ChaCha20-Poly1305 first, no
   RC4, 3DES, export or anonymous suites); TLS 1.3 suites are OpenSSL's.  ALPN offers C{h2} then
   C{http/1.1} unless told otherwise.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "CertificateError",
    "CertificateSource",
    "CertificateStore",
    "SNIConnectionCreator",
    "DEFAULT_ALPN",
]

log = Logger()

DEFAULT_ALPN: Tuple[bytes, ...] = (b"h2", b"http/1.1")

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class CertificateError(ValueError):
    """A certificate or key file cannot be used."""


@attrs.frozen
class _Pair:
    """One certificate as found on disk: its name and the files it is read from."""

    name: str
    certFile: str
    keyFile: str  # the same as certFile for a combined .pem


@attrs.frozen
class CertificateSource:
    """
    Where certificates come from: a folder (C{certDir}), or one pair (C{certFile} and C{keyFile}).

    @ivar defaultName: the certificate served when SNI names none of them (see the module docstring).
    """

    certDir: Optional[str] = None
    certFile: Optional[str] = None
    keyFile: Optional[str] = None
    defaultName: Optional[str] = None

    def __attrs_post_init__(self) -> None:
        if (self.certDir is None) == (self.certFile is None):
            raise CertificateError("give either a certificate folder or one certificate file")

    def pairs(self) -> List[_Pair]:
        """The certificate files present now, sorted by name."""
        if self.certFile is not None:
            name = os.path.splitext(os.path.basename(self.certFile))[0]
            return [_Pair(name, self.certFile, self.keyFile or self.certFile)]
        assert self.certDir is not None
        found: Dict[str, _Pair] = {}
        try:
            entries = sorted(os.listdir(self.certDir))
        except OSError as e:
            raise CertificateError(
                f"cannot read the certificate folder {self.certDir}: {e.strerror}"
            ) from None
        for entry in entries:
            if entry.startswith("."):
                continue  # Kubernetes' ..data and ..<timestamp> entries, editor files
            path = os.path.join(self.certDir, entry)
            base, ext = os.path.splitext(entry)
            if os.path.isdir(path):
                crt, key = os.path.join(path, "tls.crt"), os.path.join(path, "tls.key")
                if os.path.isfile(crt) and os.path.isfile(key):
                    found.setdefault(entry, _Pair(entry, crt, key))
            elif ext == ".pem":
                found.setdefault(base, _Pair(base, path, path))
            elif ext == ".crt":
                key = os.path.join(self.certDir, base + ".key")
                if os.path.isfile(key):
                    found.setdefault(base, _Pair(base, path, key))
        return [found[name] for name in sorted(found)]

    def signature(self) -> Tuple[Tuple[str, int, int, int], ...]:
        """What changes when any certificate file is replaced, edited, added or removed."""
        sig = []
        for pair in self.pairs():
            for path in {pair.certFile, pair.keyFile}:
                try:
                    st = os.stat(path)
                except OSError:
                    sig.append((path, -1, -1, -1))
                else:
                    sig.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(sorted(sig))


@attrs.frozen
class _Loaded:
    """One certificate ready to serve."""

    name: str
    names: Tuple[str, ...]  # lower-case DNS names (wildcards as "*.example.com")
    key: Any  # a cryptography private key
    chain: Tuple[x509.Certificate, ...]
    context: SSL.Context

    def newContext(self, alpn: Sequence[bytes]) -> SSL.Context:
        return _context(self.key, self.chain, alpn)


def _context(key: Any, chain: Sequence[x509.Certificate], alpn: Sequence[bytes]) -> SSL.Context:
    options = CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=list(chain[1:]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=list(alpn) or None,
    )
    context = options.getContext()
    # Our own ALPN choice, from this listener's list only. Twisted's callback also takes the server factory's
    # protocols (HTTPServerFactory names h2 and http/1.1 for Twisted's own ssl: endpoint), which would bring
    # h2 back where the operator configured alpn=http/1.1; and it answers "no overlap" with an alert.
    preferred = tuple(alpn)

    def select(connection: SSL.Connection, offered: List[bytes]) -> Any:
        for protocol in preferred:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    context.set_alpn_select_callback(select)
    return context


def _readFile(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {path}: {e.strerror}") from None


def _splitCertificates(pem: bytes) -> List[bytes]:
    marker = b"-----END CERTIFICATE-----"
    out = []
    for piece in pem.split(marker)[:-1]:
        start = piece.find(_PEM_CERT)
        if start >= 0:
            out.append(piece[start:] + marker + b"\n")
    return out


def _dnsNames(cert: x509.Certificate) -> Tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(n.lower().rstrip(".") for n in names)


def loadCertificate(pair: _Pair, alpn: Sequence[bytes]) -> _Loaded:
    """Read one certificate (chain) and its key into a server context; raise L{CertificateError} if unusable."""
    certPem = _readFile(pair.certFile)
    keyPem = certPem if pair.keyFile == pair.certFile else _readFile(pair.keyFile)
    pems = _splitCertificates(certPem)
    if not pems:
        raise CertificateError(f"{pair.certFile}: no PEM certificate found")
    try:
        key = load_pem_private_key(keyPem, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"{pair.keyFile}: no usable (unencrypted) PEM private key") from None
    try:
        chain = tuple(x509.load_pem_x509_certificate(c) for c in pems)
    except ValueError:
        raise CertificateError(f"{pair.certFile}: a certificate cannot be parsed") from None
    try:
        context = _context(key, chain, alpn)
    except SSL.Error as e:
        raise CertificateError(f"{pair.certFile}: the key does not match the certificate ({e})") from None
    return _Loaded(pair.name, _dnsNames(chain[0]), key, chain, context)


class CertificateStore:
    """
    The certificates in use, indexed by server name; L{refresh} reloads them when their files change.

    @ivar generation: incremented on every successful (re)load, for tests and logs.
    """

    def __init__(self, source: CertificateSource, alpn: Sequence[bytes] = DEFAULT_ALPN) -> None:
        self.source = source
        self.alpn = tuple(alpn)
        self.generation = 0
        self._signature: Optional[tuple] = None
        self._byName: Dict[str, SSL.Context] = {}
        self._names: Dict[str, str] = {}
        self._default: Optional[_Loaded] = None
        self._root: Optional[SSL.Context] = None
        self.onReload: List[Callable[[CertificateStore], None]] = []
        self.refresh(strict=True)

    @property
    def names(self) -> Dict[str, str]:
        """Server name -> certificate name, for logs and tests."""
        return dict(self._names)

    def contextFor(self, serverName: Optional[bytes]) -> SSL.Context:
        """The context of the certificate for C{serverName} (SNI), or the default one."""
        if serverName:
            name = serverName.decode("ascii", "replace").lower().rstrip(".")
            context = self._byName.get(name)
            if context is None and "." in name:
                context = self._byName.get("*." + name.split(".", 1)[1])
            if context is not None:
                return context
        assert self._default is not None
        return self._default.context

    def rootContext(self) -> SSL.Context:
        """The context new connections start with: the default certificate, and the SNI switch."""
        assert self._root is not None
        return self._root

    def refresh(self, strict: bool = False) -> bool:
        """Reload if any file changed; say whether it did.  With C{strict}, a failure raises."""
        try:
            signature = self.source.signature()
            if signature == self._signature:
                return False
            loaded = [loadCertificate(pair, self.alpn) for pair in self.source.pairs()]
            if not loaded:
                raise CertificateError("no certificate found")
        except CertificateError as e:
            if strict:
                raise
            log.error("TLS certificates not reloaded, still serving the previous ones: {error}", error=str(e))
            return False
        self._install(loaded)
        self._signature = signature
        self.generation += 1
        log.info(
            "TLS certificates loaded (generation {generation}): {names}",
            generation=self.generation,
            names=", ".join(f"{c.name}={'/'.join(c.names) or '-'}" for c in loaded),
        )
        for observer in self.onReload:
            observer(self)
        return True

    def _install(self, loaded: List[_Loaded]) -> None:
        byName: Dict[str, SSL.Context] = {}
        names: Dict[str, str] = {}
        # The first certificate by file name wins a name two certificates claim.
        for cert in loaded:
            for name in cert.names:
                if name not in byName:
                    byName[name] = cert.context
                    names[name] = cert.name
        wanted = [self.source.defaultName] if self.source.defaultName else []
        wanted.append("default")
        default = next((c for w in wanted for c in loaded if c.name == w), loaded[0])
        if self.source.defaultName and default.name != self.source.defaultName:
            log.warn(
                "TLS: default={wanted}: no such certificate; clients without SNI (or with an unknown name) get "
                "{used}",
                wanted=self.source.defaultName,
                used=default.name,
            )
        root = _rootContext(default, self.alpn, self.contextFor)
        # One assignment each, on the reactor thread: a handshake sees either the old set or the new one.
        self._byName, self._names, self._default, self._root = byName, names, default, root


def _rootContext(
    default: _Loaded, alpn: Sequence[bytes], contextFor: Callable[[Optional[bytes]], SSL.Context]
) -> SSL.Context:
    # A context of its own (not the default certificate's), so the SNI callback is set on it alone.
    context = default.newContext(alpn)

    def onServerName(connection: SSL.Connection) -> None:
        chosen = contextFor(connection.get_servername())
        connection.set_context(chosen)

    context.set_tlsext_servername_callback(onServerName)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class SNIConnectionCreator:
    """Each new TLS connection starts on the store's current root context and switches by SNI."""

    def __init__(self, store: CertificateStore) -> None:
        self.store = store

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.store.rootContext(), None)
        connection.set_app_data(tlsProtocol)
        return connection
