"""
Tests for L{ksproxy.model.parse}: every rejection rule, both ReverseProxy shapes and their mixes, the
aliases, the base64 double-encoding rules, status handling, and a small fuzz that checks parseResource never
raises.
"""

from __future__ import annotations

import base64
import copy
import datetime
import random
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.model import parse as parseModule
from ksproxy.model.parse import ParseResult, decodeBase64Pem, parseDuration, parseResource
from ksproxy.model.types import (
    API_VERSION,
    APIService,
    ConfigMapSource,
    Endpoint,
    EndpointSource,
    HealthCheck,
    JSBundle,
    Matcher,
    RawSource,
    ReverseProxy,
    SecretSource,
    TLSSettings,
    UpstreamTimeouts,
)


def _makeCertificate(commonName: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


CA_PEM = _makeCertificate("test CA one")
CA2_PEM = _makeCertificate("test CA two")
CA_B64 = base64.b64encode(CA_PEM).decode()
CA_B64_TWICE = base64.b64encode(base64.b64encode(CA_PEM)).decode()


def b64(data: Any) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# -- builders -------------------------------------------------------------------------------------------------


def apiService(name: str = "v1alpha1.example.kubesphere.io", **spec: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {
        "group": "example.kubesphere.io",
        "version": "v1alpha1",
        "url": "http://api.example.svc",
    }
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "APIService", "metadata": {"name": name}, "spec": body}


def reverseProxy(name: str = "grafana", upstream: Any = None, **spec: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {
        "matcher": {"path": "/proxy/grafana/*", "method": "*"},
        "upstream": {"url": "http://grafana.extension-grafana.svc"} if upstream is None else upstream,
    }
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "ReverseProxy", "metadata": {"name": name}, "spec": body}


def jsBundle(name: str = "hello-world", status: Any = None, **spec: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = dict(spec) or {
        "rawFrom": {
            "configMapKeyRef": {"name": "hello-world", "key": "index.js", "namespace": "extension-hello"}
        }
    }
    raw: Dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "JSBundle",
        "metadata": {"name": name},
        "spec": body,
    }
    if status is not None:
        raw["status"] = status
    return raw


def accepted(raw: Any) -> ParseResult:
    result = parseResource(raw)
    assert result.rejection is None, str(result.rejection)
    assert result.skipped is None, result.skipped
    assert result.obj is not None
    assert result.accepted
    return result


def rejected(raw: Any, field: str, *fragments: str) -> ParseResult:
    result = parseResource(raw)
    assert result.obj is None, f"accepted, expected a rejection at {field}"
    assert result.skipped is None, result.skipped
    assert result.rejection is not None
    assert result.rejection.field == field, str(result.rejection)
    for fragment in fragments:
        assert fragment in result.rejection.message, str(result.rejection)
    assert "internal parser error" not in result.rejection.message
    return result


def warned(result: ParseResult, field: str, fragment: str = "") -> str:
    matches = [w for w in result.warnings if f": {field}: " in w and fragment in w]
    assert matches, f"no warning on {field} containing {fragment!r}: {result.warnings}"
    return matches[0]


# -- what is ours -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "apiVersion, kind, reasonFragment",
    [
        ("kubesphere.io/v1alpha1", "APIService", "apiVersion kubesphere.io/v1alpha1 is not"),
        (
            "extensions.kubesphere.io/v1alpha2",
            "JSBundle",
            "apiVersion extensions.kubesphere.io/v1alpha2 is not served",
        ),
        ("apiregistration.k8s.io/v1", "APIService", "another API group"),
        ("v1", "ConfigMap", "apiVersion v1 is not"),
        (API_VERSION, "ExtensionEntry", "kind ExtensionEntry is not served by ksproxy"),
        (API_VERSION, "Extension", "kind Extension is not served by ksproxy"),
    ],
)
def test_notOursIsSkipped(apiVersion: str, kind: str, reasonFragment: str) -> None:
    result = parseResource({"apiVersion": apiVersion, "kind": kind, "metadata": {"name": "x"}, "spec": {}})
    assert result.obj is None and result.rejection is None
    assert result.skipped is not None and reasonFragment in result.skipped
    assert (result.kind, result.name) == (kind, "x")


def test_consoleReverseProxyIsSkipped() -> None:
    raw = reverseProxy()
    raw["metadata"]["labels"] = {"kubesphere.io/reverse-proxy-target": "ks-console"}
    result = parseResource(raw)
    assert result.obj is None and result.rejection is None
    assert result.skipped is not None and "ks-console" in result.skipped
    # The label only matters on a ReverseProxy.
    bundle = jsBundle()
    bundle["metadata"]["labels"] = {"kubesphere.io/reverse-proxy-target": "ks-console"}
    accepted(bundle)


@pytest.mark.parametrize("raw", [None, [], [reverseProxy()], "APIService", 42, 1.5, True, b"x"])
def test_notAMappingIsRejected(raw: Any) -> None:
    result = rejected(raw, "", "must be an object")
    assert result.kind == "" and result.name == ""


@pytest.mark.parametrize(
    "mutate, field, fragment",
    [
        (lambda r: r.pop("kind"), "kind", "required"),
        (lambda r: r.update(kind=""), "kind", "required"),
        (lambda r: r.update(kind=["APIService"]), "kind", "must be a string"),
        (lambda r: r.pop("apiVersion"), "apiVersion", "required"),
        (lambda r: r.update(apiVersion=1), "apiVersion", "must be a string"),
        (lambda r: r.pop("metadata"), "metadata", "required"),
        (lambda r: r.update(metadata=[]), "metadata", "must be an object"),
        (lambda r: r["metadata"].pop("name"), "metadata.name", "required"),
        (lambda r: r["metadata"].update(name=""), "metadata.name", "must not be empty"),
        (lambda r: r["metadata"].update(name=7), "metadata.name", "must be a string"),
        (lambda r: r["metadata"].update(name="Grafana"), "metadata.name", "DNS subdomain"),
        (lambda r: r["metadata"].update(name="a_b"), "metadata.name", "DNS subdomain"),
        (lambda r: r["metadata"].update(name="x" * 254), "metadata.name", "DNS subdomain"),
        (lambda r: r["metadata"].update(namespace=3), "metadata.namespace", "must be a string"),
        (lambda r: r["metadata"].update(labels=["a"]), "metadata.labels", "must be an object"),
        (lambda r: r["metadata"].update(labels={"a": 1}), "metadata.labels.a", "must be strings"),
        (lambda r: r["metadata"].update(generation="1"), "metadata.generation", "must be an integer"),
        (lambda r: r["metadata"].update(creationTimestamp=5), "metadata.creationTimestamp", "RFC 3339"),
        (lambda r: r.pop("spec"), "spec", "required"),
        (lambda r: r.update(spec="x"), "spec", "must be an object"),
        (lambda r: r.update(status=[]), "status", "must be an object"),
        (lambda r: r["spec"].update(upstream=None), "spec.upstream", "required"),
    ],
)
def test_objectLevelRejections(mutate: Any, field: str, fragment: str) -> None:
    raw = reverseProxy()
    mutate(raw)
    result = rejected(raw, field, fragment)
    assert result.rejection is not None
    # A rejection always names the kind and the name (when they could be read).
    if isinstance(raw.get("kind"), str) and raw["kind"]:
        assert result.rejection.kind == "ReverseProxy"


