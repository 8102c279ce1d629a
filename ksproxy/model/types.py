"""
Frozen value types for the three custom resources and the objects they refer to.

Everything past L{ksproxy.model.parse} works on these types only: raw dicts never travel further.  They
import neither Twisted nor the kubernetes client, so they are cheap to build and safe to share between the
watcher thread and the reactor.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Dict, Mapping, Optional, Tuple, Union

import attrs

__all__ = [
    "GROUP",
    "VERSION",
    "API_VERSION",
    "KIND_APISERVICE",
    "KIND_REVERSEPROXY",
    "KIND_JSBUNDLE",
    "KINDS",
    "ObjectMeta",
    "TLSSettings",
    "ClientCertificate",
    "Endpoint",
    "HealthCheck",
    "UpstreamTimeouts",
    "Matcher",
    "Template",
    "HeaderRule",
    "RewriteRule",
    "RegexpRule",
    "Directives",
    "APIService",
    "ReverseProxy",
    "RawSource",
    "ConfigMapSource",
    "SecretSource",
    "EndpointSource",
    "BundleSource",
    "Asset",
    "JSBundle",
    "Resource",
    "Rejection",
]

GROUP = "extensions.kubesphere.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND_APISERVICE = "APIService"
KIND_REVERSEPROXY = "ReverseProxy"
KIND_JSBUNDLE = "JSBundle"
KINDS = (KIND_APISERVICE, KIND_REVERSEPROXY, KIND_JSBUNDLE)

# status.state values (SPEC 8).  Anything else is kept verbatim and warned about at parse time.
STATE_AVAILABLE = "Available"
STATE_UNAVAILABLE = "Unavailable"
STATE_DISABLED = "Disabled"


@attrs.frozen
class ObjectMeta:
    """The parts of C{metadata} that ksproxy uses."""

    name: str
    uid: str = ""
    generation: int = 0
    resourceVersion: str = ""
    # RFC 3339 as written by the API server; sorts correctly as a string.  Missing sorts last ("~").
    creationTimestamp: str = ""
    labels: Mapping[str, str] = attrs.field(factory=dict, eq=False, hash=False)


@attrs.frozen(cache_hash=True)  # hashed per request (pool and health keys)
class TLSSettings:
    """
    How to talk TLS to an upstream.  Part of the upstream's identity: a change here is a new upstream (new pool,
    new checker), which is how a changed caBundle takes effect without a restart.
    """

    # Parsed and validated PEM bytes of one or more CA certificates, or None for the system trust store.
    caBundle: Optional[bytes] = None
    insecureSkipVerify: bool = False
    # mTLS: the certificate ksproxy presents to the upstream (an extension field, see ClientCertificate).
    clientCertificate: Optional[ClientCertificate] = None

    @property
    def fingerprint(self) -> str:
        """Short stable identifier for logs and metric labels."""
        if self.insecureSkipVerify:
            base = "insecure"
        elif self.caBundle is None:
            base = "system"
        else:
            base = "ca-" + hashlib.sha256(self.caBundle).hexdigest()[:12]
        if self.clientCertificate is not None:
            base += "+client-" + hashlib.sha256(repr(self.clientCertificate).encode()).hexdigest()[:8]
        return base


@attrs.frozen
class ClientCertificate:
    """
    A client certificate for upstream mTLS (extension field C{clientCertificate: {certFile, keyFile}} of an
    Endpoint).  The files are PEM (the certificate file may hold the chain after the leaf) and are read when
    connections are made, so rotated files take effect without a restart.
    """

    certFile: str
    keyFile: str


# Distinct TLS settings get distinct numbers for Endpoint.key (settings equal in value share one).  Grows with
# every distinct setting seen in this process (a caBundle rotation adds one): a few bytes each.
_TLS_IDENTITIES: Dict[TLSSettings, int] = {}
_PLAIN = TLSSettings()
_nextTLSIdentity = itertools.count(1)


def _tlsIdentity(tls: TLSSettings) -> int:
    if tls == _PLAIN:
        return 0
    # setdefault and next() are each atomic: parsing runs in several threads.
    return _TLS_IDENTITIES.setdefault(tls, next(_nextTLSIdentity))


@attrs.frozen(cache_hash=True)  # hashed per request (pool and health keys)
class Endpoint:
    """
    Where an upstream lives (SPEC 1.1), after C{url}/C{service} have been resolved.

    C{path} is the path part of C{url} or C{service.path} ("" when none); APIService and ReverseProxy do not
    use it unless asked (see L{ReverseProxy.upstreamPathPrefix}); JSBundle URL sources and health checks do.
    """

    scheme: str  # "http" or "https"
    host: str  # as written; IPv6 literals without brackets
    port: int
    path: str = ""
    tls: TLSSettings = TLSSettings()

    # The identity used to share connection pools and health checkers: scheme, host, port and TLS settings, as
    # one string (its hash is computed once by Python; a tuple holding TLSSettings would call attrs' __hash__
    # every time, and the key is looked up several times per request).
    key: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.scheme}://{self.host}:{self.port}#{_tlsIdentity(self.tls)}")

    @property
    def hostport(self) -> str:
        """The authority to send as C{Host}: the port is left out when it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.hostport}"


@attrs.frozen
class HealthCheck:
    """SPEC 4.4.  C{target} is a path (starting with "/") or an absolute URL."""

    target: str = "/"
    interval: float = 10.0
    timeout: float = 5.0
    status: int = 200
    rise: int = 1
    fall: int = 3


