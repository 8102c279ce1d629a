"""
The CustomResourceDefinitions in crds/: they are structural (as the API server requires), they accept every
manifest in examples/ and ../shared/examples-real/ that ksproxy accepts, the API server would prune nothing
ksproxy reads, and schema and model (L{ksproxy.model.parse.parseResource}) agree on a table of valid and
invalid objects: what the model rejects for a wrong type or shape, the schema rejects too.

The schemas are checked with jsonschema (Draft 4, the base of OpenAPI 3.0) plus the Kubernetes format
C{byte} (standard base64); C{x-kubernetes-*} keys are not JSON Schema and are checked by
L{structuralErrors} instead.  No API server runs here.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import glob
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRDS = os.path.join(ROOT, "crds")
EXAMPLES = os.path.join(ROOT, "examples")
REAL = os.path.normpath(os.path.join(ROOT, "..", "shared", "examples-real"))
GROUP = "extensions.kubesphere.io"
API_VERSION = f"{GROUP}/v1alpha1"


# -- loading ------------------------------------------------------------------------------------------------


def loadCRDs() -> Dict[str, Dict[str, Any]]:
    crds = {}
    for path in sorted(glob.glob(os.path.join(CRDS, "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    crds[doc["spec"]["names"]["kind"]] = doc
    return crds


CRD_BY_KIND = loadCRDs()


def schemaOf(kind: str) -> Dict[str, Any]:
    return CRD_BY_KIND[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _isByte(value: object) -> bool:
    """Kubernetes C{format: byte}: Go's base64.StdEncoding (padding required; CR/LF ignored)."""
    if not isinstance(value, str):
        return True
    try:
        base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _isDateTime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("byte")(_isByte)
FORMATS.checks("date-time")(_isDateTime)


def _dropNulls(value: Any, schema: Optional[Mapping[str, Any]]) -> Any:
    """The API server drops nulls of known, non-nullable fields before validating (and prunes unknown ones)."""
    if isinstance(value, dict) and schema is not None:
        props = schema.get("properties", {})
        return {
            k: _dropNulls(v, props.get(k))
            for k, v in value.items()
            if not (v is None and k in props and not props[k].get("nullable"))
        }
    if isinstance(value, list) and schema is not None:
        return [_dropNulls(v, schema.get("items")) for v in value]
    return value


def schemaErrors(obj: Mapping[str, Any]) -> List[str]:
    """Validation errors of one object against its kind's schema, as the API server would find them."""
    schema = schemaOf(obj["kind"])
    value = _dropNulls(copy.deepcopy(dict(obj)), schema)
    validator = jsonschema.Draft4Validator(schema, format_checker=FORMATS)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(value))


def prunedFields(value: Any, schema: Optional[Mapping[str, Any]], path: str = "") -> List[str]:
    """Field paths that the API server's pruning would drop (unknown fields outside preserve-unknown nodes)."""
    out: List[str] = []
    if schema is None:
        return out
    if isinstance(value, Mapping):
        props = schema.get("properties", {})
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in props:
                if not (path == "" and key == "metadata"):
                    out += prunedFields(item, props[key], where)
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += prunedFields(item, schema.get("items"), f"{path}[{index}]")
    return out