def test_rejectionStringNamesKindNameAndField() -> None:
    result = rejected(reverseProxy(upstream={"url": "ftp://x"}), "spec.upstream.url", "http or https")
    assert str(result.rejection).startswith("ReverseProxy/grafana: spec.upstream.url: ")


def test_metadata() -> None:
    raw = reverseProxy()
    raw["metadata"].update(
        uid="abc-123",
        generation=4,
        resourceVersion="991",
        creationTimestamp="2024-05-01T10:00:00Z",
        labels={"kubesphere.io/extension-ref": "grafana"},
        annotations={"meta.helm.sh/release-name": "grafana"},
        managedFields=[{"manager": "kubectl"}],
    )
    result = accepted(raw)
    meta = result.obj.meta
    assert (meta.name, meta.uid, meta.generation, meta.resourceVersion) == ("grafana", "abc-123", 4, "991")
    assert meta.creationTimestamp == "2024-05-01T10:00:00Z"
    assert meta.labels == {"kubesphere.io/extension-ref": "grafana"}
    assert result.warnings == () and result.notes == ()
    assert (result.kind, result.name) == ("ReverseProxy", "grafana")


def test_creationTimestampFromYAMLDatetime() -> None:
    raw = reverseProxy()
    stamp = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    raw["metadata"]["creationTimestamp"] = stamp
    assert accepted(raw).obj.meta.creationTimestamp == "2024-05-01T10:00:00Z"
    raw["metadata"]["creationTimestamp"] = None  # kompose writes "creationTimestamp: null"
    assert accepted(raw).obj.meta.creationTimestamp == ""


def test_namespaceOnClusterScopedKindIsAWarning() -> None:
    raw = jsBundle()
    raw["metadata"]["namespace"] = "kubesphere-devops-system"
    result = accepted(raw)
    text = warned(result, "metadata.namespace", "cluster-scoped")
    assert text.startswith("JSBundle/hello-world: ")


# -- Endpoint (SPEC 1.1) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://grafana.monitoring.svc", Endpoint("http", "grafana.monitoring.svc", 80, "")),
        (
            "https://ks-devops.kubesphere-system.svc",
            Endpoint("https", "ks-devops.kubesphere-system.svc", 443, ""),
        ),
        ("http://prometheus-k8s.ns.svc:9090", Endpoint("http", "prometheus-k8s.ns.svc", 9090, "")),
        ("HTTP://Example.COM:8080/", Endpoint("http", "example.com", 8080, "/")),
        ("http://10.8.0.2", Endpoint("http", "10.8.0.2", 80, "")),
        ("http://[::1]:8080", Endpoint("http", "::1", 8080, "")),
        ("http://databend-playground", Endpoint("http", "databend-playground", 80, "")),
    ],
)
def test_urlEndpoint(url: str, expected: Endpoint) -> None:
    result = accepted(reverseProxy(upstream={"url": url}))
    assert result.obj.upstream == expected


def test_urlPathIsKept() -> None:
    result = accepted(reverseProxy(upstream={"url": "http://app.ns.svc:8080/base/path", "prependPath": True}))
    assert result.obj.upstream.path == "/base/path"
    assert result.obj.upstreamPathPrefix is True
    assert result.warnings == ()


def test_urlPathWithoutPrependPathWarns() -> None:
    result = accepted(reverseProxy(upstream={"url": "http://app.ns.svc/base"}))
    assert result.obj.upstream.path == "/base"
    assert result.obj.upstreamPathPrefix is False
    warned(result, "spec.upstream", "prependPath")


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("ftp://x.svc", "http or https"),
        ("grafana.monitoring.svc", "missing 'http://'"),
        ("http://", "no host"),
        ("http:///path", "no host"),
        ("http://host:99999", "not a valid URL"),
        ("http://host:abc", "not a valid URL"),
        ("http://host:0", "port 0"),
        ("http://user:pw@host", "credentials"),
        ("http://ho st", "whitespace"),
        ("http://bad$host", "not a valid host"),
        ("http://[zz::1]", "not a valid"),
    ],
)
def test_badURLIsRejected(url: str, fragment: str) -> None:
    rejected(reverseProxy(upstream={"url": url}), "spec.upstream.url", fragment)


def test_urlMustBeAString() -> None:
    rejected(reverseProxy(upstream={"url": ["http://x"]}), "spec.upstream.url", "must be a string")


def test_urlAndServiceTogetherIsRejected() -> None:
    upstream = {"url": "http://a.svc", "service": {"namespace": "ns", "name": "a"}}
    result = rejected(
        reverseProxy(upstream=upstream), "spec.upstream", "spec.upstream.url", "spec.upstream.service"
    )
    assert str(result.rejection).startswith("ReverseProxy/grafana: ")


def test_neitherURLNorServiceIsRejected() -> None:
    rejected(reverseProxy(upstream={"insecureSkipVerify": True}), "spec.upstream", "one of")
    rejected(apiService(url=None), "spec", "spec.url", "spec.service")


@pytest.mark.parametrize(
    "service, expected",
    [
        ({"namespace": "ns", "name": "api"}, Endpoint("https", "api.ns.svc", 443, "")),
        ({"namespace": "ns", "name": "api", "port": 8443}, Endpoint("https", "api.ns.svc", 8443, "")),
        ({"namespace": "ns", "name": "api", "scheme": "http"}, Endpoint("http", "api.ns.svc", 80, "")),
        (
            {"namespace": "ns", "name": "api", "scheme": "HTTP", "port": 9090},
            Endpoint("http", "api.ns.svc", 9090, ""),
        ),
        ({"namespace": "ns", "name": "api", "path": "/v1"}, Endpoint("https", "api.ns.svc", 443, "/v1")),
    ],
)
def test_serviceEndpoint(service: Dict[str, Any], expected: Endpoint) -> None:
    result = accepted(apiService(url=None, service=service))
    assert result.obj.endpoint == expected


@pytest.mark.parametrize(
    "service, field, fragment",
    [
        ("api.ns", "spec.service", "must be an object"),
        ({"name": "api"}, "spec.service.namespace", "required"),
        ({"namespace": "ns"}, "spec.service.name", "required"),
        ({"namespace": "Bad_NS", "name": "api"}, "spec.service.namespace", "DNS label"),
        ({"namespace": "ns", "name": "a.b"}, "spec.service.name", "DNS label"),
        ({"namespace": "ns", "name": "api", "port": 0}, "spec.service.port", "out of range"),
        ({"namespace": "ns", "name": "api", "port": 70000}, "spec.service.port", "out of range"),
        ({"namespace": "ns", "name": "api", "port": "80"}, "spec.service.port", "must be an integer"),
        ({"namespace": "ns", "name": "api", "port": True}, "spec.service.port", "must be an integer"),
        ({"namespace": "ns", "name": "api", "path": "v1"}, "spec.service.path", "absolute path"),
        ({"namespace": "ns", "name": "api", "scheme": "grpc"}, "spec.service.scheme", "http or https"),
    ],
)
def test_badServiceIsRejected(service: Any, field: str, fragment: str) -> None:
    rejected(apiService(url=None, service=service), field, fragment)