@attrs.frozen
class UpstreamTimeouts:
    """Per-upstream overrides of the gateway's timeouts, in seconds (None: the gateway's default)."""

    connect: Optional[float] = None
    responseHeader: Optional[float] = None
    idle: Optional[float] = None
    tunnelIdle: Optional[float] = None


@attrs.frozen
class Matcher:
    """One path/method matcher, as written (the pattern is compiled by L{ksproxy.paths})."""

    path: str
    method: str = "*"  # upper-case, or "*"


@attrs.frozen
class Template:
    """
    A string with placeholders (SPEC 4.3), split once at load time.  C{parts} alternates literal text
    (str) and placeholder names (a 1-tuple holding the name, e.g. ("http.request.header.x-a",)).  Rendering
    lives in L{ksproxy.directives}.
    """

    source: str
    parts: Tuple[Union[str, Tuple[str]], ...]

    @property
    def is_literal(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)


@attrs.frozen
class HeaderRule:
    """SPEC 4.2.  C{name} is lower-case ASCII; for "delete_prefix" it is the prefix without the "*"."""

    op: str  # "set" | "add" | "delete" | "delete_prefix"
    name: str
    value: Optional[Template] = None
    source: str = ""


@attrs.frozen
class RewriteRule:
    """SPEC 4.3: C{pattern} is a matcher-style path pattern; C{target} the path template; C{query} the query
    template when the target had a "?", else None (keep the original query)."""

    pattern: str
    target: Template
    query: Optional[Template]
    source: str = ""


@attrs.frozen
class RegexpRule:
    """SPEC 4.1 pathRegexp: Python C{re} pattern (compiled at load time) and its replacement, already turned
    from Go's C{$1}/C{${1}} into Python's C{\\g<1>}."""

    pattern: object  # re.Pattern[str]; typed loosely so attrs can hash it
    replacement: str
    source: str = ""


@attrs.frozen
class Directives:
    """SPEC 4.1, both shapes normalised.  Empty tuples / None mean "not set"."""

    method: Optional[str] = None
    stripPathPrefix: Optional[str] = None
    stripPathSuffix: Optional[str] = None
    headerUp: Tuple[HeaderRule, ...] = ()
    headerDown: Tuple[HeaderRule, ...] = ()
    rewrite: Tuple[RewriteRule, ...] = ()
    replace: Tuple[Tuple[str, str], ...] = ()
    pathRegexp: Tuple[RegexpRule, ...] = ()
    authProxy: bool = False
    # Derived: whether any directive reads or changes the request or the response (the forwarder skips building
    # a request view when none does).
    active: bool = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        active = bool(
            self.method
            or self.stripPathPrefix
            or self.stripPathSuffix
            or self.headerUp
            or self.headerDown
            or self.rewrite
            or self.replace
            or self.pathRegexp
        )
        object.__setattr__(self, "active", active)


@attrs.frozen
class APIService:
    meta: ObjectMeta
    group: str
    version: str
    endpoint: Endpoint
    nonResourceURLs: Tuple[str, ...] = ()
    healthCheck: Optional[HealthCheck] = None
    state: Optional[str] = None  # status.state as written (status.enabled: false -> "Disabled")
    timeouts: Optional[UpstreamTimeouts] = None  # spec.timeouts

    kind = KIND_APISERVICE


@attrs.frozen
class ReverseProxy:
    meta: ObjectMeta
    matchers: Tuple[Matcher, ...]
    upstream: Endpoint
    directives: Directives = Directives()
    healthCheck: Optional[HealthCheck] = None
    # When true, the endpoint's path (URL path or service.path) is put in front of the forwarded path
    # (field spec.upstream.prependPath, our extension: SPEC 1.1 asks for an explicit switch).
    upstreamPathPrefix: bool = False
    state: Optional[str] = None
    timeouts: Optional[UpstreamTimeouts] = None  # spec.upstream.timeouts

    kind = KIND_REVERSEPROXY


@attrs.frozen
class RawSource:
    data: bytes


@attrs.frozen
class ConfigMapSource:
    namespace: str
    name: str
    key: str


@attrs.frozen
class SecretSource:
    namespace: str
    name: str
    key: str


@attrs.frozen
class EndpointSource:
    endpoint: Endpoint


BundleSource = Union[RawSource, ConfigMapSource, SecretSource, EndpointSource]


@attrs.frozen
class Asset:
    """An extra file of a bundle (SPEC 1.4 C{assets}): served at C{link}."""

    link: str
    source: BundleSource
    mimeType: Optional[str] = None


@attrs.frozen
class JSBundle:
    meta: ObjectMeta
    source: BundleSource
    link: str  # the effective link: status.link, or the defaulted /dist/<extension>/<file>
    linkDefaulted: bool  # True when the manifest had no status.link (the status writer fills it in)
    assets: Tuple[Asset, ...] = ()
    state: Optional[str] = None

    kind = KIND_JSBUNDLE


Resource = Union[APIService, ReverseProxy, JSBundle]


@attrs.frozen
class Rejection:
    """Why an object was not accepted: names kind, name and the field path (SPEC 1.5)."""

    kind: str
    name: str
    field: str  # e.g. "spec.upstream.caBundle"; "" for the whole object
    message: str

    def __str__(self) -> str:
        where = f"{self.kind}/{self.name or '<unnamed>'}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
