# -*- test-case-name: tests.unit.test_parse,tests.unit.test_examples_real -*-
"""
The only way into the model: a raw Kubernetes object (a dict from YAML, JSON or the API) becomes a frozen
L{ksproxy.model.types} resource, a L{Rejection} that names kind, name and field path, or a "skipped" reason
when the object is not ours to serve (SPEC 1, 4.2-4.4 validation, 8 status.state).

Everything that can be checked without the network is checked here, once, when the object is read: a CA
bundle that does not load, a matcher pattern or a header rule that does not compile, is a rejection now and
never a failure at request time.

Choices where the SPEC is silent (also listed in the module's tests):
  - an explicit null is the same as an absent field (the API server prunes nulls), and so is an empty
    string for optional strings (Helm renders C{caBundle: ""}, C{raw: ""});
  - C{status.enabled: false} means C{Disabled}; when C{status.state} says otherwise, C{Disabled} wins (a
    warning says so): turning something off must not be undone by a stale state;
  - a health check's C{timeout} longer than its C{interval} is capped to the interval, with a warning;
  - a URL path on an APIService upstream, or on a ReverseProxy upstream without C{prependPath: true}, is not
    used: a warning says so; a query string is kept only on JSBundle sources (it is part of what is fetched);
  - TLS settings on a plain-http endpoint are dropped with a warning;
  - all JSBundle sources that are set are validated, not only the one used;
  - unknown fields are debug notes, except a key that an enclosing mapping understands (a repeated or
    mis-indented key such as C{spec.rawFrom.rawFrom}): that one is a warning, since the author believes it
    has an effect.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar
from urllib.parse import urlsplit

import attrs

from ksproxy import paths as _paths
from ksproxy.model._fields import (
    Cache,
    Context,
    Fields,
    Invalid,
    Memo,
    checkDNSLabel,
    checkDNSSubdomain,
    isDNSSubdomain,
    isToken,
    parseDuration,
    timestamp,
    typeName,
)
from ksproxy.model._pem import decodeBase64Pem, pemFromBase64, scriptFromBase64
from ksproxy.model.types import (
    API_VERSION,
    GROUP,
    KIND_APISERVICE,
    KIND_JSBUNDLE,
    KIND_REVERSEPROXY,
    KINDS,
    STATE_AVAILABLE,
    STATE_DISABLED,
    STATE_UNAVAILABLE,
    APIService,
    Asset,
    BundleSource,
    ClientCertificate,
    ConfigMapSource,
    Directives,
    Endpoint,
    EndpointSource,
    HealthCheck,
    JSBundle,
    Matcher,
    ObjectMeta,
    RawSource,
    Rejection,
    Resource,
    ReverseProxy,
    SecretSource,
    TLSSettings,
    UpstreamTimeouts,
)

__all__ = ["ParseResult", "parseResource", "parseDuration", "decodeBase64Pem", "LABEL_EXTENSION_REF"]

LABEL_EXTENSION_REF = "kubesphere.io/extension-ref"
LABEL_PROXY_TARGET = "kubesphere.io/reverse-proxy-target"

_KNOWN_STATES = (STATE_AVAILABLE, STATE_UNAVAILABLE, STATE_DISABLED)

_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
_META_KEYS = ("name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp", "labels")
# Ordinary ObjectMeta that ksproxy has no use for: not even worth a debug note.
_META_OTHER = (
    "annotations",
    "generateName",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
)
_STATUS_KEYS = ("state", "enabled")
_STATUS_IGNORED = ("conditions", "observedGeneration")
_ENDPOINT_KEYS = ("url", "service", "caBundle", "insecureSkipVerify", "insecureSkipTLSVerify", "clientCertificate")
_CLIENT_CERT_KEYS = ("certFile", "keyFile", "secretRef")
_SERVICE_KEYS = ("namespace", "name", "port", "path", "scheme")
_HEALTH_KEYS = ("url", "interval", "timeout", "status", "rise", "fall")
_TIMEOUT_KEYS = ("connect", "responseHeader", "idle", "tunnelIdle")
_APISERVICE_KEYS = ("group", "version", "nonResourceURLs", "endpoint", "healthCheck", "timeouts") + _ENDPOINT_KEYS
_PROXY_KEYS = ("matcher", "upstream", "directives", "rewrite", "header", "healthCheck")
_PROXY_IGNORED = ("enabled",)  # an early 4.x ReverseProxySpec field
_UPSTREAM_KEYS = _ENDPOINT_KEYS + ("backend", "caBudle", "healthCheck", "prependPath", "timeouts")
_DIRECTIVE_KEYS = (
    "method",
    "stripPathPrefix",
    "stripPathSuffix",
    "headerUp",
    "headerDown",
    "rewrite",
    "replace",
    "uriSubstring",
    "pathRegexp",
    "authProxy",
)
# KubeSphere transport knobs that have no meaning in ksproxy (it always behaves as a plain reverse proxy).
_DIRECTIVE_IGNORED = ("wrapTransport", "rejectForwardingRedirects", "changeOrigin", "interceptRedirects")
_BUNDLE_KEYS = ("raw", "rawFrom", "filenameOverride", "assets")
_RAWFROM_KEYS = _ENDPOINT_KEYS + ("configMapKeyRef", "secretKeyRef")
_KEYREF_KEYS = ("name", "key", "namespace")
_KEYREF_IGNORED = ("optional",)

# The same key sets as frozensets, built once (every Fields view checks its keys against them).
_F_TOP = frozenset(_TOP_KEYS)
_F_META = frozenset(_META_KEYS + _META_OTHER)
_F_STATUS = frozenset(_STATUS_KEYS)
_F_STATUS_BUNDLE = frozenset(_STATUS_KEYS + ("link",))
_F_STATUS_IGNORED = frozenset(_STATUS_IGNORED)
_F_CLIENT_CERT = frozenset(_CLIENT_CERT_KEYS)
_F_SERVICE = frozenset(_SERVICE_KEYS)
_F_HEALTH = frozenset(_HEALTH_KEYS)
_F_TIMEOUT = frozenset(_TIMEOUT_KEYS)
_F_APISERVICE = frozenset(_APISERVICE_KEYS)
_F_PROXY = frozenset(_PROXY_KEYS)
_F_PROXY_IGNORED = frozenset(_PROXY_IGNORED)
_F_UPSTREAM = frozenset(_UPSTREAM_KEYS)
_F_MATCHER = frozenset(("path", "method"))
_F_HEADER = frozenset(("up", "down"))
_F_DIRECTIVE = frozenset(_DIRECTIVE_KEYS)
_F_DIRECTIVE_IGNORED = frozenset(_DIRECTIVE_IGNORED)
_F_BUNDLE = frozenset(_BUNDLE_KEYS)
_F_RAWFROM = frozenset(_RAWFROM_KEYS)
_F_KEYREF = frozenset(_KEYREF_KEYS)
_F_KEYREF_IGNORED = frozenset(_KEYREF_IGNORED)
_F_ASSETS = frozenset(("style", "files"))
_F_STYLE = frozenset(("link", "mimeType") + _ENDPOINT_KEYS)
_F_FILE = frozenset(("name", "link", "mimeType") + _ENDPOINT_KEYS)
_F_NONE: frozenset = frozenset()

_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_MIME = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*(\s*;.*)?")
_UNSAFE_IN_PATH = re.compile(r"[\s\x00-\x1f\x7f?#]")

_T = TypeVar("_T")


def _isMapping(value: Any) -> bool:
    return value.__class__ is dict or isinstance(value, Mapping)


@attrs.frozen
class ParseResult:
    """
    The outcome of L{parseResource}.  Exactly one of C{obj}, C{rejection}, C{skipped} is set.

    @ivar warnings: human-readable, each naming kind/name and field; report them (log at warning level).
    @ivar notes: debug-level information (unknown fields, accepted-and-ignored fields, double encodings);
        log them at debug level.  The model package does no logging of its own.
    """

    obj: Optional[Resource]
    rejection: Optional[Rejection]
    warnings: Tuple[str, ...]
    skipped: Optional[str] = None
    kind: str = ""
    name: str = ""
    notes: Tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.obj is not None


def parseResource(raw: Mapping[str, Any]) -> ParseResult:
    """
    Turn one raw object into a model, a rejection, or a skip.  Never raises, whatever C{raw} holds.
    """
    ctx = Context()
    try:
        obj, skipped = _parse(ctx, raw)
    except Invalid as e:
        return _result(ctx, rejection=Rejection(ctx.kind, ctx.name, e.field, e.message))
    except Exception as e:  # noqa: BLE001 - a surprise in the input must never escape as an exception
        message = f"could not be parsed (internal parser error {type(e).__name__}: {e})"
        return _result(ctx, rejection=Rejection(ctx.kind, ctx.name, "", message))
    return _result(ctx, obj=obj, skipped=skipped)


def _result(
    ctx: Context,
    *,
    obj: Optional[Resource] = None,
    rejection: Optional[Rejection] = None,
    skipped: Optional[str] = None,
) -> ParseResult:
    return ParseResult(
        obj=obj,
        rejection=rejection,
        warnings=tuple(ctx.warnings),
        skipped=skipped,
        kind=ctx.kind,
        name=ctx.name,
        notes=tuple(ctx.notes),
    )


def _parse(ctx: Context, raw: Any) -> Tuple[Optional[Resource], Optional[str]]:
    if not _isMapping(raw):
        raise Invalid("", f"a resource must be an object, not {typeName(raw)}")
    kind = raw.get("kind")
    if isinstance(kind, str):
        ctx.kind = kind
    rawMeta = raw.get("metadata")
    if _isMapping(rawMeta) and isinstance(rawMeta.get("name"), str):
        ctx.name = rawMeta["name"]
    if kind is None or kind == "":
        raise Invalid("kind", "required field is missing")
    if not isinstance(kind, str):
        raise Invalid("kind", f"must be a string, not {typeName(kind)}")
    apiVersion = raw.get("apiVersion")
    if apiVersion is None or apiVersion == "":
        raise Invalid("apiVersion", "required field is missing")
    if not isinstance(apiVersion, str):
        raise Invalid("apiVersion", f"must be a string, not {typeName(apiVersion)}")
    if apiVersion != API_VERSION:
        if apiVersion.rpartition("/")[0] == GROUP:
            return None, f"apiVersion {apiVersion} is not served by ksproxy (it serves {API_VERSION})"
        return None, (
            f"apiVersion {apiVersion} is not {API_VERSION}: {kind} of another API group is not served by ksproxy"
        )
    if kind not in KINDS:
        return None, f"kind {kind} is not served by ksproxy"

    if kind == KIND_REVERSEPROXY and raw.__class__ is dict:
        proxy = _plainReverseProxy(ctx, raw, rawMeta)
        if proxy is not None:
            return proxy, None
    top = Fields(ctx, raw, "", _F_TOP)
    if kind == KIND_REVERSEPROXY and _proxyTargetsConsole(rawMeta):
        return (
            None,
            f"label {LABEL_PROXY_TARGET}: ks-console: served by the KubeSphere console, not by ksproxy",
        )
    meta = _metadata(ctx, top)
    state, link = _status(ctx, top, kind)
    if kind == KIND_APISERVICE:
        return _apiService(ctx, top, meta, state), None
    if kind == KIND_REVERSEPROXY:
        return _reverseProxy(ctx, top, meta, state), None
    return _jsBundle(ctx, top, meta, state, link), None


def _proxyTargetsConsole(rawMeta: Any) -> bool:
    if not _isMapping(rawMeta):
        return False
    labels = rawMeta.get("labels")
    return _isMapping(labels) and labels.get(LABEL_PROXY_TARGET) == "ks-console"


# -- metadata and status ------------------------------------------------------------------------------------


_METADATA = Memo()


_F_META_OTHER = frozenset(_META_OTHER)


def _metadata(ctx: Context, top: Fields) -> ObjectMeta:
    """C{metadata}, memoized by what it reads (values of the ignored ObjectMeta fields are never read)."""
    value = top.data.get("metadata")
    if value.__class__ is not dict:
        return _readMetadata(ctx, top)
    meta = _plainMetadata(value)
    if meta is not None:
        return meta
    shape = [(k, None if k in _META_OTHER else v) for k, v in value.items()]
    return _METADATA.get(ctx, (ctx.kind, repr(shape)), lambda recorder: _readMetadata(recorder, top.rebind(recorder)))


# Metadata that is only a name (as in files), by that name.
_PLAIN_METADATA = Cache()


def _plainMetadata(value: Dict[Any, Any]) -> Optional[ObjectMeta]:
    """
    The common shape of C{metadata} read directly (no views, no memo key), or C{None} for anything that may
    warn, note or be refused: then L{_readMetadata} reads it (and says why).  Most metadata differ per object
    (name, uid, resourceVersion), so the memo would miss anyway.
    """
    name = value.get("name")
    if name.__class__ is not str or not name:
        return None
    if len(value) == 1:
        meta = _PLAIN_METADATA.get(name)
        if meta is None:
            meta = _plainMetadataOf(name, value)
            if meta is not None:
                _PLAIN_METADATA.put(name, meta)
        return meta
    return _plainMetadataOf(name, value)


def _plainMetadataOf(name: str, value: Dict[Any, Any]) -> Optional[ObjectMeta]:
    uid = resourceVersion = creationTimestamp = ""
    generation = 0
    labels: Dict[str, str] = {}
    for key, item in value.items():
        if key == "name" or key in _F_META_OTHER:
            continue
        cls = item.__class__
        if cls is str:
            if key == "uid":
                uid = item
            elif key == "resourceVersion":
                resourceVersion = item
            elif key == "creationTimestamp":
                creationTimestamp = item
            elif key != "namespace" or item:
                return None
        elif key == "labels" and cls is dict:
            for labelKey, labelValue in item.items():
                if labelKey.__class__ is not str or labelValue.__class__ is not str:
                    return None
            labels = dict(item)
        elif key == "generation" and cls is int and item >= 0:
            generation = item
        else:
            return None
    if not isDNSSubdomain(name):
        return None
    return ObjectMeta(
        name=name,
        uid=uid,
        generation=generation,
        resourceVersion=resourceVersion,
        creationTimestamp=creationTimestamp,
        labels=labels,
    )


def _readMetadata(ctx: Context, top: Fields) -> ObjectMeta:
    m = top.mapping("metadata", _F_META, required=True)
    assert m is not None
    name = m.string("name", required=True)
    assert name is not None
    checkDNSSubdomain(m.at("name"), name, "a valid object name (a DNS subdomain)")
    namespace = m.get("namespace")
    if namespace is not None:
        if not isinstance(namespace, str):
            raise Invalid(m.at("namespace"), f"must be a string, not {typeName(namespace)}")
        if namespace:
            ctx.warn(m.at("namespace"), f"{ctx.kind} is cluster-scoped; namespace {namespace!r} is ignored")
    labels = m.get("labels")
    if labels is None:
        labels = {}
    if not _isMapping(labels):
        raise Invalid(m.at("labels"), f"must be an object of strings, not {typeName(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise Invalid(
                f"{m.at('labels')}.{key}", f"label keys and values must be strings, not {typeName(value)}"
            )
    return ObjectMeta(
        name=name,
        uid=m.string("uid") or "",
        generation=m.integer("generation", low=0) or 0,
        resourceVersion=m.string("resourceVersion") or "",
        creationTimestamp=timestamp(m.get("creationTimestamp"), m.at("creationTimestamp")),
        labels=dict(labels),
    )


def _status(ctx: Context, top: Fields, kind: str) -> Tuple[Optional[str], Optional[str]]:
    """C{status.state} (with the legacy C{enabled}) and, for a JSBundle, C{status.link}."""
    keys = _F_STATUS_BUNDLE if kind == KIND_JSBUNDLE else _F_STATUS
    status = top.mapping("status", keys, _F_STATUS_IGNORED)
    if status is None:
        return None, None
    state = status.string("state") or None
    if state is not None and state not in _KNOWN_STATES:
        if state == "Enabled":
            hint = "; 'Enabled' is an older spelling: KubeSphere 4.x serves only 'Available'"
        else:
            close = difflib.get_close_matches(state, _KNOWN_STATES, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        ctx.warn(
            status.at("state"),
            f"unknown state {state!r} (known: {', '.join(_KNOWN_STATES)}){hint}; kept as written",
        )
    enabled = status.boolean("enabled")
    if enabled is False:
        if state is None:
            state = STATE_DISABLED
        elif state != STATE_DISABLED:
            ctx.warn(
                status.at("enabled"),
                f"false contradicts {status.at('state')}: {state!r}; the object is treated as Disabled",
            )
            state = STATE_DISABLED
    link = status.string("link") if kind == KIND_JSBUNDLE else None
    return state, link or None


# -- endpoints ----------------------------------------------------------------------------------------------


def _oneOf(
    f: Fields, keys: Tuple[str, ...], read: Callable[[Fields, str], Optional[_T]]
) -> Tuple[str, Optional[_T]]:
    """Read a field that has several spellings; two spellings set at once is an error."""
    found = [(key, read(f, key)) for key in keys]
    found = [(key, value) for key, value in found if value is not None]
    if len(found) > 1:
        names = " and ".join(f.at(key) for key, _ in found)
        raise Invalid(f.at(found[1][0]), f"{names} are spellings of the same field; set only one")
    return found[0] if found else (keys[0], None)


def _readString(f: Fields, key: str) -> Optional[str]:
    value = f.string(key)
    if value == "":
        f.ctx.note(f.at(key), "empty, treated as not set")
        return None
    return value


def _readBool(f: Fields, key: str) -> Optional[bool]:
    return f.boolean(key)


def _readBundle(f: Fields, key: str) -> Any:
    value = f.get(key)
    if value is None or value == "" or value == b"":
        return None
    if not isinstance(value, (str, bytes, bytearray)):
        raise Invalid(f.at(key), f"must be a base64 string (Kubernetes format: byte), not {typeName(value)}")
    return value


# Many objects name the same upstream: its parse (URL split, CA bundle load) is done once per distinct input.
_ENDPOINTS = Memo()


def _endpoint(
    ctx: Context,
    f: Fields,
    *,
    urlAliases: Tuple[str, ...] = (),
    caAliases: Tuple[str, ...] = (),
    required: bool = True,
    keepQuery: bool = False,
) -> Optional[Endpoint]:
    """SPEC 1.1: the Endpoint fields written inline in the mapping C{f} (memoized, see L{_ENDPOINTS})."""
    # Everything the parse reads: the mapping (its repr tells 1 from "1" and True), where it is (field paths
    # in messages), and the key sets up the chain (unknown keys of nested mappings are judged against them).
    key = (ctx.kind, f.identity(), urlAliases, caAliases, required, keepQuery, repr(f.data))
    return _ENDPOINTS.get(
        ctx,
        key,
        lambda recorder: _readEndpoint(
            recorder,
            f.rebind(recorder),
            urlAliases=urlAliases,
            caAliases=caAliases,
            required=required,
            keepQuery=keepQuery,
        ),
    )


def _readEndpoint(
    ctx: Context,
    f: Fields,
    *,
    urlAliases: Tuple[str, ...],
    caAliases: Tuple[str, ...],
    required: bool,
    keepQuery: bool,
) -> Optional[Endpoint]:
    urlKey, url = _oneOf(f, ("url",) + urlAliases, _readString)
    hasService = f.has("service")
    if url is not None and hasService:
        raise Invalid(
            f.path,
            f"both {f.at(urlKey)} and {f.at('service')} are set; set exactly one"
            " (KubeSphere would silently use the url)",
        )
    tls = _tls(f, caAliases)
    if url is None and not hasService:
        if required:
            raise Invalid(f.path or "spec", f"one of {f.at('url')} or {f.at('service')} is required")
        if tls != TLSSettings():
            ctx.warn(f.path, "TLS settings have no effect without url or service")
        return None
    if url is not None:
        scheme, host, port, path = _parseURL(ctx, f.at(urlKey), url, keepQuery=keepQuery)
    else:
        scheme, host, port, path = _service(f)
    if scheme == "http" and tls != TLSSettings():
        ctx.warn(f.path, "caBundle/insecureSkipVerify have no effect on a plain http:// endpoint; ignored")
        tls = TLSSettings()
    return Endpoint(scheme=scheme, host=host, port=port, path=path, tls=tls)


def _tls(f: Fields, caAliases: Tuple[str, ...]) -> TLSSettings:
    caKey, ca = _oneOf(f, ("caBundle",) + caAliases, _readBundle)
    insecureKey, insecure = f.at("insecureSkipVerify"), f.boolean("insecureSkipVerify")
    legacy = f.boolean("insecureSkipTLSVerify")
    if legacy is not None:
        if insecure is not None and insecure != legacy:
            raise Invalid(
                f.at("insecureSkipTLSVerify"),
                f"contradicts {insecureKey} (the same field under its design-document name)",
            )
        insecureKey, insecure = f.at("insecureSkipTLSVerify"), legacy
    client = _clientCertificate(f)
    if ca is None:
        return TLSSettings(insecureSkipVerify=bool(insecure), clientCertificate=client)
    if insecure:
        raise Invalid(
            f.at(caKey),
            f"set together with {insecureKey}: true; choose one (verify with the CA bundle, or do not verify)",
        )
    try:
        pem = pemFromBase64(ca)
    except ValueError as e:
        raise Invalid(f.at(caKey), f"not a usable CA bundle: {e}") from None
    return TLSSettings(caBundle=pem, clientCertificate=client)


def _clientCertificate(f: Fields) -> Optional[ClientCertificate]:
    """Extension: C{clientCertificate: {certFile, keyFile}}, the certificate ksproxy presents upstream (mTLS)."""
    c = f.mapping("clientCertificate", _F_CLIENT_CERT)
    if c is None:
        return None
    if c.has("secretRef"):
        raise Invalid(
            c.at("secretRef"),
            "client certificates from Secrets are not supported yet; mount the Secret into the ksproxy pod"
            " and set certFile and keyFile to its tls.crt and tls.key",
        )
    certFile = c.string("certFile", required=True)
    keyFile = c.string("keyFile", required=True)
    assert certFile is not None and keyFile is not None
    for key, value in (("certFile", certFile), ("keyFile", keyFile)):
        if not value.startswith("/") or "\0" in value:
            raise Invalid(c.at(key), f"{value!r} must be an absolute file path")
    return ClientCertificate(certFile=certFile, keyFile=keyFile)


def _parseURL(ctx: Context, field: str, value: str, *, keepQuery: bool) -> Tuple[str, str, int, str]:
    if _UNSAFE_IN_PATH.search(value.replace("?", "").replace("#", "")):
        raise Invalid(field, f"{value!r} must not contain whitespace or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise Invalid(field, f"{value!r} is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        hint = " (missing 'http://' or 'https://'?)" if "://" not in value else ""
        raise Invalid(field, f"{value!r}: the scheme must be http or https{hint}")
    if parts.username is not None or parts.password is not None:
        raise Invalid(field, "user credentials in the URL are not supported")
    host = parts.hostname or ""
    if not host:
        raise Invalid(field, f"{value!r} has no host")
    _checkHost(field, host)
    if port is None:
        port = 443 if scheme == "https" else 80
    elif port == 0:
        raise Invalid(field, f"{value!r}: port 0 is not a valid port")
    path = parts.path
    if parts.query:
        if keepQuery:
            path = f"{path or '/'}?{parts.query}"
        else:
            ctx.warn(field, f"the query string {parts.query!r} is not used; ignored")
    if parts.fragment:
        ctx.warn(field, f"the fragment {parts.fragment!r} is never sent; ignored")
    return scheme, host, port, path


def _checkHost(field: str, host: str) -> None:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(field, f"{host!r} is not a valid IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise Invalid(field, f"{host!r} is not a valid host name")


def _service(f: Fields) -> Tuple[str, str, int, str]:
    s = f.mapping("service", _F_SERVICE, required=True)
    assert s is not None
    namespace = s.string("namespace", required=True)
    name = s.string("name", required=True)
    assert namespace is not None and name is not None
    checkDNSLabel(s.at("namespace"), namespace, "a valid namespace (a DNS label)")
    checkDNSLabel(s.at("name"), name, "a valid Service name (a DNS label)")
    scheme = (s.string("scheme") or "https").lower()
    if scheme not in ("http", "https"):
        raise Invalid(s.at("scheme"), f"{scheme!r} must be http or https")
    port = s.integer("port", low=1, high=65535)
    if port is None:
        port = 443 if scheme == "https" else 80
    path = s.string("path") or ""
    if path and (not path.startswith("/") or _UNSAFE_IN_PATH.search(path)):
        raise Invalid(
            s.at("path"), f"{path!r} must be an absolute path (start with '/', no spaces, '?' or '#')"
        )
    return scheme, f"{name}.{namespace}.svc", port, path


def _unusedPathWarning(ctx: Context, field: str, endpoint: Endpoint, why: str) -> None:
    if endpoint.path not in ("", "/"):
        ctx.warn(field, f"the upstream path {endpoint.path!r} is not used: {why}")


# -- health checks ------------------------------------------------------------------------------------------


def _duration(h: Fields, key: str, default: float) -> float:
    value = h.get(key)
    if value is None:
        return default
    try:
        seconds = parseDuration(value)
    except ValueError as e:
        raise Invalid(h.at(key), str(e)) from None
    if seconds <= 0:
        raise Invalid(h.at(key), f"{value!r} must be longer than zero")
    return seconds


def _healthCheck(ctx: Context, h: Optional[Fields]) -> Optional[HealthCheck]:
    """SPEC 4.4.  The target defaults to "/" (the upstream's root)."""
    if h is None:
        return None
    target = h.string("url") or "/"
    if not target.startswith("/"):
        _parseURL(ctx, h.at("url"), target, keepQuery=True)
    elif _UNSAFE_IN_PATH.search(target.replace("?", "")):
        raise Invalid(h.at("url"), f"{target!r} must not contain whitespace, control characters or '#'")
    interval = _duration(h, "interval", 10.0)
    timeout = _duration(h, "timeout", 5.0)
    if timeout > interval:
        if h.has("timeout"):
            ctx.warn(h.at("timeout"), f"{timeout:g}s is longer than the interval {interval:g}s; capped to it")
        timeout = interval
    status = h.integer("status", low=100, high=599)
    rise = h.integer("rise", low=1, high=100)
    fall = h.integer("fall", low=1, high=100)
    return HealthCheck(
        target=target,
        interval=interval,
        timeout=timeout,
        status=200 if status is None else status,
        rise=1 if rise is None else rise,
        fall=3 if fall is None else fall,
    )


def _timeouts(t: Optional[Fields]) -> Optional[UpstreamTimeouts]:
    """Per-upstream timeout overrides (ksproxy extension): Go durations, each optional."""
    if t is None:
        return None
    values = {key: (_duration(t, key, 0.0) if t.has(key) else None) for key in _TIMEOUT_KEYS}
    return UpstreamTimeouts(**values)


# -- APIService ---------------------------------------------------------------------------------------------


def _apiService(ctx: Context, top: Fields, meta: ObjectMeta, state: Optional[str]) -> APIService:
    spec = top.mapping("spec", _F_APISERVICE, required=True)
    assert spec is not None
    group = spec.string("group", required=True)
    version = spec.string("version", required=True)
    assert group is not None and version is not None
    checkDNSSubdomain(spec.at("group"), group, "a valid API group (a DNS subdomain)")
    checkDNSLabel(spec.at("version"), version, "a valid API version (a DNS label)")
    urls = []
    for where, url in spec.strings("nonResourceURLs"):
        if not url.startswith("/") or _UNSAFE_IN_PATH.search(url):
            raise Invalid(where, f"{url!r} must be an absolute path (start with '/', no spaces, '?' or '#')")
        if "*" in url[:-1]:
            raise Invalid(where, f"{url!r}: '*' is allowed only as the last character (a prefix match)")
        _noEscape(where, url)
        urls.append(url)
    endpoint = _endpoint(ctx, spec, urlAliases=("endpoint",))
    assert endpoint is not None
    _unusedPathWarning(ctx, spec.path, endpoint, "APIService requests are forwarded with their own path")
    healthCheck = _healthCheck(ctx, spec.mapping("healthCheck", _F_HEALTH))
    return APIService(
        meta=meta,
        group=group,
        version=version,
        endpoint=endpoint,
        nonResourceURLs=tuple(urls),
        healthCheck=healthCheck,
        state=state,
        timeouts=_timeouts(spec.mapping("timeouts", _F_TIMEOUT)),
    )


# -- ReverseProxy -------------------------------------------------------------------------------------------


def _reverseProxy(ctx: Context, top: Fields, meta: ObjectMeta, state: Optional[str]) -> ReverseProxy:
    spec = top.mapping("spec", _F_PROXY, _F_PROXY_IGNORED, required=True)
    assert spec is not None
    matchers = _matchers(ctx, spec)
    upstream = spec.mapping("upstream", _F_UPSTREAM, required=True)
    assert upstream is not None
    endpoint = _endpoint(ctx, upstream, urlAliases=("backend",), caAliases=("caBudle",))
    assert endpoint is not None
    prepend = bool(upstream.boolean("prependPath"))
    if not prepend and endpoint.path not in ("", "/"):
        _unusedPathWarning(
            ctx,
            upstream.path,
            endpoint,
            f"the request path is forwarded as is; set {upstream.at('prependPath')}: true to put it in front",
        )
    healthCheck = None
    if upstream.has("healthCheck") or spec.has("healthCheck"):
        checks = [
            (where.path, where.mapping("healthCheck", _F_HEALTH))
            for where in (upstream, spec)
            if where.has("healthCheck")
        ]
        if len(checks) > 1:
            raise Invalid(spec.at("healthCheck"), f"also set as {upstream.at('healthCheck')}; set only one")
        healthCheck = _healthCheck(ctx, checks[0][1])
    return ReverseProxy(
        meta=meta,
        matchers=matchers,
        upstream=endpoint,
        directives=_directives(ctx, spec),
        healthCheck=healthCheck,
        upstreamPathPrefix=prepend,
        state=state,
        timeouts=_timeouts(upstream.mapping("timeouts", _F_TIMEOUT)),
    )


_F_PLAIN_PROXY = frozenset(("matcher", "upstream", "directives"))
_F_PLAIN_UPSTREAM = frozenset(("url", "prependPath"))
# Upstreams of plain ReverseProxy objects by URL (the only thing their parse reads); see L{_ENDPOINTS}.
_PLAIN_UPSTREAMS = Memo()


def _plainReverseProxy(ctx: Context, raw: Dict[Any, Any], rawMeta: Any) -> Optional[ReverseProxy]:
    """
    A ReverseProxy of the common shape (a name, matchers, an upstream URL, plain directives) read without
    L{Fields} views or memo keys, as L{_reverseProxy} would read it; or C{None}, having reported nothing, for
    any other shape (then the full parse reads it).  Only the status and the upstream may report: they are read
    last, in the full parse's order.
    """
    spec = raw.get("spec")
    if rawMeta.__class__ is not dict or spec.__class__ is not dict or not _F_TOP.issuperset(raw):
        return None
    upstream = spec.get("upstream")
    if upstream.__class__ is not dict or not _F_PLAIN_PROXY.issuperset(spec):
        return None
    if not _F_PLAIN_UPSTREAM.issuperset(upstream):
        return None
    url = upstream.get("url")
    prepend = upstream.get("prependPath")
    if url.__class__ is not str or (prepend is not None and prepend.__class__ is not bool):
        return None
    labels = rawMeta.get("labels")
    if labels.__class__ is dict and labels.get(LABEL_PROXY_TARGET) == "ks-console":
        return None
    meta = _plainMetadata(rawMeta)
    if meta is None:
        return None
    matchers = _plainMatchers(spec.get("matcher"))
    if matchers is None:
        return None
    if matchers.__class__ is tuple:
        directives = _plainDirectives(spec.get("directives"))
        if directives is None:
            return None
    state = None
    if raw.get("status") is not None:
        state, _ = _status(ctx, Fields(ctx, raw, "", _F_TOP), KIND_REVERSEPROXY)
    if matchers.__class__ is not tuple:
        # A pattern that does not compile: what the full parse would refuse after the status.
        raise matchers
    endpoint = _PLAIN_UPSTREAMS.get(ctx, (ctx.kind, url), lambda recorder: _plainUpstream(recorder, raw))
    if not prepend and endpoint.path not in ("", "/"):
        _unusedPathWarning(
            ctx,
            "spec.upstream",
            endpoint,
            "the request path is forwarded as is; set spec.upstream.prependPath: true to put it in front",
        )
    return ReverseProxy(
        meta=meta,
        matchers=matchers,
        upstream=endpoint,
        directives=directives,
        upstreamPathPrefix=bool(prepend),
        state=state,
    )


def _plainUpstream(ctx: Context, raw: Dict[Any, Any]) -> Endpoint:
    """C{spec.upstream} of a plain ReverseProxy, through the same views and code as the full parse."""
    top = Fields(ctx, raw, "", _F_TOP)
    spec = top.mapping("spec", _F_PROXY, _F_PROXY_IGNORED, required=True)
    assert spec is not None
    upstream = spec.mapping("upstream", _F_UPSTREAM, required=True)
    assert upstream is not None
    endpoint = _readEndpoint(
        ctx, upstream, urlAliases=("backend",), caAliases=("caBudle",), required=True, keepQuery=False
    )
    assert endpoint is not None
    return endpoint


_MATCHERS = Memo()


def _matchers(ctx: Context, spec: Fields) -> Tuple[Matcher, ...]:
    """Design shape (a list of {path, method}) or 4.x shape (one mapping); memoized by what it reads."""
    matchers = _plainMatchers(spec.data.get("matcher"), spec.at("matcher"))
    if matchers is not None:
        if matchers.__class__ is not tuple:
            raise matchers
        return matchers
    key = (spec.identity(), repr(spec.data.get("matcher")))
    return _MATCHERS.get(ctx, key, lambda recorder: _readMatchers(recorder, spec.rebind(recorder)))


# Matchers of the 4.x shape ({path, method} strings) by (path, method): many rebuilds keep them.
_PLAIN_MATCHERS = Cache()


def _plainMatchers(value: Any, field: str = "spec.matcher") -> Any:
    """
    Matchers of the common shapes (plain strings, no unknown keys) read directly, or C{None} for anything that
    may warn, note or be refused: then L{_readMatchers} reads them (and says why).  A pattern that does not
    compile is the exception: the L{Invalid} that L{_readMatchers} would raise is returned, so that each
    pattern is compiled once.
    """
    if value.__class__ is dict:
        path = value.get("path")
        method = value.get("method")
        key = (path, method) if path.__class__ is str and method.__class__ is str and len(value) == 2 else None
        if key is not None:
            matchers = _PLAIN_MATCHERS.get(key)
            if matchers is not None:
                return matchers
        matcher = _plainMatcher(value, field)
        if matcher is None or matcher.__class__ is Invalid:
            return matcher
        if key is not None:
            _PLAIN_MATCHERS.put(key, (matcher,))
        return (matcher,)
    if value.__class__ is not list or not value:
        return None
    out: List[Matcher] = []
    for index, item in enumerate(value):
        matcher = _plainMatcher(item, field, index)
        if matcher is None or matcher.__class__ is Invalid:
            return matcher
        if matcher in out:
            return None
        out.append(matcher)
    return tuple(out)


def _plainMatcher(item: Any, field: str, index: Optional[int] = None) -> Any:
    if item.__class__ is not dict:
        return None
    path = item.get("path")
    method = item.get("method")
    if len(item) > 2 or path.__class__ is not str or not path.startswith("/"):
        return None
    if len(item) == 2 and "method" not in item or len(item) == 1 and "path" not in item:
        return None
    if method is None:
        method = "*"
    elif method.__class__ is not str:
        return None
    else:
        method = (method or "*").upper()
        if method != "*" and not isToken(method):
            return None
    try:
        _paths.compilePattern(path)
    except ValueError as e:
        return Invalid(f"{field}.path" if index is None else f"{field}[{index}].path", str(e))
    return Matcher(path=path, method=method)


def _readMatchers(ctx: Context, spec: Fields) -> Tuple[Matcher, ...]:
    value = spec.get("matcher")
    if value is None:
        raise Invalid(spec.at("matcher"), "required field is missing")
    if _isMapping(value):
        items = [(spec.at("matcher"), value)]
    elif isinstance(value, (list, tuple)):
        if not value:
            raise Invalid(spec.at("matcher"), "must hold at least one {path, method}")
        items = [(f"{spec.at('matcher')}[{i}]", item) for i, item in enumerate(value)]
    else:
        raise Invalid(
            spec.at("matcher"), f"must be an object {{path, method}} or a list of them, not {typeName(value)}"
        )
    out: List[Matcher] = []
    for where, item in items:
        m = Fields(ctx, item, where, _F_MATCHER, parent=spec)
        path = m.string("path", required=True)
        assert path is not None
        if not path.startswith("/"):
            raise Invalid(m.at("path"), f"{path!r} must start with '/'")
        try:
            _paths.compilePattern(path)
        except ValueError as e:
            raise Invalid(m.at("path"), str(e)) from None
        method = (m.string("method") or "*").upper()
        if method != "*" and not isToken(method):
            raise Invalid(m.at("method"), f"{method!r} is not an HTTP method (a token) or '*'")
        matcher = Matcher(path=path, method=method)
        if matcher in out:
            ctx.warn(where, f"duplicate of an earlier matcher ({method} {path})")
            continue
        out.append(matcher)
    return tuple(out)


# Compiled directive rules by (compiler, text): pure, immutable, and shared by many objects.
_RULES: Dict[Tuple[Callable[[str], Any], str], Tuple[bool, Any]] = {}
_RULES_LIMIT = 4096


def _rule(compile: Callable[[str], Any], text: str) -> Tuple[bool, Any]:
    """C{(True, rule)} or C{(False, message)}, remembered in L{_RULES}."""
    key = (compile, text)
    outcome = _RULES.get(key)
    if outcome is None:
        try:
            outcome = (True, compile(text))
        except ValueError as e:
            outcome = (False, str(e))
        if len(_RULES) >= _RULES_LIMIT:
            _RULES.clear()
        _RULES[key] = outcome
    return outcome


def _compileAll(rules: Tuple[Tuple[str, str], ...], compile: Callable[[str], _T]) -> Tuple[_T, ...]:
    if not rules:
        return ()
    out = []
    for where, text in rules:
        outcome = _rule(compile, text)
        if not outcome[0]:
            raise Invalid(where, outcome[1])
        out.append(outcome[1])
    return tuple(out)


_DIRECTIVES = Memo()


def _directives(ctx: Context, spec: Fields) -> Directives:
    """4.x C{spec.directives}, plus the design shape's C{spec.rewrite} and C{spec.header} (those first)."""
    data = spec.data
    if data.get("header") is None and data.get("rewrite") is None:
        directives = _plainDirectives(data.get("directives"))
        if directives is not None:
            return directives
    key = (spec.identity(), repr((data.get("directives"), data.get("header"), data.get("rewrite"))))
    return _DIRECTIVES.get(ctx, key, lambda recorder: _readDirectives(recorder, spec.rebind(recorder)))


_NO_DIRECTIVES = Directives()
# The list-valued directives that L{_plainDirectives} reads, with the name of their compiler.
_PLAIN_RULE_LISTS = {
    "headerUp": "compileHeaderRule",
    "headerDown": "compileHeaderRule",
    "rewrite": "compileRewriteRule",
    "replace": "compileReplaceRule",
    "pathRegexp": "compileRegexpRule",
}
_plainCompilers: Dict[str, Callable[[str], Any]] = {}


def _plainDirectives(given: Any) -> Optional[Directives]:
    """
    C{spec.directives} of the common shape (known keys, strings, lists of strings that compile) read directly,
    or C{None} for anything that may warn, note or be refused: then L{_readDirectives} reads it (and says
    why).  Directives often differ per object (a path prefix), so the memo would miss anyway.
    """
    if given is None:
        return _NO_DIRECTIVES
    if given.__class__ is not dict:
        return None
    if not _plainCompilers:
        compilers = _compilers()
        _plainCompilers.update((key, getattr(compilers, name)) for key, name in _PLAIN_RULE_LISTS.items())
    values: Dict[str, Any] = {}
    for key, value in given.items():
        cls = value.__class__
        if cls is str:
            if not value:
                if key not in ("method", "stripPathPrefix", "stripPathSuffix"):
                    return None
            elif key == "stripPathPrefix":
                if value[0] != "/" or _UNSAFE_IN_PATH.search(value):
                    return None
                values[key] = value
            elif key == "method":
                method = value.upper()
                if not isToken(method):
                    return None
                values[key] = method
            elif key == "stripPathSuffix":
                if _UNSAFE_IN_PATH.search(value):
                    return None
                values[key] = value
            else:
                return None
        elif cls is list:
            compile = _plainCompilers.get(key)
            if compile is None:
                return None
            compiled = []
            for text in value:
                if text.__class__ is not str:
                    return None
                outcome = _RULES.get((compile, text))
                if outcome is None:
                    try:
                        outcome = _rule(compile, text)
                    except Exception:  # noqa: BLE001 - the full parse reports it
                        return None
                if not outcome[0]:
                    return None
                compiled.append(outcome[1])
            if compiled:
                values[key] = tuple(compiled)
        elif cls is bool and key == "authProxy":
            values[key] = value
        else:
            return None
    return Directives(**values)


def _readDirectives(ctx: Context, spec: Fields) -> Directives:
    compilers = _compilers()
    data = spec.data
    d = spec.mapping("directives", _F_DIRECTIVE, _F_DIRECTIVE_IGNORED)
    designUp: Tuple[Tuple[str, str], ...] = ()
    designDown: Tuple[Tuple[str, str], ...] = ()
    if data.get("header") is not None:
        header = spec.mapping("header", _F_HEADER)
        assert header is not None
        designUp = header.strings("up")
        designDown = header.strings("down")
    designRewrite = spec.strings("rewrite")
    if d is None:
        d = Fields(ctx, {}, spec.at("directives"), _F_NONE)
    given = d.data
    method = None
    if given.get("method") is not None:
        method = d.string("method") or None
        if method is not None:
            method = method.upper()
            if not isToken(method):
                raise Invalid(d.at("method"), f"{method!r} is not an HTTP method (a token)")
    stripPrefix = d.string("stripPathPrefix") or None
    if stripPrefix is not None and (not stripPrefix.startswith("/") or _UNSAFE_IN_PATH.search(stripPrefix)):
        raise Invalid(
            d.at("stripPathPrefix"), f"{stripPrefix!r} must be a path starting with '/' (no spaces, '?', '#')"
        )
    stripSuffix = None
    if given.get("stripPathSuffix") is not None:
        stripSuffix = d.string("stripPathSuffix") or None
        if stripSuffix is not None and _UNSAFE_IN_PATH.search(stripSuffix):
            raise Invalid(d.at("stripPathSuffix"), f"{stripSuffix!r} must not contain spaces, '?' or '#'")
    replaceKey = "replace"
    if given.get("replace") is not None or given.get("uriSubstring") is not None:
        replaceKey, _ = _oneOf(d, ("replace", "uriSubstring"), lambda f, k: f.list(k) or None)
    headerRule = compilers.compileHeaderRule
    return Directives(
        method=method,
        stripPathPrefix=stripPrefix,
        stripPathSuffix=stripSuffix,
        headerUp=_compileAll(designUp + d.strings("headerUp"), headerRule),
        headerDown=_compileAll(designDown + d.strings("headerDown"), headerRule),
        rewrite=_compileAll(designRewrite + d.strings("rewrite"), compilers.compileRewriteRule),
        replace=_compileAll(d.strings(replaceKey), compilers.compileReplaceRule),
        pathRegexp=_compileAll(d.strings("pathRegexp"), compilers.compileRegexpRule),
        authProxy=bool(d.boolean("authProxy")),
    )


_compilersModule: Any = None


def _compilers() -> Any:
    """L{ksproxy.directives}, imported on first use (it imports the model)."""
    global _compilersModule
    if _compilersModule is None:
        from ksproxy import directives

        _compilersModule = directives
    return _compilersModule


# -- JSBundle -----------------------------------------------------------------------------------------------


def _jsBundle(
    ctx: Context, top: Fields, meta: ObjectMeta, state: Optional[str], statusLink: Optional[str]
) -> JSBundle:
    spec = top.mapping("spec", _F_BUNDLE, required=True)
    assert spec is not None
    extension = meta.labels.get(LABEL_EXTENSION_REF) or meta.name
    extensionField = (
        f"metadata.labels.{LABEL_EXTENSION_REF}" if meta.labels.get(LABEL_EXTENSION_REF) else "metadata.name"
    )
    filename = spec.string("filenameOverride") or None
    if filename is not None:
        _checkRelativeFile(spec.at("filenameOverride"), filename)

    sources: List[Tuple[str, BundleSource]] = []
    raw = _readBundle(spec, "raw")
    if raw is not None:
        try:
            data, twice = scriptFromBase64(raw)
        except ValueError as e:
            raise Invalid(spec.at("raw"), str(e)) from None
        if twice:
            ctx.note(spec.at("raw"), "double base64 encoding detected; decoded twice")
        sources.append((spec.at("raw"), RawSource(data=data)))
    rawFrom = spec.mapping("rawFrom", _F_RAWFROM)
    if rawFrom is not None:
        for key, cls in (("configMapKeyRef", ConfigMapSource), ("secretKeyRef", SecretSource)):
            ref = rawFrom.mapping(key, _F_KEYREF, _F_KEYREF_IGNORED)
            if ref is not None:
                sources.append((rawFrom.at(key), cls(**_keyRef(ref))))
        endpoint = _endpoint(ctx, rawFrom, required=False, keepQuery=True)
        if endpoint is not None:
            which = "url" if rawFrom.has("url") else "service"
            sources.append((rawFrom.at(which), EndpointSource(endpoint=endpoint)))
    if not sources:
        raise Invalid(
            "spec",
            "no bundle source: set spec.raw, or spec.rawFrom with configMapKeyRef, secretKeyRef, url or service",
        )
    if len(sources) > 1:
        ctx.warn(
            "spec",
            f"several sources are set ({', '.join(w for w, _ in sources)}); {sources[0][0]} is used,"
            " as KubeSphere does",
        )

    if statusLink is not None:
        link, defaulted = _checkLink("status.link", statusLink), False
    else:
        link, defaulted = f"/dist/{extension}/{filename or 'index.js'}", True
        _checkLink(extensionField, link)
    assets = _assets(ctx, spec, extension, link)
    return JSBundle(
        meta=meta, source=sources[0][1], link=link, linkDefaulted=defaulted, assets=assets, state=state
    )


def _keyRef(ref: Fields) -> Mapping[str, str]:
    name = ref.string("name", required=True)
    key = ref.string("key", required=True)
    namespace = ref.string("namespace", required=True)
    assert name is not None and key is not None and namespace is not None
    checkDNSSubdomain(ref.at("name"), name, "a valid object name (a DNS subdomain)")
    checkDNSLabel(ref.at("namespace"), namespace, "a valid namespace (a DNS label)")
    if len(key) > 253 or not _CONFIG_KEY.fullmatch(key):
        raise Invalid(ref.at("key"), f"{key!r} is not a valid key (letters, digits, '-', '_', '.')")
    return {"namespace": namespace, "name": name, "key": key}


def _checkRelativeFile(field: str, name: str) -> None:
    segments = name.split("/")
    if name.startswith("/") or _UNSAFE_IN_PATH.search(name) or any(s in ("", ".", "..") for s in segments):
        raise Invalid(
            field, f"{name!r} must be a relative file path (no leading '/', no '.' or '..', no spaces)"
        )


def _checkLink(field: str, link: str) -> str:
    if not link.startswith("/"):
        raise Invalid(field, f"{link!r} must be an absolute path (start with '/')")
    if _UNSAFE_IN_PATH.search(link):
        raise Invalid(field, f"{link!r} must not contain whitespace, control characters, '?' or '#'")
    if any(s in (".", "..") for s in link.split("/")):
        raise Invalid(field, f"{link!r} must not contain '.' or '..' segments")
    _noEscape(field, link)
    return link


def _noEscape(field: str, path: str) -> None:
    escape = _paths.escapeInRoutePath(path)
    if escape is not None:
        raise Invalid(
            field,
            f"{path!r} contains the escape {escape!r}: requests are matched on their decoded path, so write the "
            "character itself",
        )


def _assets(ctx: Context, spec: Fields, extension: str, mainLink: str) -> Tuple[Asset, ...]:
    """SPEC 1.4 C{assets}: a style sheet and extra files, each fetched from an Endpoint."""
    assets = spec.mapping("assets", _F_ASSETS)
    if assets is None:
        return ()
    seen = {mainLink: "the bundle's link"}
    out: List[Asset] = []

    def add(f: Fields, link: str, mimeType: Optional[str]) -> None:
        _checkLink(f.at("link"), link)
        if link in seen:
            raise Invalid(f.at("link"), f"{link!r} is already used by {seen[link]}")
        if mimeType is not None and not _MIME.fullmatch(mimeType):
            raise Invalid(f.at("mimeType"), f"{mimeType!r} is not a media type (type/subtype)")
        endpoint = _endpoint(ctx, f, keepQuery=True)
        assert endpoint is not None
        seen[link] = f.path
        out.append(Asset(link=link, source=EndpointSource(endpoint=endpoint), mimeType=mimeType))

    style = assets.mapping("style", _F_STYLE)
    if style is not None:
        add(
            style,
            style.string("link") or f"/dist/{extension}/style.css",
            style.string("mimeType") or "text/css",
        )
    for index, item in enumerate(assets.list("files") or []):
        f = Fields(
            ctx,
            item,
            f"{assets.at('files')}[{index}]",
            _F_FILE,
            parent=assets,
        )
        name = f.string("name") or None
        link = f.string("link") or None
        if name is not None:
            _checkRelativeFile(f.at("name"), name)
        elif link is None:
            raise Invalid(f.path, "needs a name (served at /dist/<extension>/<name>) or a link")
        add(f, link or f"/dist/{extension}/{name}", f.string("mimeType") or None)
    return tuple(out)