# -- caBundle and TLS -------------------------------------------------------------------------------------


def test_caBundleSingleEncoded() -> None:
    result = accepted(reverseProxy(upstream={"url": "https://a.svc", "caBundle": CA_B64}))
    assert result.obj.upstream.tls == TLSSettings(caBundle=CA_PEM)


def test_caBundleDoubleEncoded() -> None:
    result = accepted(reverseProxy(upstream={"url": "https://a.svc", "caBundle": CA_B64_TWICE}))
    assert result.obj.upstream.tls == TLSSettings(caBundle=CA_PEM)


def test_caBundleDoubleEncodedWithWrappedLines() -> None:
    # `base64 ca.pem` wraps at 76 columns; encoding that output again must still be understood.
    wrapped = "\n".join(CA_B64[i : i + 76] for i in range(0, len(CA_B64), 76)) + "\n"
    result = accepted(apiService(url="https://a.svc", caBundle=b64(wrapped.encode())))
    assert result.obj.endpoint.tls.caBundle == CA_PEM


def test_caBundleIsNormalised() -> None:
    # Text around the blocks and several certificates: the model keeps just the certificates, in order.
    messy = b"# my CAs\n" + CA_PEM + b"\nsome comment\n" + CA2_PEM
    result = accepted(apiService(url="https://a.svc", caBundle=b64(messy)))
    assert result.obj.endpoint.tls.caBundle == CA_PEM + CA2_PEM
    assert result.obj.endpoint.tls.fingerprint.startswith("ca-")


def test_caBundleFromYAMLBinary() -> None:
    # A YAML !!binary value arrives as bytes: the first decode is already done.
    result = accepted(apiService(url="https://a.svc", caBundle=CA_PEM))
    assert result.obj.endpoint.tls.caBundle == CA_PEM


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("<Base64Data>", "not valid base64"),
        ("<Base64EncodedData>", "placeholder"),
        ("abc", "not valid base64"),
        (b64(b"hello, not a certificate"), "neither PEM"),
        (b64(b64(b"still not a certificate")), "neither PEM"),
        (
            b64(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "no loadable PEM certificate",
        ),
        (CA_PEM.decode(), "base64-encode it"),
        (42, "must be a base64 string"),
        (["x"], "must be a base64 string"),
    ],
)
def test_badCABundleIsRejectedNamingTheField(value: Any, fragment: str) -> None:
    rejected(
        reverseProxy(upstream={"url": "https://a.svc", "caBundle": value}), "spec.upstream.caBundle", fragment
    )


def test_caBudleTypoIsAcceptedOnReverseProxyUpstream() -> None:
    result = accepted(reverseProxy(upstream={"backend": "https://a.svc", "caBudle": CA_B64}))
    assert result.obj.upstream.tls.caBundle == CA_PEM
    rejected(
        reverseProxy(upstream={"backend": "https://a.svc", "caBudle": "<Base64Data>"}),
        "spec.upstream.caBudle",
        "not valid base64",
    )


def test_caBundleAndCaBudleTogetherIsRejected() -> None:
    upstream = {"url": "https://a.svc", "caBundle": CA_B64, "caBudle": CA_B64}
    rejected(reverseProxy(upstream=upstream), "spec.upstream.caBudle", "same field")


def test_emptyCABundleIsNotSet() -> None:
    # Helm charts render `caBundle: ""` when the value is unset.
    result = accepted(apiService(url="https://a.svc", caBundle=""))
    assert result.obj.endpoint.tls == TLSSettings()


def test_insecureSkipVerifyAndAlias() -> None:
    assert accepted(apiService(url="https://a.svc", insecureSkipVerify=True)).obj.endpoint.tls == TLSSettings(
        insecureSkipVerify=True
    )
    assert accepted(
        apiService(url="https://a.svc", insecureSkipTLSVerify=True)
    ).obj.endpoint.tls == TLSSettings(insecureSkipVerify=True)
    rejected(
        apiService(url="https://a.svc", insecureSkipVerify=True, insecureSkipTLSVerify=False),
        "spec.insecureSkipTLSVerify",
        "contradicts",
    )
    rejected(apiService(url="https://a.svc", insecureSkipVerify="yes"), "spec.insecureSkipVerify", "boolean")


@pytest.mark.parametrize("insecureKey", ["insecureSkipVerify", "insecureSkipTLSVerify"])
def test_caBundleWithInsecureSkipVerifyIsRejected(insecureKey: str) -> None:
    raw = apiService(url="https://a.svc", caBundle=CA_B64, **{insecureKey: True})
    rejected(raw, "spec.caBundle", insecureKey)
    # false is not a contradiction (the legacy examples write it next to caBudle).
    raw = apiService(url="https://a.svc", caBundle=CA_B64, **{insecureKey: False})
    assert accepted(raw).obj.endpoint.tls.caBundle == CA_PEM


def test_tlsSettingsOnPlainHTTPAreDroppedWithAWarning() -> None:
    result = accepted(apiService(url="http://a.svc", insecureSkipVerify=True))
    assert result.obj.endpoint.tls == TLSSettings()
    warned(result, "spec", "plain http")


def test_decodeBase64PemPublicAPI() -> None:
    assert decodeBase64Pem(CA_B64, field="x.caBundle") == CA_PEM
    assert decodeBase64Pem(CA_B64_TWICE, field="x.caBundle") == CA_PEM
    with pytest.raises(ValueError, match=r"^spec\.upstream\.caBudle: .*base64"):
        decodeBase64Pem("<Base64Data>", field="spec.upstream.caBudle")
    with pytest.raises(ValueError, match="^f: empty$"):
        decodeBase64Pem("", field="f")


# -- APIService (SPEC 1.2) --------------------------------------------------------------------------------


def test_apiService() -> None:
    raw = apiService(nonResourceURLs=["/healthz", "/metrics/*"])
    raw["status"] = {"state": "Available"}
    result = accepted(raw)
    api = result.obj
    assert isinstance(api, APIService) and api.kind == "APIService"
    assert (api.group, api.version) == ("example.kubesphere.io", "v1alpha1")
    assert api.endpoint == Endpoint("http", "api.example.svc", 80, "")
    assert api.nonResourceURLs == ("/healthz", "/metrics/*")
    assert api.state == "Available"
    assert api.healthCheck is None
    assert result.warnings == () and result.notes == ()


def test_apiServiceEndpointAlias() -> None:
    result = accepted(apiService(url=None, endpoint="https://ks-devops.kubesphere-devops-system.svc"))
    assert result.obj.endpoint == Endpoint("https", "ks-devops.kubesphere-devops-system.svc", 443, "")
    rejected(apiService(url="http://a.svc", endpoint="http://b.svc"), "spec.endpoint", "same field")


def test_apiServiceURLPathIsNotUsed() -> None:
    result = accepted(apiService(url="http://a.svc/prefix"))
    warned(result, "spec", "not used")