def documents(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    with open(path) as f:
        for index, doc in enumerate(yaml.safe_load_all(f)):
            if isinstance(doc, dict):
                yield f"{os.path.relpath(path, ROOT)}#{index}", doc


# -- structural schema rules --------------------------------------------------------------------------------

_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
_FORBIDDEN_IN_JUNCTORS = (
    "type", "description", "default", "additionalProperties", "nullable", "title",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
)
_UNSUPPORTED = ("$ref", "id", "definitions", "dependencies", "patternProperties", "additionalItems", "uniqueItems")


def structuralErrors(schema: Mapping[str, Any], path: str = "", level: str = "root") -> List[str]:
    """
    The rules of a structural schema (apiextensions-apiserver pkg/apiserver/schema/validation.go) that a
    hand-written schema can break: a type on every field and item (unless int-or-string or
    preserve-unknown-fields), none of type/description/default/... inside junctors, every field or item
    named in a junctor also specified outside, no unsupported keywords, properties xor additionalProperties.
    """
    errors: List[str] = []
    if not schema.get("type") and not schema.get("x-kubernetes-int-or-string") and not schema.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        errors.append(f"{path or '<root>'}: type must not be empty for {level}")
    if level == "root" and schema.get("type") != "object":
        errors.append("<root>: must be type object")
    if schema.get("type") == "array" and "items" not in schema:
        errors.append(f"{path}: items must be specified")
    if "properties" in schema and "additionalProperties" in schema:
        errors.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if schema.get("x-kubernetes-list-type") == "map":
        required = schema["items"].get("required", [])
        for key in schema.get("x-kubernetes-list-map-keys", []):
            if key not in required:
                errors.append(f"{path}: list map key {key} must be required")
    for key in _UNSUPPORTED:
        if key in schema:
            errors.append(f"{path}: {key} is not supported")
    for key, sub in schema.get("properties", {}).items():
        errors += structuralErrors(sub, f"{path}.properties.{key}", "field")
    if "items" in schema:
        errors += structuralErrors(schema["items"], f"{path}.items", "item")
    for junctor in _JUNCTORS:
        subs = schema.get(junctor)
        if subs is None:
            continue
        for index, sub in enumerate([subs] if junctor == "not" else subs):
            errors += _junctorErrors(sub, schema, f"{path}.{junctor}[{index}]")
    return errors


def _junctorErrors(sub: Mapping[str, Any], outside: Mapping[str, Any], path: str) -> List[str]:
    errors = [f"{path}: {key} is forbidden in a junctor" for key in _FORBIDDEN_IN_JUNCTORS if key in sub]
    for key in _UNSUPPORTED:
        if key in sub:
            errors.append(f"{path}: {key} is not supported")
    for key, prop in sub.get("properties", {}).items():
        if key not in outside.get("properties", {}):
            errors.append(f"{path}.properties.{key}: not specified outside the junctor")
        else:
            errors += _junctorErrors(prop, outside["properties"][key], f"{path}.properties.{key}")
    if "items" in sub:
        if "items" not in outside:
            errors.append(f"{path}.items: not specified outside the junctor")
        else:
            errors += _junctorErrors(sub["items"], outside["items"], f"{path}.items")
    for junctor in _JUNCTORS:
        subs = sub.get(junctor)
        if subs is not None:
            for index, nested in enumerate([subs] if junctor == "not" else subs):
                errors += _junctorErrors(nested, outside, f"{path}.{junctor}[{index}]")
    return errors


# -- the CRDs themselves ------------------------------------------------------------------------------------


PLURALS = {"APIService": "apiservices", "ReverseProxy": "reverseproxies", "JSBundle": "jsbundles"}


def test_threeKinds() -> None:
    assert sorted(CRD_BY_KIND) == ["APIService", "JSBundle", "ReverseProxy"]


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_definition(kind: str) -> None:
    """Group, version, cluster scope, names, printer columns; served and stored; no status subresource."""
    crd = CRD_BY_KIND[kind]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{PLURALS[kind]}.{GROUP}"
    spec = crd["spec"]
    assert spec["group"] == GROUP
    assert spec["scope"] == "Cluster"
    names = spec["names"]
    assert (names["plural"], names["singular"], names["listKind"]) == (PLURALS[kind], kind.lower(), kind + "List")
    assert names["shortNames"]
    assert "ksproxy" in names["categories"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert "subresources" not in version, "status must stay a normal field (SPEC 8)"
    assert "preserveUnknownFields" not in spec
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["State"]["jsonPath"] == ".status.state"
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    assert ("Link" if kind == "JSBundle" else "Upstream") in columns
    for column in columns.values():
        assert column["jsonPath"].startswith(".")
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert {"state", "conditions"} <= set(status["properties"])
    assert ("link" in status["properties"]) == (kind == "JSBundle")


def test_shortNamesUnique() -> None:
    seen = [n for crd in CRD_BY_KIND.values() for n in crd["spec"]["names"]["shortNames"]]
    assert len(seen) == len(set(seen))
    # Short names Kubernetes itself uses would be shadowed or shadow: keep clear of them.
    assert not set(seen) & {"svc", "rs", "rc", "sa", "ing", "ep", "cm", "ns", "po", "deploy", "ds", "sts"}


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_structural(kind: str) -> None:
    assert structuralErrors(schemaOf(kind)) == []


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_schemaIsValidJSONSchema(kind: str) -> None:
    jsonschema.Draft4Validator.check_schema(schemaOf(kind))


def test_structuralCheckerCatchesViolations() -> None:
    """The checker itself: each rule, broken once, is reported."""
    bad = {
        "type": "object",
        "properties": {
            "a": {"description": "no type"},
            "b": {"type": "string", "anyOf": [{"type": "string"}]},
            "c": {"type": "object", "anyOf": [{"properties": {"x": {"minLength": 1}}}]},
            "d": {"type": "array"},
            "e": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
        },
    }
    errors = "\n".join(structuralErrors(bad))
    for expected in (".properties.a: type must not be empty", "type is forbidden in a junctor",
                     "properties.x: not specified outside", ".properties.d: items must be specified",
                     "mutually exclusive"):
        assert expected in errors


# -- manifests ----------------------------------------------------------------------------------------------


def _ours(doc: Mapping[str, Any]) -> bool:
    return doc.get("apiVersion") == API_VERSION and doc.get("kind") in PLURALS


def _realFiles(folder: str = "") -> List[str]:
    return sorted(glob.glob(os.path.join(REAL, folder, "*.yaml")))


needsReal = pytest.mark.skipif(not os.path.isdir(REAL), reason="../shared/examples-real not present")


def test_examples() -> None:
    """Every resource of ours in examples/ validates and loses nothing to pruning."""
    if not os.path.isdir(EXAMPLES):
        pytest.skip("examples/ not present")
    checked = 0
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))):
        for where, doc in documents(path):
            if _ours(doc):
                assert schemaErrors(doc) == [], where
                assert prunedFields(doc, schemaOf(doc["kind"])) == [], where
                checked += 1
    assert checked > 0


