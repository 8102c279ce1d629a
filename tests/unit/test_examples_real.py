"""
The published KubeSphere manifests in ../shared/examples-real (relative to the repository root) behave as
that folder's README says: top-level documents are accepted, quirks are accepted with warnings, legacy
documents load except a CA-bundle placeholder, other apiVersions are skipped, and invalid/ is not YAML.
Where the authors' intent is checkable on the model (paths, upstreams, links), it is checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Tuple

import pytest
import yaml

from ksproxy.model.parse import ParseResult, parseResource
from ksproxy.model.types import (
    API_VERSION,
    KINDS,
    APIService,
    ConfigMapSource,
    Endpoint,
    EndpointSource,
    JSBundle,
    Matcher,
    ReverseProxy,
)

EXAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "examples-real"

pytestmark = pytest.mark.skipif(
    not EXAMPLES.is_dir(), reason=f"the real-manifest examples are not present at {EXAMPLES}"
)


def _documents(path: Path) -> List[Any]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _ours(document: Any) -> bool:
    return (
        isinstance(document, Mapping)
        and document.get("apiVersion") == API_VERSION
        and document.get("kind") in KINDS
    )


def _parsed(folder: Path) -> Iterator[Tuple[Path, Any, ParseResult]]:
    for path in sorted(folder.glob("*.yaml")):
        for document in _documents(path):
            yield path, document, parseResource(document)


def test_topLevelDocumentsOfOurKindsAreAccepted() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 60, f"expected the 63 top-level example files, found {len(files)}"
    failures, warnings, seen = [], [], 0
    for path, document, result in _parsed(EXAMPLES):
        if _ours(document):
            seen += 1
            if result.obj is None:
                failures.append(f"{path.name}: {result.rejection or result.skipped}")
            warnings.extend(f"{path.name}: {w}" for w in result.warnings)
        else:
            assert result.skipped is not None, (
                f"{path.name}: {document.get('kind')} was not skipped: {result}"
            )
    print("\n".join(failures))
    assert not failures, "\n".join(failures)
    assert seen >= 60
    # The only thing worth a warning at the top level is a namespace on a cluster-scoped kind.
    assert all(": metadata.namespace: " in w for w in warnings), "\n".join(warnings)
    assert any("devops-js-bundle" in w for w in warnings)


def test_otherKindsOfOurGroupAreSkipped() -> None:
    path = (
        EXAMPLES
        / "dev-guide__sites-extension-dev-guide-content-en-feature-customization-extending-ui-_index.yaml"
    )
    results = [parseResource(d) for d in _documents(path)]
    entries = [r for r in results if r.kind == "ExtensionEntry"]
    assert len(entries) == 1
    assert entries[0].skipped == "kind ExtensionEntry is not served by ksproxy"


def _byName(fileName: str, kind: str, name: str) -> Any:
    for document in _documents(EXAMPLES / fileName):
        result = parseResource(document)
        if result.kind == kind and result.name == name:
            assert result.obj is not None, str(result.rejection)
            return result.obj
    raise AssertionError(f"{kind}/{name} not found in {fileName}")


def _grafana(proxy: ReverseProxy) -> None:
    assert proxy.matchers == (Matcher("/proxy/grafana/*", "*"),)
    assert proxy.directives.stripPathPrefix == "/proxy/grafana"
    assert proxy.upstream == Endpoint("http", "grafana.extension-grafana.svc", 80, "")
    assert proxy.upstream.origin == "http://grafana.extension-grafana.svc"
    assert [(r.op, r.name) for r in proxy.directives.headerUp] == [
        ("delete", "authorization"),
        ("add", "x-webauth-user"),
    ]
    assert proxy.upstreamPathPrefix is False and proxy.state == "Available"


def _holmes(proxy: ReverseProxy) -> None:
    assert proxy.matchers == (Matcher("/proxy/holmesgpt.dev/*", "*"),)
    assert proxy.directives.stripPathPrefix == "/proxy/holmesgpt.dev"
    assert proxy.upstream == Endpoint("http", "holmesgpt-holmes.extension-holmesgpt.svc", 80, "")


def _shenyu(proxy: ReverseProxy) -> None:
    # stripPathPrefix is commented out: the upstream receives the full /proxy/shenyu/... path.
    assert proxy.matchers == (Matcher("/proxy/shenyu/*", "*"),)
    assert proxy.directives.stripPathPrefix is None
    assert proxy.upstream == Endpoint("http", "shenyu-admin.extension-shenyu", 9095, "")


def _prometheus(proxy: ReverseProxy) -> None:
    assert proxy.matchers == (Matcher("/proxy/prometheus.io/*", "*"),)
    assert proxy.upstream == Endpoint("http", "prometheus-k8s.kubesphere-monitoring-system.svc", 9090, "")
    assert proxy.meta.labels["kubesphere.io/extension-ref"] == "whizard-monitoring"


def _rawIP(proxy: ReverseProxy) -> None:
    assert proxy.upstream == Endpoint("http", "10.8.0.2", 80, "")
    assert proxy.matchers == (Matcher("/proxy/abc/*", "*"),)


def _employeeAPI(api: APIService) -> None:
    assert (api.group, api.version) == ("employee.kubesphere.io", "v1alpha1")
    assert api.endpoint == Endpoint("http", "employee-api.default.svc", 8080, "")


def _devopsAPI(api: APIService) -> None:
    assert (api.group, api.version) == ("devops.kubesphere.io", "v1alpha3")
    assert api.endpoint.origin == "http://devops-apiserver.kubesphere-devops-system.svc:9090"


def _kubeedgeAPI(api: APIService) -> None:
    assert (api.group, api.version) == ("kubeedge.kubesphere.io", "v1beta1")
    assert api.endpoint == Endpoint("http", "kubeedge-proxy.kubeedge.svc", 80, "")


def _grafanaBundle(bundle: JSBundle) -> None:
    assert bundle.source == ConfigMapSource("extension-grafana", "grafana-extension-ui", "index.js")
    assert (bundle.link, bundle.linkDefaulted) == ("/dist/grafana/index.js", False)


def _employeeBundle(bundle: JSBundle) -> None:
    endpoint = Endpoint("http", "employee-frontend.default.svc", 80, "/dist/employee-frontend/index.js")
    assert bundle.source == EndpointSource(endpoint)
    assert bundle.link == "/dist/employee-frontend/index.js"


def _openpitrixBundle(bundle: JSBundle) -> None:
    # No status block and no extension-ref label: the link defaults to /dist/<name>/index.js.
    assert (bundle.link, bundle.linkDefaulted) == ("/dist/openpitrix-apps-js-bundle/index.js", True)
    assert bundle.state is None


def _fluidBundle(bundle: JSBundle) -> None:
    path = "/zmrlft/fluid-ks-extension/refs/heads/main/deploy/frontend-dist/index.js"
    assert bundle.source == EndpointSource(Endpoint("https", "raw.githubusercontent.com", 443, path))
    assert bundle.linkDefaulted is True and bundle.link == "/dist/fluid-ui/index.js"


def _devopsBundle(bundle: JSBundle) -> None:
    assert bundle.source == ConfigMapSource("kubesphere-devops-system", "devops-frontend", "index.js")
    assert bundle.link == "/dist/devops-frontend/index.js"


INTENT: List[Tuple[str, str, str, Callable[[Any], None]]] = [
    (
        "extension-samples__extensions-grafana-ext-charts-backend-templates-reverseproxy.yaml",
        "ReverseProxy",
        "grafana",
        _grafana,
    ),
    (
        "ai-labs__extensions-holmesgpt-config-holmesgpt-charts-holmesgpt-frontend-templates-reverseproxy.yaml",
        "ReverseProxy",
        "holmesgpt",
        _holmes,
    ),
    (
        "shenyu-kubesphere-ext__charts-shenyu-templates-extensions.yaml",
        "ReverseProxy",
        "shenyu-scope",
        _shenyu,
    ),
    ("unidentified__whizard-oauth2-proxy-cross-cluster-doc.yaml", "ReverseProxy", "prometheus", _prometheus),
    (
        "dev-guide__sites-extension-dev-guide-content-zh-Integration-scenario-_index.yaml",
        "ReverseProxy",
        "weave.works",
        _rawIP,
    ),
    (
        "extension-samples__extensions-backend-employee-employee-apiservice.yaml",
        "APIService",
        "v1alpha1.employee.kubesphere.io",
        _employeeAPI,
    ),
    (
        "ks-extensions__devops-charts-agent-templates-extensions.yaml",
        "APIService",
        "v1alpha3.devops.kubesphere.io",
        _devopsAPI,
    ),
    (
        "ks-extensions__kubeedge-charts-cloudcore-templates-apiservices.yaml",
        "APIService",
        "v1beta1.kubeedge.kubesphere.io",
        _kubeedgeAPI,
    ),
    (
        "extension-samples__extensions-grafana-ext-charts-frontend-templates-jsbundle.yaml",
        "JSBundle",
        "grafana",
        _grafanaBundle,
    ),
    (
        "extension-samples__extensions-frontend-extensions-employee-employee-jsbundle.yaml",
        "JSBundle",
        "v1alpha1.employee.kubesphere.io",
        _employeeBundle,
    ),
    (
        "ks-extensions__openpitrix-charts-apps-templates-extensions.yaml",
        "JSBundle",
        "openpitrix-apps-js-bundle",
        _openpitrixBundle,
    ),
    (
        "fluid-ks-extension__deploy-helm-fluid-charts-frontend-templates-jsbundle.yaml",
        "JSBundle",
        "fluid-ui",
        _fluidBundle,
    ),
    (
        "ks-extensions__devops-charts-extension-templates-extensions.yaml",
        "JSBundle",
        "devops-js-bundle",
        _devopsBundle,
    ),
]


@pytest.mark.parametrize("fileName, kind, name, check", INTENT, ids=[f"{k}/{n}" for _, k, n, _ in INTENT])
def test_routesAsTheAuthorsIntended(
    fileName: str, kind: str, name: str, check: Callable[[Any], None]
) -> None:
    check(_byName(fileName, kind, name))


# -- quirks/ ------------------------------------------------------------------------------------------------


def test_quirkStateTypoIsAcceptedWithAWarning() -> None:
    (document,) = _documents(
        EXAMPLES / "quirks" / "ks-extensions__deepseek-charts-frontend-templates-jsbundle.yaml"
    )
    result = parseResource(document)
    assert isinstance(result.obj, JSBundle)
    assert result.obj.state == "Availablea"  # kept as written; the state gate decides what it means
    assert result.obj.link == "/dist/deepseek/index.js"
    assert [w for w in result.warnings if "status.state" in w and "Availablea" in w], result.warnings


def test_quirkRepeatedRawFromIsAcceptedWithAWarning() -> None:
    (document,) = _documents(
        EXAMPLES / "quirks" / "shenyu-kubesphere-ext__charts-frontend-templates-extensions.yaml"
    )
    result = parseResource(document)
    assert isinstance(result.obj, JSBundle)
    assert result.obj.source == ConfigMapSource("extension-shenyu", "shenyu-frontend-ks-frontend", "index.js")
    assert [w for w in result.warnings if "spec.rawFrom.rawFrom" in w], result.warnings


def test_everyQuirkIsAcceptedWithAWarning() -> None:
    for path, _document, result in _parsed(EXAMPLES / "quirks"):
        assert result.obj is not None, f"{path.name}: {result.rejection}"
        assert result.warnings, f"{path.name}: accepted without the expected warning"


# -- legacy/ ------------------------------------------------------------------------------------------------


def _caBudlePlaceholder(document: Mapping[str, Any]) -> bool:
    upstream = (document.get("spec") or {}).get("upstream") or {}
    value = upstream.get("caBudle")
    return isinstance(value, str) and value.startswith("<")


def test_legacyDocuments() -> None:
    outcomes: Dict[str, int] = {"accepted": 0, "rejected": 0, "skipped": 0}
    failures = []
    for path, document, result in _parsed(EXAMPLES / "legacy"):
        where = f"{path.name}: {result.kind}/{result.name}"
        if document.get("apiVersion") != API_VERSION:
            outcomes["skipped"] += 1
            if not (result.skipped and document["apiVersion"] in result.skipped):
                failures.append(f"{where}: expected skipped naming the apiVersion, got {result}")
        elif _caBudlePlaceholder(document):
            outcomes["rejected"] += 1
            rejection = result.rejection
            if rejection is None or rejection.field != "spec.upstream.caBudle" or result.obj is not None:
                failures.append(f"{where}: expected a rejection naming spec.upstream.caBudle, got {result}")
            elif rejection.kind != "ReverseProxy" or "base64" not in rejection.message:
                failures.append(f"{where}: unclear rejection {rejection}")
        else:
            outcomes["accepted"] += 1
            if result.obj is None:
                failures.append(f"{where}: {result.rejection or result.skipped}")
    print("\n".join(failures))
    assert not failures, "\n".join(failures)
    assert outcomes["rejected"] >= 3 and outcomes["skipped"] >= 3 and outcomes["accepted"] >= 10, outcomes


def test_legacyShapesLoadIntoTheModel() -> None:
    folder = EXAMPLES / "legacy"
    design = _documents(
        folder / "community__sig-architecture-concepts-and-designs-pluggable-architecture-zh.yaml"
    )
    api = parseResource(design[0]).obj
    assert isinstance(api, APIService)
    # spec.endpoint is the earliest spelling of url; insecureSkipTLSVerify of insecureSkipVerify.
    assert api.endpoint.origin == "https://ks-devops.kubesphere-devops-system.svc"
    assert api.endpoint.tls.insecureSkipVerify is True
    assert api.state is None  # status.enabled: true
    bundle = parseResource(design[1]).obj
    assert isinstance(bundle, JSBundle) and bundle.link == "/dist/devops.kubesphere.io/v1alpha1/index.js"

    scaffold = _documents(folder / "ksbuilder__pkg-plugin-template_backend.go__ab88bc9.yaml")
    api = parseResource(scaffold[0]).obj
    assert api.endpoint == Endpoint("http", "employee-backend.extension-employee.svc", 80, "")

    sample = _documents(
        folder
        / "dev-guide__sites-extension-dev-guide-content-zh-samples-and-tutorials-ks-native-ext-sample__6290533.yaml"
    )
    result = parseResource(sample[0])
    assert result.obj is not None and result.obj.state == "Enabled"
    assert [w for w in result.warnings if "status.state" in w], result.warnings


def test_legacyPlaceholderRejectionIsIsolated() -> None:
    # The ReverseProxy with the placeholder is rejected; the APIService and JSBundle of the same file load.
    path = (
        EXAMPLES
        / "legacy"
        / "dev-guide__content-understand-kubesphere-pluggable-backend-pluggable-architecture.zh__2c23c94.yaml"
    )
    results = [parseResource(d) for d in _documents(path)]
    assert [r.obj is not None for r in results] == [True, True, False]
    assert str(results[2].rejection).startswith("ReverseProxy/devops.kubesphere.io: spec.upstream.caBudle: ")


# -- invalid/ -----------------------------------------------------------------------------------------------


def test_invalidFilesAreNotYAML() -> None:
    files = sorted((EXAMPLES / "invalid").glob("*.yaml"))
    assert files
    for path in files:
        with pytest.raises(yaml.YAMLError):
            _documents(path)