@pytest.mark.parametrize(
    "spec, field, fragment",
    [
        ({"group": None}, "spec.group", "required"),
        ({"version": None}, "spec.version", "required"),
        ({"group": ""}, "spec.group", "must not be empty"),
        ({"group": "Example.COM"}, "spec.group", "API group"),
        ({"group": "-bad.io"}, "spec.group", "API group"),
        ({"group": 5}, "spec.group", "must be a string"),
        ({"version": "v1.2"}, "spec.version", "API version"),
        ({"version": "V1"}, "spec.version", "API version"),
        ({"version": 1}, "spec.version", "must be a string"),
        ({"nonResourceURLs": "/healthz"}, "spec.nonResourceURLs", "must be a list"),
        ({"nonResourceURLs": ["/ok", 3]}, "spec.nonResourceURLs[1]", "must be a string"),
        ({"nonResourceURLs": ["healthz"]}, "spec.nonResourceURLs[0]", "start with '/'"),
        ({"nonResourceURLs": ["/%68ealthz"]}, "spec.nonResourceURLs[0]", "write the character itself"),
        ({"nonResourceURLs": ["/a/*/b"]}, "spec.nonResourceURLs[0]", "last character"),
        ({"healthCheck": "yes"}, "spec.healthCheck", "must be an object"),
    ],
)
def test_apiServiceRejections(spec: Dict[str, Any], field: str, fragment: str) -> None:
    rejected(apiService(**spec), field, fragment)


def test_apiServiceAcceptsRealLookingGroups() -> None:
    for group, version in [
        ("holmesgpt.dev", "v1"),
        ("custom-api-group", "v1alpha1"),
        ("constraints.gatekeeper.sh", "v1beta1"),
    ]:
        assert accepted(apiService(group=group, version=version)).obj.group == group


# -- status (SPEC 8) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, state, warningField",
    [
        ({"state": "Available"}, "Available", None),
        ({"state": "Unavailable"}, "Unavailable", None),
        ({"state": "Disabled"}, "Disabled", None),
        ({"state": "Availablea"}, "Availablea", "status.state"),
        ({"state": "Enabled"}, "Enabled", "status.state"),
        ({"enabled": False}, "Disabled", None),
        ({"enabled": True}, None, None),
        ({"enabled": False, "state": "Disabled"}, "Disabled", None),
        ({"enabled": False, "state": "Available"}, "Disabled", "status.enabled"),
        ({"state": ""}, None, None),
        ({}, None, None),
    ],
)
def test_status(status: Dict[str, Any], state: Any, warningField: Any) -> None:
    raw = apiService()
    raw["status"] = status
    result = accepted(raw)
    assert result.obj.state == state
    if warningField is None:
        assert result.warnings == ()
    else:
        warned(result, warningField)


def test_statusStateTypoWarningSuggestsTheFix() -> None:
    raw = jsBundle(status={"state": "Availablea", "link": "/dist/x/index.js"})
    text = warned(accepted(raw), "status.state", "Availablea")
    assert "'Available'" in text
    raw["status"]["state"] = "Enabled"
    text = warned(accepted(raw), "status.state", "Enabled")
    assert "only 'Available'" in text and "did you mean" not in text


@pytest.mark.parametrize(
    "status, field", [({"state": 1}, "status.state"), ({"enabled": "false"}, "status.enabled")]
)
def test_statusWrongTypeIsRejected(status: Dict[str, Any], field: str) -> None:
    raw = apiService()
    raw["status"] = status
    rejected(raw, field)


# -- ReverseProxy (SPEC 1.3) ------------------------------------------------------------------------------


def test_reverseProxyKubeSphere4Shape() -> None:
    raw = reverseProxy(
        directives={
            "headerUp": ["-Authorization", "+X-WEBAUTH-USER admin"],
            "headerDown": ['Content-Type "application/json"'],
            "stripPathPrefix": "/proxy/grafana",
            "stripPathSuffix": ".json",
            "method": "post",
            "rewrite": ["/old/* /new{path}"],
            "replace": ["/a /b"],
            "pathRegexp": ["^/x/(.*) /y/$1"],
            "authProxy": True,
        }
    )
    result = accepted(raw)
    proxy = result.obj
    assert isinstance(proxy, ReverseProxy) and proxy.kind == "ReverseProxy"
    assert proxy.matchers == (Matcher("/proxy/grafana/*", "*"),)
    assert proxy.upstream == Endpoint("http", "grafana.extension-grafana.svc", 80, "")
    d = proxy.directives
    assert d.method == "POST"
    assert (d.stripPathPrefix, d.stripPathSuffix) == ("/proxy/grafana", ".json")
    assert len(d.headerUp) == 2
    assert d.headerUp[0].op == "delete" and d.headerUp[0].name == "authorization"
    assert d.headerUp[1].op == "add" and d.headerUp[1].name == "x-webauth-user"
    assert len(d.headerDown) == 1 and d.headerDown[0].op == "set"
    assert len(d.rewrite) == 1 and d.rewrite[0].pattern == "/old/*"
    assert d.replace == (("/a", "/b"),)
    assert len(d.pathRegexp) == 1
    assert d.authProxy is True
    assert result.warnings == ()


def test_reverseProxyDesignShape() -> None:
    raw = reverseProxy(
        name="devops.kubesphere.io",
        matcher=[
            {"path": "/res/devops.kubesphere.io/images/*", "method": "GET"},
            {"path": "/res/x", "method": "head"},
        ],
        upstream={
            "insecureSkipVerify": False,
            "caBudle": CA_B64_TWICE,
            "backend": "https://ks-devops.kubesphere-system.svc",
            "healthCheck": {"url": "/healthz", "interval": "15s", "status": 204, "timeout": "3s"},
        },
        rewrite=["/old-prefix/* /new-prefix{path}"],
        header={"up": ["Foo: Bar"], "down": ["Foo: Bar"]},
    )
    result = accepted(raw)
    proxy = result.obj
    assert proxy.matchers == (
        Matcher("/res/devops.kubesphere.io/images/*", "GET"),
        Matcher("/res/x", "HEAD"),
    )
    assert proxy.upstream == Endpoint(
        "https", "ks-devops.kubesphere-system.svc", 443, "", TLSSettings(caBundle=CA_PEM)
    )
    assert proxy.healthCheck == HealthCheck(target="/healthz", interval=15.0, timeout=3.0, status=204)
    assert len(proxy.directives.rewrite) == 1
    assert proxy.directives.headerUp[0].op == "set" and proxy.directives.headerUp[0].name == "foo"
    assert len(proxy.directives.headerDown) == 1
    assert result.warnings == ()


def test_reverseProxyMixedShapesConcatenateDesignFirst() -> None:
    raw = reverseProxy(
        matcher=[{"path": "/proxy/example.com/images/*", "method": "GET"}],
        rewrite=["/first/* /one{path}"],
        header={"up": ["X-Design: 1"], "down": ["X-Design-Down: 1"]},
        directives={
            "rewrite": ["/second/* /two{path}"],
            "headerUp": ["X-Directive: 2"],
            "headerDown": ["X-Directive-Down: 2"],
            "stripPathPrefix": "/proxy/example.com",
        },
    )
    d = accepted(raw).obj.directives
    assert [r.pattern for r in d.rewrite] == ["/first/*", "/second/*"]
    assert [r.name for r in d.headerUp] == ["x-design", "x-directive"]
    assert [r.name for r in d.headerDown] == ["x-design-down", "x-directive-down"]