@needsReal
def test_realTopLevel() -> None:
    """The 63 published manifests a v4 gateway must accept: valid, and nothing pruned."""
    checked = 0
    for path in _realFiles():
        for where, doc in documents(path):
            if _ours(doc):
                assert schemaErrors(doc) == [], where
                assert prunedFields(doc, schemaOf(doc["kind"])) == [], where
                checked += 1
    assert checked >= 63


@needsReal
def test_realQuirks() -> None:
    """
    Decision: both quirks are valid.  A state typo is kept (no enum on state, as in KubeSphere; ksproxy warns),
    and the repeated C{rawFrom:} key is an unknown field that the API server prunes (ksproxy warns).
    """
    pruned = {}
    for path in _realFiles("quirks"):
        for where, doc in documents(path):
            assert _ours(doc)
            assert schemaErrors(doc) == [], where
            pruned[os.path.basename(path)] = prunedFields(doc, schemaOf(doc["kind"]))
    assert pruned == {
        "ks-extensions__deepseek-charts-frontend-templates-jsbundle.yaml": [],
        "shenyu-kubesphere-ext__charts-frontend-templates-extensions.yaml": ["spec.rawFrom.rawFrom"],
    }


@needsReal
def test_realLegacy() -> None:
    """
    Design-document documents with our apiVersion validate, except the placeholder C{caBudle: <Base64Data>}:
    that is not base64, so C{format: byte} rejects it at exactly that field (the schema cannot know PEM; a
    base64 value that is not a CA bundle is rejected by ksproxy when it reads the object).  Documents with
    another apiVersion (kubesphere.io/v1alpha1) never reach our CRDs.
    """
    invalid = []
    valid = 0
    for path in _realFiles("legacy"):
        for where, doc in documents(path):
            if not _ours(doc):
                continue
            errors = schemaErrors(doc)
            if errors:
                assert doc["kind"] == "ReverseProxy", where
                assert all(e.startswith("spec.upstream.caBudle: ") for e in errors), errors
                assert doc["spec"]["upstream"]["caBudle"].startswith("<Base64"), where
                invalid.append(where)
            else:
                valid += 1
            assert prunedFields(doc, schemaOf(doc["kind"])) == [], where
    assert len(invalid) == 3
    assert valid >= 12


# -- agreement with the model -------------------------------------------------------------------------------


def _certificatePEM() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