def test_matcherMethodDefaultsAndCase() -> None:
    assert accepted(reverseProxy(matcher={"path": "/p/*"})).obj.matchers == (Matcher("/p/*", "*"),)
    assert accepted(reverseProxy(matcher={"path": "/p/*", "method": ""})).obj.matchers == (
        Matcher("/p/*", "*"),
    )
    assert accepted(reverseProxy(matcher=[{"path": "/p", "method": "get"}])).obj.matchers == (
        Matcher("/p", "GET"),
    )


def test_duplicateMatcherIsAWarning() -> None:
    result = accepted(
        reverseProxy(matcher=[{"path": "/p", "method": "GET"}, {"path": "/p", "method": "get"}])
    )
    assert result.obj.matchers == (Matcher("/p", "GET"),)
    warned(result, "spec.matcher[1]", "duplicate")


@pytest.mark.parametrize(
    "matcher, field, fragment",
    [
        (None, "spec.matcher", "required"),
        ([], "spec.matcher", "at least one"),
        ("/proxy/*", "spec.matcher", "must be an object"),
        ({"method": "GET"}, "spec.matcher.path", "required"),
        ({"path": "proxy/*"}, "spec.matcher.path", "start with '/'"),
        ({"path": 5}, "spec.matcher.path", "must be a string"),
        ([{"path": "/a"}, {"path": "b"}], "spec.matcher[1].path", "start with '/'"),
        ([{"path": "/a"}, "b"], "spec.matcher[1]", "must be an object"),
        ({"path": "/a?x"}, "spec.matcher.path", "'?'"),
        ({"path": "/a/../b"}, "spec.matcher.path", "'..'"),
        ({"path": "/a", "method": "GE T"}, "spec.matcher.method", "HTTP method"),
        ({"path": "/a", "method": "GET,POST"}, "spec.matcher.method", "HTTP method"),
        ({"path": "/a", "method": ["GET"]}, "spec.matcher.method", "must be a string"),
    ],
)
def test_matcherRejections(matcher: Any, field: str, fragment: str) -> None:
    rejected(reverseProxy(matcher=matcher), field, fragment)


def test_matcherPatternIsCompiledByPaths(monkeypatch: pytest.MonkeyPatch) -> None:
    import ksproxy.paths

    seen: List[str] = []

    def compilePattern(pattern: str) -> Any:
        seen.append(pattern)
        if "bad" in pattern:
            raise ValueError("a made-up reason from ksproxy.paths")
        return object()

    monkeypatch.setattr(ksproxy.paths, "compilePattern", compilePattern)
    accepted(reverseProxy(matcher=[{"path": "/good/*"}]))
    rejected(
        reverseProxy(matcher=[{"path": "/good/*"}, {"path": "/bad/*"}]),
        "spec.matcher[1].path",
        "a made-up reason from ksproxy.paths",
    )
    assert seen == ["/good/*", "/good/*", "/bad/*"]


def test_upstreamBackendAlias() -> None:
    assert accepted(reverseProxy(upstream={"backend": "http://b.svc:81"})).obj.upstream == Endpoint(
        "http", "b.svc", 81, ""
    )
    rejected(
        reverseProxy(upstream={"url": "http://a.svc", "backend": "http://b.svc"}),
        "spec.upstream.backend",
        "same field",
    )
    rejected(
        reverseProxy(upstream={"backend": "http://a.svc", "service": {"namespace": "n", "name": "a"}}),
        "spec.upstream",
        "spec.upstream.backend",
    )


def test_upstreamPrependPath() -> None:
    upstream = {
        "service": {"namespace": "ns", "name": "api", "path": "/base", "scheme": "http"},
        "prependPath": True,
    }
    proxy = accepted(reverseProxy(upstream=upstream)).obj
    assert proxy.upstreamPathPrefix is True and proxy.upstream.path == "/base"
    rejected(
        reverseProxy(upstream={"url": "http://a.svc", "prependPath": "yes"}),
        "spec.upstream.prependPath",
        "boolean",
    )


def test_upstreamWrongType() -> None:
    rejected(reverseProxy(upstream="http://a.svc"), "spec.upstream", "must be an object")


# -- health checks (SPEC 4.4) ----------------------------------------------------------------------------


def test_healthCheckDefaults() -> None:
    proxy = accepted(reverseProxy(upstream={"url": "http://a.svc", "healthCheck": {}})).obj
    assert proxy.healthCheck == HealthCheck(
        target="/", interval=10.0, timeout=5.0, status=200, rise=1, fall=3
    )
    api = accepted(
        apiService(
            healthCheck={"url": "https://other.example.com/ready", "interval": 30, "rise": 2, "fall": 5}
        )
    ).obj
    assert api.healthCheck == HealthCheck("https://other.example.com/ready", 30.0, 5.0, 200, 2, 5)


def test_healthCheckOnSpecOfReverseProxy() -> None:
    proxy = accepted(reverseProxy(healthCheck={"url": "/ping"})).obj
    assert proxy.healthCheck is not None and proxy.healthCheck.target == "/ping"
    rejected(
        reverseProxy(upstream={"url": "http://a.svc", "healthCheck": {}}, healthCheck={}),
        "spec.healthCheck",
        "set only one",
    )


def test_healthCheckTimeoutIsCappedToInterval() -> None:
    result = accepted(apiService(healthCheck={"interval": "2s", "timeout": "1m"}))
    assert (result.obj.healthCheck.interval, result.obj.healthCheck.timeout) == (2.0, 2.0)
    warned(result, "spec.healthCheck.timeout", "capped")
    # The default timeout (5s) against a short interval is capped silently.
    result = accepted(apiService(healthCheck={"interval": "1s"}))
    assert result.obj.healthCheck.timeout == 1.0 and result.warnings == ()


@pytest.mark.parametrize(
    "check, field, fragment",
    [
        ({"interval": "10"}, "spec.healthCheck.interval", "missing unit"),
        ({"interval": "ten seconds"}, "spec.healthCheck.interval", "Go duration"),
        ({"interval": "0s"}, "spec.healthCheck.interval", "longer than zero"),
        ({"interval": -5}, "spec.healthCheck.interval", "longer than zero"),
        ({"timeout": "0"}, "spec.healthCheck.timeout", "longer than zero"),
        ({"timeout": True}, "spec.healthCheck.timeout", "duration"),
        ({"status": 600}, "spec.healthCheck.status", "out of range"),
        ({"status": "200"}, "spec.healthCheck.status", "must be an integer"),
        ({"url": "healthz"}, "spec.healthCheck.url", "http or https"),
        ({"url": "ftp://x/healthz"}, "spec.healthCheck.url", "http or https"),
        ({"url": "/health z"}, "spec.healthCheck.url", "whitespace"),
        ({"rise": 0}, "spec.healthCheck.rise", "out of range"),
    ],
)
def test_healthCheckRejections(check: Dict[str, Any], field: str, fragment: str) -> None:
    rejected(apiService(healthCheck=check), field, fragment)


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("100us", 0.0001),
        ("100\u00b5s", 0.0001),
        ("3ns", 3e-9),
        (".5s", 0.5),
        ("0", 0.0),
        ("-1s", -1.0),
        ("+2m", 120.0),
        (5, 5.0),
        (2.5, 2.5),
    ],
)
def test_parseDuration(value: Any, seconds: float) -> None:
    assert parseDuration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "10", "s", "1x", "1 s", " 1s", "1s ", "1..5s", "-", None, True, [], float("nan"), float("inf")],
)
def test_parseDurationRejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parseDuration(value)


# -- directives (SPEC 4.1-4.3) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "directives, field",
    [
        ({"headerUp": ["-Authorization", "X-Bad: a\r\nInjected: b"]}, "spec.directives.headerUp[1]"),
        ({"headerDown": ["Bad\nName value"]}, "spec.directives.headerDown[0]"),
        ({"rewrite": ["/a/* /b{nope}"]}, "spec.directives.rewrite[0]"),
        ({"pathRegexp": ["/x/([a-z /y"]}, "spec.directives.pathRegexp[0]"),
        ({"headerUp": "-Authorization"}, "spec.directives.headerUp"),
        ({"headerUp": ["-Authorization", 5]}, "spec.directives.headerUp[1]"),
        ({"rewrite": {"a": "b"}}, "spec.directives.rewrite"),
        ({"replace": "a b"}, "spec.directives.replace"),
        ({"method": "GE T"}, "spec.directives.method"),
        ({"method": 1}, "spec.directives.method"),
        ({"stripPathPrefix": "proxy"}, "spec.directives.stripPathPrefix"),
        ({"stripPathPrefix": ["/proxy"]}, "spec.directives.stripPathPrefix"),
        ({"stripPathSuffix": "a b"}, "spec.directives.stripPathSuffix"),
        ({"authProxy": "true"}, "spec.directives.authProxy"),
    ],
)
def test_directiveRejectionsNameTheIndex(directives: Dict[str, Any], field: str) -> None:
    rejected(reverseProxy(directives=directives), field)


def test_designShapeRuleRejectionsNameTheIndex() -> None:
    rejected(reverseProxy(rewrite=["/ok/* /fine{path}", "/a/* /b{nope}"]), "spec.rewrite[1]")
    rejected(reverseProxy(header={"up": ["Ok: 1"], "down": ["-"]}), "spec.header.down[0]")
    rejected(reverseProxy(header=["Foo: Bar"]), "spec.header", "must be an object")
    rejected(reverseProxy(rewrite="/a/* /b"), "spec.rewrite", "must be a list")


def test_directivesWrongType() -> None:
    rejected(reverseProxy(directives=["stripPathPrefix"]), "spec.directives", "must be an object")


def test_uriSubstringIsAnAliasOfReplace() -> None:
    assert accepted(reverseProxy(directives={"uriSubstring": ["/a /b"]})).obj.directives.replace == (
        ("/a", "/b"),
    )
    rejected(
        reverseProxy(directives={"replace": ["/a /b"], "uriSubstring": ["/c /d"]}),
        "spec.directives.uriSubstring",
        "same field",
    )
    both = {"replace": [], "uriSubstring": ["/a /b"]}  # an empty list is as good as unset
    assert accepted(reverseProxy(directives=both)).obj.directives.replace == (("/a", "/b"),)


def test_ignoredDirectivesAreNotesNotWarnings() -> None:
    raw = reverseProxy(
        directives={
            "wrapTransport": True,
            "rejectForwardingRedirects": True,
            "changeOrigin": True,
            "interceptRedirects": True,
        }
    )
    result = accepted(raw)
    assert result.warnings == ()
    for key in ("wrapTransport", "rejectForwardingRedirects", "changeOrigin", "interceptRedirects"):
        assert any(f"spec.directives.{key}: accepted and ignored" in n for n in result.notes), result.notes


# -- JSBundle (SPEC 1.4) ----------------------------------------------------------------------------------


SCRIPT = b'console.log("hello from a bundle");\n'


def test_jsBundleRawSingleEncoded() -> None:
    result = accepted(jsBundle(raw=b64(SCRIPT)))
    bundle = result.obj
    assert isinstance(bundle, JSBundle) and bundle.kind == "JSBundle"
    assert bundle.source == RawSource(SCRIPT)
    assert (bundle.link, bundle.linkDefaulted) == ("/dist/hello-world/index.js", True)
    assert result.warnings == () and result.notes == ()


def test_jsBundleRawDoubleEncoded() -> None:
    result = accepted(jsBundle(raw=b64(b64(SCRIPT).encode())))
    assert result.obj.source == RawSource(SCRIPT)
    assert any("decoded twice" in n for n in result.notes)


@pytest.mark.parametrize(
    "payload",
    [
        b"abc",  # shorter than one base64 quantum
        b"true",  # valid JS; decodes to bytes that are not UTF-8
        b"ABCD",  # all base64 letters, decodes to binary
        b"x = 1;",  # punctuation: never base64
        bytes(range(256)),  # binary data is kept as is
    ],
)
def test_jsBundleRawIsDecodedOnceWhenNotDoubleEncoded(payload: bytes) -> None:
    assert accepted(jsBundle(raw=b64(payload))).obj.source == RawSource(payload)


def test_jsBundleRawFromYAMLBinary() -> None:
    assert accepted(jsBundle(raw=SCRIPT)).obj.source == RawSource(SCRIPT)


@pytest.mark.parametrize(
    "raw, fragment", [("not base64!", "not valid base64"), (12, "base64 string"), (["x"], "base64 string")]
)
def test_jsBundleBadRaw(raw: Any, fragment: str) -> None:
    rejected(jsBundle(raw=raw), "spec.raw", fragment)


def test_jsBundleSources() -> None:
    cm = {"name": "cm", "key": "index.js", "namespace": "ns"}
    secret = {"name": "sec", "key": "bundle.js", "namespace": "ns2", "optional": False}
    assert accepted(jsBundle(rawFrom={"configMapKeyRef": cm})).obj.source == ConfigMapSource(
        "ns", "cm", "index.js"
    )
    assert accepted(jsBundle(rawFrom={"secretKeyRef": secret})).obj.source == SecretSource(
        "ns2", "sec", "bundle.js"
    )
    source = accepted(jsBundle(rawFrom={"url": "http://fe.ns.svc/dist/fe/index.js?v=2"})).obj.source
    assert source == EndpointSource(Endpoint("http", "fe.ns.svc", 80, "/dist/fe/index.js?v=2"))
    source = accepted(
        jsBundle(
            rawFrom={"service": {"namespace": "ns", "name": "fe", "path": "/index.js"}, "caBundle": CA_B64}
        )
    ).obj.source
    assert source == EndpointSource(
        Endpoint("https", "fe.ns.svc", 443, "/index.js", TLSSettings(caBundle=CA_PEM))
    )