CA = base64.b64encode(_certificatePEM()).decode()
NOT_PEM = base64.b64encode(b"hello, not a certificate").decode()
SCRIPT = base64.b64encode(b"export default {};").decode()


def obj(kind: str, spec: Any, name: str = "x", status: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    raw: Dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
    if status is not None:
        raw["status"] = status
    return raw


def api(**spec: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {"group": "demo.example.io", "version": "v1alpha1", "url": "https://demo.ns.svc"}
    base.update(spec)
    return obj("APIService", {k: v for k, v in base.items() if v is not DROP})


def rp(**spec: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {"matcher": {"path": "/p/*", "method": "GET"}, "upstream": {"url": "http://up:8080"}}
    base.update(spec)
    return obj("ReverseProxy", {k: v for k, v in base.items() if v is not DROP})


def up(**upstream: Any) -> Dict[str, Any]:
    return rp(upstream=upstream)


def jsb(**spec: Any) -> Dict[str, Any]:
    return obj("JSBundle", spec)


DROP = object()
CM = {"namespace": "ns", "name": "cm", "key": "index.js"}

# Accepted by both.
VALID: List[Tuple[str, Dict[str, Any]]] = [
    ("apiservice url", api()),
    ("apiservice endpoint alias", api(url=DROP, endpoint="http://demo.ns.svc:8080")),
    ("apiservice service", api(url=DROP, service={"namespace": "ns", "name": "svc", "port": 8443})),
    ("apiservice service scheme http", api(url=DROP, service={"namespace": "ns", "name": "s", "scheme": "http"})),
    ("apiservice nonResourceURLs", api(nonResourceURLs=["/healthz", "/metrics*"])),
    ("apiservice empty url with service", api(url="", service={"namespace": "ns", "name": "s"})),
    ("apiservice caBundle", api(caBundle=CA)),
    ("apiservice double-encoded caBundle", api(caBundle=base64.b64encode(CA.encode()).decode())),
    ("apiservice insecure", api(insecureSkipTLSVerify=True)),
    ("apiservice health durations", api(healthCheck={"url": "/healthz", "interval": "15s", "timeout": "1.5s"})),
    ("apiservice health numbers", api(healthCheck={"interval": 10, "timeout": 2.5, "status": 204, "fall": 2})),
    ("apiservice status", obj("APIService", api()["spec"], status={"state": "Available", "enabled": True})),
    ("apiservice unknown state", obj("APIService", api()["spec"], status={"state": "Availablea"})),
    ("proxy 4.x shape", rp(directives={"stripPathPrefix": "/p", "headerUp": ["X-A: 1"], "authProxy": True})),
    ("proxy design shape", rp(matcher=[{"path": "/a/*", "method": "GET"}, {"path": "/b"}],
                              upstream={"backend": "https://b.ns.svc", "caBudle": CA,
                                        "healthCheck": {"url": "/healthz", "interval": "15s"}},
                              rewrite=["/a/* /new{path}"], header={"up": ["Foo: Bar"], "down": ["-Server"]})),
    ("proxy method default", rp(matcher={"path": "/exact"})),
    ("proxy lower-case method", rp(matcher={"path": "/x", "method": "get"})),
    ("proxy spec healthCheck", rp(healthCheck={"url": "/", "interval": "5s"})),
    ("proxy service upstream", up(service={"namespace": "ns", "name": "s", "port": 80, "path": "/base"},
                                  prependPath=True)),
    ("proxy all directives", rp(directives={
        "method": "POST", "stripPathPrefix": "/p", "stripPathSuffix": ".json", "headerUp": ["+X-A b"],
        "headerDown": ["-X-Internal*"], "rewrite": ["/p/* /q{path}"], "replace": ["a b"],
        "pathRegexp": ["^/p/(.*) /$1"], "authProxy": False, "wrapTransport": True,
        "rejectForwardingRedirects": True})),
    ("proxy uriSubstring", rp(directives={"uriSubstring": ["a b"]})),
    ("bundle raw", jsb(raw=SCRIPT)),
    ("bundle configMapKeyRef", jsb(rawFrom={"configMapKeyRef": CM})),
    ("bundle secretKeyRef", jsb(rawFrom={"secretKeyRef": dict(CM, optional=True)})),
    ("bundle url", jsb(rawFrom={"url": "https://fe.ns.svc/dist/index.js?v=1", "caBundle": CA})),
    ("bundle service", jsb(rawFrom={"service": {"namespace": "ns", "name": "fe", "path": "/index.js"}})),
    ("bundle raw and rawFrom", jsb(raw=SCRIPT, rawFrom={"url": "http://fe"})),
    ("bundle filenameOverride and assets", jsb(raw=SCRIPT, filenameOverride="main.js", assets={
        "style": {"url": "http://fe/style.css"},
        "files": [{"name": "logo.svg", "url": "http://fe/logo.svg", "mimeType": "image/svg+xml"},
                  {"link": "/dist/x/font.woff", "service": {"namespace": "ns", "name": "fe"}}]})),
    ("bundle status link", obj("JSBundle", {"raw": SCRIPT}, status={"link": "/dist/x/index.js",
                                                                      "state": "Disabled"})),
    ("null optional fields", jsb(raw=SCRIPT, rawFrom=None, filenameOverride=None)),
]

# Rejected by both: wrong types and shapes, missing required fields, exclusive fields.
INVALID: List[Tuple[str, Dict[str, Any]]] = [
    ("no spec", {"apiVersion": API_VERSION, "kind": "APIService", "metadata": {"name": "x"}}),
    ("spec not an object", obj("JSBundle", "raw")),
    ("apiservice group missing", api(group=DROP)),
    ("apiservice group not a string", api(group=5)),
    ("apiservice group upper-case", api(group="Demo.io")),
    ("apiservice version not a label", api(version="v1.0")),
    ("apiservice url not a string", api(url=5)),
    ("apiservice url scheme", api(url="ftp://x")),
    ("apiservice url and service", api(service={"namespace": "ns", "name": "s"})),
    ("apiservice url and endpoint", api(endpoint="http://other")),
    ("apiservice no upstream", api(url=DROP)),
    ("apiservice port a string", api(url=DROP, service={"namespace": "ns", "name": "s", "port": "443"})),
    ("apiservice port 0", api(url=DROP, service={"namespace": "ns", "name": "s", "port": 0})),
    ("apiservice port too big", api(url=DROP, service={"namespace": "ns", "name": "s", "port": 70000})),
    ("apiservice service without name", api(url=DROP, service={"namespace": "ns"})),
    ("apiservice service scheme", api(url=DROP, service={"namespace": "ns", "name": "s", "scheme": "ftp"})),
    ("apiservice nonResourceURLs a string", api(nonResourceURLs="/healthz")),
    ("apiservice nonResourceURLs item", api(nonResourceURLs=[5])),
    ("apiservice insecure a string", api(insecureSkipVerify="true")),
    ("apiservice caBundle not base64", api(caBundle="<Base64Data>")),
    ("apiservice caBundle a number", api(caBundle=5)),
    ("health status a string", api(healthCheck={"status": "200"})),
    ("health status out of range", api(healthCheck={"status": 1000})),
    ("health interval a boolean", api(healthCheck={"interval": True})),
    ("health interval an object", api(healthCheck={"interval": {"seconds": 1}})),
    ("health interval a list", api(healthCheck={"interval": ["1s"]})),
    ("health fall zero", api(healthCheck={"fall": 0})),
    ("health not an object", api(healthCheck="/healthz")),
    ("status state a number", obj("APIService", api()["spec"], status={"state": 1})),
    ("status enabled a string", obj("APIService", api()["spec"], status={"enabled": "no"})),
    ("status not an object", obj("APIService", api()["spec"], status="Available")),
    ("matcher missing", rp(matcher=DROP)),
    ("matcher a string", rp(matcher="/p/*")),
    ("matcher a number", rp(matcher=5)),
    ("matcher a boolean", rp(matcher=True)),
    ("matcher empty list", rp(matcher=[])),
    ("matcher without path", rp(matcher={"method": "GET"})),
    ("matcher list item without path", rp(matcher=[{"method": "GET"}])),
    ("matcher list item a string", rp(matcher=[{"path": "/a"}, "/b"])),
    ("matcher path a number", rp(matcher={"path": 5})),
    ("matcher path relative", rp(matcher={"path": "p/*"})),
    ("matcher method a list", rp(matcher={"path": "/p", "method": ["GET"]})),
    ("upstream missing", rp(upstream=DROP)),
    ("upstream a string", rp(upstream="http://up")),
    ("upstream empty", up()),
    ("upstream url and backend", up(url="http://a", backend="http://b")),
    ("upstream url and service", up(url="http://a", service={"namespace": "ns", "name": "s"})),
    ("upstream caBundle and caBudle", up(url="https://a", caBundle=CA, caBudle=CA)),
    ("upstream prependPath a string", up(url="http://a", prependPath="yes")),
    ("two health checks", rp(upstream={"url": "http://a", "healthCheck": {}}, healthCheck={})),
    ("directives a list", rp(directives=["stripPathPrefix /p"])),
    ("headerUp a string", rp(directives={"headerUp": "X-A: 1"})),
    ("headerDown item a number", rp(directives={"headerDown": [1]})),
    ("authProxy a string", rp(directives={"authProxy": "true"})),
    ("method a number", rp(directives={"method": 1})),
    ("header a list", rp(header=["Foo: Bar"])),
    ("header.up item a number", rp(header={"up": [5]})),
    ("rewrite a string", rp(rewrite="/a /b")),
    ("bundle no source", jsb(filenameOverride="x.js")),
    ("bundle empty rawFrom", jsb(rawFrom={})),
    ("bundle raw a number", jsb(raw=5)),
    ("bundle raw not base64", jsb(raw="export default {};")),
    ("bundle rawFrom a string", jsb(rawFrom="http://fe")),
    ("bundle keyRef without key", jsb(rawFrom={"configMapKeyRef": {"namespace": "ns", "name": "cm"}})),
    ("bundle keyRef without namespace", jsb(rawFrom={"secretKeyRef": {"name": "s", "key": "k"}})),
    ("bundle keyRef name a number", jsb(rawFrom={"configMapKeyRef": dict(CM, name=5)})),
    ("bundle keyRef namespace invalid", jsb(rawFrom={"configMapKeyRef": dict(CM, namespace="Not_A_Label")})),
    ("bundle rawFrom url and service", jsb(rawFrom={"url": "http://fe", "service": {"namespace": "n", "name": "s"}})),
    ("bundle filenameOverride a number", jsb(raw=SCRIPT, filenameOverride=5)),
    ("bundle assets a list", jsb(raw=SCRIPT, assets=[])),
    ("bundle files an object", jsb(raw=SCRIPT, assets={"files": {"name": "a"}})),
    ("bundle file without upstream", jsb(raw=SCRIPT, assets={"files": [{"name": "a.css"}]})),
    ("bundle style without upstream", jsb(raw=SCRIPT, assets={"style": {"link": "/dist/x/s.css"}})),
    ("bundle status link a number", obj("JSBundle", {"raw": SCRIPT}, status={"link": 5})),
]

# Accepted by the schema, rejected by ksproxy: what a schema cannot know.  Listed so the boundary is explicit.
SEMANTIC: List[Tuple[str, Dict[str, Any]]] = [
    ("caBundle base64 but not PEM", api(caBundle=NOT_PEM)),
    ("caBundle with insecureSkipVerify", api(caBundle=CA, insecureSkipVerify=True)),
    ("insecure spellings contradict", api(insecureSkipVerify=True, insecureSkipTLSVerify=False)),
    ("url without host", api(url="https://")),
    ("url with a bad host", api(url="http://bad_host name")),
    ("invalid regexp", rp(directives={"pathRegexp": ["([ x /y"]})),
    ("unknown placeholder", rp(directives={"rewrite": ["/a/* /b{nope}"]})),
    ("header rule with CR/LF", rp(directives={"headerUp": ["X-A: a\r\nX-B: b"]})),
    ("replace and uriSubstring", rp(directives={"replace": ["a b"], "uriSubstring": ["c d"]})),
    ("health interval not a duration", api(healthCheck={"interval": "10 seconds"})),
    ("bundle link relative", obj("JSBundle", {"raw": SCRIPT}, status={"link": "dist/x.js"})),
]


def _model() -> Any:
    parse = pytest.importorskip("ksproxy.model.parse")
    return parse.parseResource


def _names(cases: List[Tuple[str, Dict[str, Any]]]) -> List[str]:
    return [name for name, _ in cases]


def test_casesAreDistinct() -> None:
    for cases in (VALID, INVALID, SEMANTIC):
        assert len(set(_names(cases))) == len(cases)


@pytest.mark.parametrize("name,raw", VALID, ids=_names(VALID))
def test_bothAccept(name: str, raw: Dict[str, Any]) -> None:
    result = _model()(raw)
    assert result.rejection is None and result.skipped is None, result.rejection
    assert schemaErrors(raw) == []
    assert prunedFields(raw, schemaOf(raw["kind"])) == []


@pytest.mark.parametrize("name,raw", INVALID, ids=_names(INVALID))
def test_bothReject(name: str, raw: Dict[str, Any]) -> None:
    result = _model()(raw)
    assert result.rejection is not None, f"the model accepts {name}"
    assert schemaErrors(raw) != [], f"the schema accepts {name}"


@pytest.mark.parametrize("name,raw", SEMANTIC, ids=_names(SEMANTIC))
def test_onlyTheModelRejects(name: str, raw: Dict[str, Any]) -> None:
    result = _model()(raw)
    assert result.rejection is not None, f"the model accepts {name}"
    assert schemaErrors(raw) == []


@needsReal
def test_modelAcceptedRealManifestsAreSchemaValid() -> None:
    """Whatever ksproxy accepts among the real manifests, the API server accepts too."""
    parseResource = _model()
    checked = 0
    for path in _realFiles() + _realFiles("quirks") + _realFiles("legacy"):
        for where, doc in documents(path):
            result = parseResource(doc)
            if result.obj is not None:
                assert schemaErrors(doc) == [], where
                checked += 1
            elif _ours(doc) and result.rejection is not None:
                assert schemaErrors(doc) != [] or "caBudle" in result.rejection.field, where
    assert checked >= 70


# -- deploy/ ------------------------------------------------------------------------------------------------

DEPLOY = os.path.join(ROOT, "deploy")
POD_LABELS = {"app.kubernetes.io/name": "ksproxy", "app.kubernetes.io/component": "gateway"}


def deployObjects() -> Dict[Tuple[str, str], Dict[str, Any]]:
    objects = {}
    for path in sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))):
        for where, doc in documents(path):
            assert doc.get("apiVersion") and doc.get("kind"), where
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], where
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kustomizationListsEveryManifest() -> None:
    with open(os.path.join(DEPLOY, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "ksproxy-system"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert os.path.isfile(os.path.join(DEPLOY, name)), name
    present = {os.path.basename(p) for p in glob.glob(os.path.join(DEPLOY, "*.yaml"))} - {"kustomization.yaml"}
    assert set(listed) == present
    images = {i["name"] for i in kustomization["images"]}
    assert "ksproxy" in images


def test_namespacedObjectsInOurNamespace() -> None:
    for (kind, name), doc in deployObjects().items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace") == "ksproxy-system", (kind, name)


def _rules(doc: Mapping[str, Any]) -> set:
    out = set()
    for rule in doc["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb, tuple(rule.get("resourceNames", ()))))
    return out


def test_rbacExactlyWhatKsproxyUses() -> None:
    objects = deployObjects()
    expected = {(GROUP, r, v, ()) for r in PLURALS.values() for v in ("get", "list", "watch", "patch")}
    expected |= {("", r, v, ()) for r in ("configmaps", "secrets") for v in ("get", "list", "watch")}
    expected |= {("authentication.k8s.io", "tokenreviews", "create", ()),
                 ("authorization.k8s.io", "subjectaccessreviews", "create", ())}
    assert _rules(objects[("ClusterRole", "ksproxy")]) == expected
    assert _rules(objects[("Role", "ksproxy-leader-election")]) == {
        ("coordination.k8s.io", "leases", "get", ("ksproxy",)),
        ("coordination.k8s.io", "leases", "update", ("ksproxy",)),
        ("coordination.k8s.io", "leases", "create", ()),
    }
    for kind, name, roleKind, roleName in (
        ("ClusterRoleBinding", "ksproxy", "ClusterRole", "ksproxy"),
        ("RoleBinding", "ksproxy-leader-election", "Role", "ksproxy-leader-election"),
    ):
        binding = objects[(kind, name)]
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) == (roleKind, roleName)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ksproxy", "namespace": "ksproxy-system"}]
    assert ("ServiceAccount", "ksproxy") in objects


def test_deployment() -> None:
    from ksproxy.model._fields import parseDuration
    from ksproxy.tap import RunOptions

    objects = deployObjects()
    deployment = objects[("Deployment", "ksproxy")]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == POD_LABELS
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"] == POD_LABELS
    assert pod["serviceAccountName"] == "ksproxy"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    assert container["command"] == [
        "twistd", "-n", "--pidfile=", "--reactor=ksproxy", "ksproxy", "run", "--listen", "tcp:8080",
        "--admin-listen", "tcp:9090:interface=0.0.0.0", "--source", "kubernetes",
    ]
    # The command parses with ksproxy's own options.
    options = RunOptions()
    options.parseOptions(container["command"][6:])
    assert options["source"] == "kubernetes"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert set(container["resources"]["limits"]) >= {"memory"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    grace = parseDuration(options["drain-grace"]) if isinstance(options["drain-grace"], str) else options["drain-grace"]
    preStop = 5
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(preStop)]
    assert pod["terminationGracePeriodSeconds"] > grace + preStop
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"


def test_serviceAndBudgetSelectPods() -> None:
    objects = deployObjects()
    service = objects[("Service", "ksproxy")]
    assert service["spec"]["selector"] == POD_LABELS
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", "http")]
    pdb = objects[("PodDisruptionBudget", "ksproxy")]
    assert pdb["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert pdb["spec"]["minAvailable"] == 1  # one of the two replicas may go at a time
    assert objects[("Namespace", "ksproxy-system")]["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "restricted"


def test_systemdUnit() -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    with open(os.path.join(DEPLOY, "ksproxy.service")) as f:
        unit.read_file(f)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    command = unit["Service"]["ExecStart"].split()
    assert command[0].endswith("/twistd") and command[1:5] == ["-n", "--pidfile=", "--reactor=ksproxy", "ksproxy"]
    assert command[command.index("--source") + 1] == "dir:/etc/ksproxy/manifests"
    from ksproxy.tap import RunOptions

    RunOptions().parseOptions(command[6:])
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert int(unit["Service"]["TimeoutStopSec"]) > 25
    assert unit["Service"]["NoNewPrivileges"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_containerfile() -> None:
    with open(os.path.join(DEPLOY, "Containerfile")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    base = [line for line in lines if line.startswith("FROM ")]
    assert len(base) == 1 and "python:" in base[0] and base[0].endswith("-slim")
    assert any(line.startswith("RUN pip install .") for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    copied = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    for sources in copied:
        for source in sources:
            assert os.path.exists(os.path.join(ROOT, source)), source


def test_statusWeWriteIsValid() -> None:
    """Whatever ksproxy's status writer puts on an object passes the schema (conditions, link, state)."""
    from ksproxy.model.types import Rejection
    from ksproxy.status import desiredStatus, rfc3339, statusPatch

    rejection = Rejection("JSBundle", "x", "spec.raw", "not a script")
    variants = [
        dict(accepted=None, conflict=None, refsError=None, programmed=True, upstreamHealthy=True),
        dict(accepted=rejection, conflict=None, refsError=None, programmed=False, upstreamHealthy=None),
        dict(accepted=None, conflict="JSBundle/y", refsError=None, programmed=True, upstreamHealthy=False),
        dict(accepted=None, conflict=None, refsError="ConfigMap ns/cm: not found", programmed=False,
             upstreamHealthy=None),
    ]
    for kind, raw in (("JSBundle", jsb(raw=SCRIPT)), ("ReverseProxy", rp()), ("APIService", api())):
        for args in variants:
            desired = desiredStatus(raw, defaultedLink="/dist/x/index.js" if kind == "JSBundle" else None,
                                    manageState=True, stateGate=True, **args)
            patch = statusPatch(raw, desired, rfc3339(1704067200))
            assert patch is not None
            written = dict(raw, status=patch["status"])
            assert schemaErrors(written) == [], (kind, args)