@pytest.mark.parametrize(
    "spec, used, named",
    [
        (
            {
                "raw": b64(SCRIPT),
                "rawFrom": {"configMapKeyRef": {"name": "cm", "key": "k", "namespace": "ns"}},
            },
            RawSource(SCRIPT),
            ["spec.raw", "spec.rawFrom.configMapKeyRef"],
        ),
        (
            {
                "rawFrom": {
                    "url": "http://a.svc/index.js",
                    "secretKeyRef": {"name": "s", "key": "k", "namespace": "ns"},
                    "configMapKeyRef": {"name": "cm", "key": "k", "namespace": "ns"},
                }
            },
            ConfigMapSource("ns", "cm", "k"),
            ["spec.rawFrom.configMapKeyRef", "spec.rawFrom.secretKeyRef", "spec.rawFrom.url"],
        ),
        (
            {
                "rawFrom": {
                    "url": "http://a.svc/index.js",
                    "secretKeyRef": {"name": "s", "key": "k", "namespace": "ns"},
                }
            },
            SecretSource("ns", "s", "k"),
            ["spec.rawFrom.secretKeyRef", "spec.rawFrom.url"],
        ),
    ],
)
def test_jsBundleFirstSourceWinsWithAWarning(spec: Dict[str, Any], used: Any, named: List[str]) -> None:
    result = accepted(jsBundle(**spec))
    assert result.obj.source == used
    text = warned(result, "spec", "several sources")
    for field in named:
        assert field in text


@pytest.mark.parametrize(
    "spec, field, fragment",
    [
        ({"filenameOverride": "x.js"}, "spec", "no bundle source"),
        ({"rawFrom": {}}, "spec", "no bundle source"),
        ({"raw": ""}, "spec", "no bundle source"),
        ({"rawFrom": "http://a.svc/index.js"}, "spec.rawFrom", "must be an object"),
        ({"rawFrom": {"configMapKeyRef": "cm"}}, "spec.rawFrom.configMapKeyRef", "must be an object"),
        (
            {"rawFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
            "spec.rawFrom.configMapKeyRef.namespace",
            "required",
        ),
        (
            {"rawFrom": {"configMapKeyRef": {"name": "cm", "namespace": "n"}}},
            "spec.rawFrom.configMapKeyRef.key",
            "required",
        ),
        (
            {"rawFrom": {"secretKeyRef": {"key": "k", "namespace": "n"}}},
            "spec.rawFrom.secretKeyRef.name",
            "required",
        ),
        (
            {"rawFrom": {"secretKeyRef": {"name": "s", "key": "a/b", "namespace": "n"}}},
            "spec.rawFrom.secretKeyRef.key",
            "valid key",
        ),
        (
            {"rawFrom": {"configMapKeyRef": {"name": "CM", "key": "k", "namespace": "n"}}},
            "spec.rawFrom.configMapKeyRef.name",
            "DNS",
        ),
        (
            {"rawFrom": {"url": "http://a.svc", "service": {"namespace": "n", "name": "a"}}},
            "spec.rawFrom",
            "exactly one",
        ),
        ({"rawFrom": {"url": "gopher://a"}}, "spec.rawFrom.url", "http or https"),
        # An unused source must still be valid.
        (
            {"raw": b64(SCRIPT), "rawFrom": {"url": "gopher://a"}},
            "spec.rawFrom.url",
            "http or https",
        ),
        (
            {"raw": b64(SCRIPT), "filenameOverride": "../evil.js"},
            "spec.filenameOverride",
            "relative file path",
        ),
        ({"raw": b64(SCRIPT), "filenameOverride": "/abs.js"}, "spec.filenameOverride", "relative file path"),
        ({"raw": b64(SCRIPT), "filenameOverride": 5}, "spec.filenameOverride", "must be a string"),
    ],
)
def test_jsBundleRejections(spec: Dict[str, Any], field: str, fragment: str) -> None:
    rejected(jsBundle(**spec), field, fragment)


def test_jsBundleLink() -> None:
    source = {"raw": b64(SCRIPT)}
    explicit = accepted(jsBundle(status={"link": "/dist/employee-frontend/index.js"}, **source)).obj
    assert (explicit.link, explicit.linkDefaulted) == ("/dist/employee-frontend/index.js", False)
    override = accepted(jsBundle(filenameOverride="main.js", **source)).obj
    assert (override.link, override.linkDefaulted) == ("/dist/hello-world/main.js", True)
    raw = jsBundle(**source)
    raw["metadata"]["labels"] = {"kubesphere.io/extension-ref": "whizard-monitoring"}
    labelled = accepted(raw).obj
    assert labelled.link == "/dist/whizard-monitoring/index.js"


@pytest.mark.parametrize(
    "link, fragment",
    [
        ("dist/x/index.js", "absolute path"),
        ("/dist/x/index.js?v=1", "'?'"),
        ("/dist/x index.js", "whitespace"),
        ("/dist/../etc/passwd", "'..'"),
        ("/dist/%73hared/index.js", "write the character itself"),
        (7, "must be a string"),
    ],
)
def test_jsBundleBadStatusLink(link: Any, fragment: str) -> None:
    rejected(jsBundle(status={"link": link}, raw=b64(SCRIPT)), "status.link", fragment)


def test_jsBundleAssets() -> None:
    raw = jsBundle(
        raw=b64(SCRIPT),
        assets={
            "style": {"url": "http://fe.ns.svc/dist/style.css"},
            "files": [
                {"name": "logo.svg", "url": "http://fe.ns.svc/logo.svg", "mimeType": "image/svg+xml"},
                {
                    "link": "/dist/hello-world/locales/en.json",
                    "service": {"namespace": "ns", "name": "fe", "scheme": "http"},
                },
            ],
        },
    )
    assets = accepted(raw).obj.assets
    assert [(a.link, a.mimeType) for a in assets] == [
        ("/dist/hello-world/style.css", "text/css"),
        ("/dist/hello-world/logo.svg", "image/svg+xml"),
        ("/dist/hello-world/locales/en.json", None),
    ]
    assert assets[0].source == EndpointSource(Endpoint("http", "fe.ns.svc", 80, "/dist/style.css"))
    assert assets[2].source == EndpointSource(Endpoint("http", "fe.ns.svc", 80, ""))


@pytest.mark.parametrize(
    "assets, field, fragment",
    [
        ("x", "spec.assets", "must be an object"),
        ({"files": {"name": "a"}}, "spec.assets.files", "must be a list"),
        ({"files": [{"url": "http://a.svc/x"}]}, "spec.assets.files[0]", "needs a name"),
        ({"files": [{"name": "x.js"}]}, "spec.assets.files[0]", "one of"),
        (
            {"files": [{"name": "index.js", "url": "http://a.svc/x"}]},
            "spec.assets.files[0].link",
            "already used",
        ),
        (
            {
                "files": [
                    {"name": "a.js", "url": "http://a.svc/a"},
                    {"link": "/dist/hello-world/a.js", "url": "http://a.svc/b"},
                ]
            },
            "spec.assets.files[1].link",
            "already used",
        ),
        (
            {"files": [{"name": "a.js", "url": "http://a.svc/a", "mimeType": "javascript"}]},
            "spec.assets.files[0].mimeType",
            "media type",
        ),
        (
            {"style": {"link": "style.css", "url": "http://a.svc/s"}},
            "spec.assets.style.link",
            "absolute path",
        ),
        (
            {"style": {"url": "http://a.svc/s", "service": {"namespace": "n", "name": "a"}}},
            "spec.assets.style",
            "exactly one",
        ),
    ],
)
def test_jsBundleAssetRejections(assets: Any, field: str, fragment: str) -> None:
    rejected(jsBundle(raw=b64(SCRIPT), assets=assets), field, fragment)


# -- unknown fields ---------------------------------------------------------------------------------------


def test_unknownFieldsAreNotes() -> None:
    raw = reverseProxy(extra={"x": 1})
    raw["spec"]["upstream"]["timeoutSeconds"] = 3
    raw["somethingElse"] = True
    result = accepted(raw)
    assert result.warnings == ()
    assert any("spec.extra: unknown field" in n for n in result.notes), result.notes
    assert any("spec.upstream.timeoutSeconds: unknown field" in n for n in result.notes), result.notes
    assert any("somethingElse: unknown field" in n for n in result.notes), result.notes


def test_misplacedKnownKeyIsAWarning() -> None:
    # The shenyu quirk: "rawFrom:" repeated inside rawFrom.
    raw = jsBundle(
        rawFrom={"rawFrom": None, "configMapKeyRef": {"name": "cm", "key": "index.js", "namespace": "ns"}}
    )
    result = accepted(raw)
    text = warned(result, "spec.rawFrom.rawFrom", "repeated or mis-indented")
    assert text.startswith("JSBundle/hello-world: ")
    # Directives mis-indented under upstream have no effect: say so.
    result = accepted(reverseProxy(upstream={"url": "http://a.svc", "directives": {"stripPathPrefix": "/p"}}))
    warned(result, "spec.upstream.directives", "field of spec")
    assert result.obj.directives.stripPathPrefix is None


def test_nullMeansAbsent() -> None:
    raw = reverseProxy(directives=None, rewrite=None, header=None)
    raw["status"] = None
    raw["spec"]["upstream"].update(caBundle=None, insecureSkipVerify=None, healthCheck=None)
    proxy = accepted(raw).obj
    assert proxy.healthCheck is None and proxy.state is None and proxy.upstream.tls == TLSSettings()


# -- never raises -----------------------------------------------------------------------------------------


_ODD_VALUES: Tuple[Any, ...] = (
    None,
    0,
    -1,
    2**70,
    1.5,
    True,
    "",
    "x",
    "/",
    [],
    [None],
    [1, "a"],
    {},
    {"x": 1},
    {1: "x"},
    {None: None},
    b"\x00",
)


def _positions(value: Any, path: Tuple[Any, ...] = ()) -> Iterator[Tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key in value:
            yield from _positions(value[key], path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _positions(item, path + (index,))


def _replaced(document: Any, path: Tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copied = copy.deepcopy(document)
    target = copied
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copied


def _fullDocuments() -> List[Dict[str, Any]]:
    return [
        apiService(
            service={"namespace": "ns", "name": "api", "port": 8443, "path": "/p"},
            url=None,
            caBundle=CA_B64,
            nonResourceURLs=["/a", "/b/*"],
            healthCheck={"url": "/h", "interval": "5s", "timeout": "1s", "status": 200},
        ),
        reverseProxy(
            matcher=[{"path": "/a/*", "method": "GET"}],
            upstream={
                "backend": "https://a.svc",
                "caBudle": CA_B64_TWICE,
                "healthCheck": {"url": "/h"},
                "prependPath": True,
            },
            rewrite=["/a/* /b{path}"],
            header={"up": ["A: b"], "down": ["-C"]},
            directives={
                "headerUp": ["-Authorization"],
                "stripPathPrefix": "/a",
                "replace": ["/x /y"],
                "authProxy": True,
            },
        ),
        jsBundle(
            status={"link": "/dist/x/index.js", "state": "Available"},
            raw=b64(SCRIPT),
            rawFrom={
                "configMapKeyRef": {"name": "cm", "key": "k", "namespace": "ns"},
                "url": "http://a.svc/x.js",
            },
            assets={
                "style": {"url": "http://a.svc/s.css"},
                "files": [{"name": "a.svg", "url": "http://a.svc/a.svg"}],
            },
        ),
    ]


def _checkInvariant(result: Any) -> None:
    assert isinstance(result, ParseResult)
    outcomes = [result.obj is not None, result.rejection is not None, result.skipped is not None]
    assert outcomes.count(True) == 1, result
    if result.rejection is not None:
        assert "internal parser error" not in result.rejection.message, str(result.rejection)
    assert all(isinstance(w, str) for w in result.warnings)


def test_fuzzEveryPositionWithOddValues() -> None:
    for document in _fullDocuments():
        _checkInvariant(parseResource(document))
        assert parseResource(document).obj is not None
        for path in list(_positions(document)):
            for odd in _ODD_VALUES:
                _checkInvariant(parseResource(_replaced(document, path, odd)))


def test_fuzzRandomMutations() -> None:
    rng = random.Random(20240501)
    documents = _fullDocuments()
    for _ in range(400):
        document = copy.deepcopy(rng.choice(documents))
        for _ in range(rng.randint(1, 4)):
            paths = list(_positions(document))
            path = rng.choice(paths)
            choice = rng.random()
            if choice < 0.5:
                document = _replaced(document, path, rng.choice(_ODD_VALUES))
            elif path and choice < 0.8:
                parent = document
                for step in path[:-1]:
                    parent = parent[step]
                if isinstance(parent, dict):
                    del parent[path[-1]]
            elif path:
                # Wrap the value in a list or a mapping: right data, wrong shape.
                parent = document
                for step in path[:-1]:
                    parent = parent[step]
                parent[path[-1]] = [parent[path[-1]]] if rng.random() < 0.5 else {"value": parent[path[-1]]}
        _checkInvariant(parseResource(document))


def test_recursiveStructureDoesNotEscape() -> None:
    loop: Dict[str, Any] = {}
    loop["x"] = loop
    raw = reverseProxy(directives=loop)
    _checkInvariant(parseResource(raw))


def test_publicNames() -> None:
    assert parseModule.parseDuration is parseDuration
    assert set(parseModule.__all__) >= {"ParseResult", "parseResource", "parseDuration", "decodeBase64Pem"}


class TimeoutOverrideTests(SynchronousTestCase):
    """Per-upstream timeout overrides (ksproxy extension): spec.upstream.timeouts / APIService spec.timeouts."""

    def _rp(self, timeouts):  # type: ignore[no-untyped-def]
        return {
            "apiVersion": "extensions.kubesphere.io/v1alpha1",
            "kind": "ReverseProxy",
            "metadata": {"name": "t"},
            "spec": {"matcher": {"path": "/t/*"}, "upstream": {"url": "http://u", "timeouts": timeouts}},
        }

    def test_parsed(self) -> None:
        result = parseResource(self._rp({"connect": "2s", "idle": "1h"}))
        self.assertEqual(result.obj.timeouts, UpstreamTimeouts(connect=2.0, idle=3600.0))

    def test_apiService(self) -> None:
        raw = {
            "apiVersion": "extensions.kubesphere.io/v1alpha1",
            "kind": "APIService",
            "metadata": {"name": "v1.g.io"},
            "spec": {"group": "g.io", "version": "v1", "url": "http://u", "timeouts": {"responseHeader": "90s"}},
        }
        self.assertEqual(parseResource(raw).obj.timeouts, UpstreamTimeouts(responseHeader=90.0))

    def test_rejected(self) -> None:
        for bad, field in [({"connect": "soon"}, "spec.upstream.timeouts.connect"), ({"idle": "-1s"}, "spec.upstream.timeouts.idle")]:
            result = parseResource(self._rp(bad))
            self.assertIsNone(result.obj)
            self.assertEqual(result.rejection.field, field)
