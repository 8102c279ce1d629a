"""Request attributes derived from method and path, as the kube-apiserver and KubeSphere derive them."""

from __future__ import annotations

import pytest

from ksproxy.auth.attributes import RequestAttributes, requestAttributes
from ksproxy.paths import parseTarget


def attrsOf(method: str, target: str) -> RequestAttributes:
    p = parseTarget(target.encode())
    return requestAttributes(method.encode(), p.segments, p.query or b"")


def R(verb, group, version, resource, *, ns="", name="", sub="", prefix=None, ws="", cluster="", path):
    return RequestAttributes(
        verb=verb,
        path=path,
        isResourceRequest=True,
        apiPrefix=prefix or ("api" if group == "" and path.startswith("/api/") else "apis"),
        apiGroup=group,
        apiVersion=version,
        namespace=ns,
        resource=resource,
        subresource=sub,
        name=name,
        workspace=ws,
        cluster=cluster,
    )


def N(verb, path, cluster=""):
    return RequestAttributes(verb=verb, path=path, cluster=cluster)


CASES = [
    # Core API.
    ("GET", "/api/v1/pods", R("list", "", "v1", "pods", path="/api/v1/pods")),
    (
        "GET",
        "/api/v1/namespaces/default/pods",
        R("list", "", "v1", "pods", ns="default", path="/api/v1/namespaces/default/pods"),
    ),
    (
        "GET",
        "/api/v1/namespaces/default/pods?watch=true",
        R("watch", "", "v1", "pods", ns="default", path="/api/v1/namespaces/default/pods"),
    ),
    (
        "GET",
        "/api/v1/namespaces/default/pods?watch=1&x=y",
        R("watch", "", "v1", "pods", ns="default", path="/api/v1/namespaces/default/pods"),
    ),
    (
        "GET",
        "/api/v1/namespaces/default/pods?watch=false",
        R("list", "", "v1", "pods", ns="default", path="/api/v1/namespaces/default/pods"),
    ),
    (
        "GET",
        "/api/v1/namespaces/default/pods?watch=0",
        R("list", "", "v1", "pods", ns="default", path="/api/v1/namespaces/default/pods"),
    ),
    (
        "GET",
        "/api/v1/namespaces/default/pods/web",
        R("get", "", "v1", "pods", ns="default", name="web", path="/api/v1/namespaces/default/pods/web"),
    ),
    (
        "HEAD",
        "/api/v1/namespaces/default/pods/web",
        R("get", "", "v1", "pods", ns="default", name="web", path="/api/v1/namespaces/default/pods/web"),
    ),
    (
        "GET",
        "/api/v1/namespaces/default/pods/web/log",
        R(
            "get",
            "",
            "v1",
            "pods",
            ns="default",
            name="web",
            sub="log",
            path="/api/v1/namespaces/default/pods/web/log",
        ),
    ),
    (
        "POST",
        "/api/v1/namespaces/default/pods",
        R("create", "", "v1", "pods", ns="default", path="/api/v1/namespaces/default/pods"),
    ),
    (
        "PUT",
        "/api/v1/namespaces/default/pods/web",
        R("update", "", "v1", "pods", ns="default", name="web", path="/api/v1/namespaces/default/pods/web"),
    ),
    (
        "PATCH",
        "/api/v1/namespaces/default/pods/web",
        R("patch", "", "v1", "pods", ns="default", name="web", path="/api/v1/namespaces/default/pods/web"),
    ),
    (
        "DELETE",
        "/api/v1/namespaces/default/pods/web",
        R("delete", "", "v1", "pods", ns="default", name="web", path="/api/v1/namespaces/default/pods/web"),
    ),
    (
        "DELETE",
        "/api/v1/namespaces/default/pods",
        R("deletecollection", "", "v1", "pods", ns="default", path="/api/v1/namespaces/default/pods"),
    ),
    ("OPTIONS", "/api/v1/pods", R("options", "", "v1", "pods", path="/api/v1/pods")),
    # The namespace object itself, and its status/finalize subresources.
    ("GET", "/api/v1/namespaces", R("list", "", "v1", "namespaces", path="/api/v1/namespaces")),
    (
        "GET",
        "/api/v1/namespaces/kube-system",
        R(
            "get",
            "",
            "v1",
            "namespaces",
            ns="kube-system",
            name="kube-system",
            path="/api/v1/namespaces/kube-system",
        ),
    ),
    (
        "PUT",
        "/api/v1/namespaces/ns1/finalize",
        R(
            "update",
            "",
            "v1",
            "namespaces",
            ns="ns1",
            name="ns1",
            sub="finalize",
            path="/api/v1/namespaces/ns1/finalize",
        ),
    ),
    # fieldSelector metadata.name names the object of a list or watch.
    (
        "GET",
        "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dweb",
        R("list", "", "v1", "pods", ns="default", name="web", path="/api/v1/namespaces/default/pods"),
    ),
    (
        "GET",
        "/api/v1/namespaces/default/pods?watch=true&fieldSelector=metadata.name==web,status.phase=Running",
        R("watch", "", "v1", "pods", ns="default", name="web", path="/api/v1/namespaces/default/pods"),
    ),
    # Deprecated special verbs.
    (
        "GET",
        "/api/v1/watch/namespaces/default/pods",
        R("watch", "", "v1", "pods", ns="default", path="/api/v1/watch/namespaces/default/pods"),
    ),
    (
        "GET",
        "/api/v1/proxy/namespaces/default/pods/web/x/y",
        R(
            "proxy",
            "",
            "v1",
            "pods",
            ns="default",
            name="web",
            path="/api/v1/proxy/namespaces/default/pods/web/x/y",
        ),
    ),
    # Groups.
    (
        "GET",
        "/apis/apps/v1/namespaces/default/deployments/web/scale",
        R(
            "get",
            "apps",
            "v1",
            "deployments",
            ns="default",
            name="web",
            sub="scale",
            path="/apis/apps/v1/namespaces/default/deployments/web/scale",
        ),
    ),
    (
        "GET",
        "/apis/extensions.kubesphere.io/v1alpha1/jsbundles",
        R(
            "list",
            "extensions.kubesphere.io",
            "v1alpha1",
            "jsbundles",
            path="/apis/extensions.kubesphere.io/v1alpha1/jsbundles",
        ),
    ),
    # KubeSphere /kapis.
    (
        "GET",
        "/kapis/monitoring.kubesphere.io/v1beta1/namespaces/ns1/metrics",
        R(
            "list",
            "monitoring.kubesphere.io",
            "v1beta1",
            "metrics",
            ns="ns1",
            prefix="kapis",
            path="/kapis/monitoring.kubesphere.io/v1beta1/namespaces/ns1/metrics",
        ),
    ),
    (
        "POST",
        "/kapis/devops.kubesphere.io/v1alpha3/devops/p1/pipelines/x/runs",
        R(
            "create",
            "devops.kubesphere.io",
            "v1alpha3",
            "devops",
            name="p1",
            sub="pipelines",
            prefix="kapis",
            path="/kapis/devops.kubesphere.io/v1alpha3/devops/p1/pipelines/x/runs",
        ),
    ),
    (
        "GET",
        "/kapis/tenant.kubesphere.io/v1alpha3/workspaces/ws1/namespaces",
        R(
            "list",
            "tenant.kubesphere.io",
            "v1alpha3",
            "namespaces",
            ws="ws1",
            prefix="kapis",
            path="/kapis/tenant.kubesphere.io/v1alpha3/workspaces/ws1/namespaces",
        ),
    ),
    (
        "GET",
        "/kapis/tenant.kubesphere.io/v1alpha3/workspaces/ws1/namespaces/ns1/pods",
        R(
            "list",
            "tenant.kubesphere.io",
            "v1alpha3",
            "pods",
            ns="ns1",
            ws="ws1",
            prefix="kapis",
            path="/kapis/tenant.kubesphere.io/v1alpha3/workspaces/ws1/namespaces/ns1/pods",
        ),
    ),
    (
        "GET",
        "/kapis/tenant.kubesphere.io/v1alpha3/workspaces/ws1",
        R(
            "get",
            "tenant.kubesphere.io",
            "v1alpha3",
            "workspaces",
            name="ws1",
            ws="ws1",
            prefix="kapis",
            path="/kapis/tenant.kubesphere.io/v1alpha3/workspaces/ws1",
        ),
    ),
    (
        "GET",
        "/kapis/clusters/host/resources.kubesphere.io/v1alpha3/namespaces/ns1/pods",
        R(
            "list",
            "resources.kubesphere.io",
            "v1alpha3",
            "pods",
            ns="ns1",
            prefix="kapis",
            cluster="host",
            path="/kapis/clusters/host/resources.kubesphere.io/v1alpha3/namespaces/ns1/pods",
        ),
    ),
    (
        "GET",
        "/clusters/member/kapis/resources.kubesphere.io/v1alpha3/pods",
        R(
            "list",
            "resources.kubesphere.io",
            "v1alpha3",
            "pods",
            prefix="kapis",
            cluster="member",
            path="/clusters/member/kapis/resources.kubesphere.io/v1alpha3/pods",
        ),
    ),
    (
        "GET",
        "/clusters/member/api/v1/namespaces/a/secrets/s",
        R(
            "get",
            "",
            "v1",
            "secrets",
            ns="a",
            name="s",
            prefix="api",
            cluster="member",
            path="/clusters/member/api/v1/namespaces/a/secrets/s",
        ),
    ),
    # Under /apis, workspaces/<ws> is an ordinary resource path (Kubernetes' own rules).
    (
        "PUT",
        "/apis/tenant.kubesphere.io/v1beta1/workspaces/ws1/status",
        R(
            "update",
            "tenant.kubesphere.io",
            "v1beta1",
            "workspaces",
            name="ws1",
            sub="status",
            path="/apis/tenant.kubesphere.io/v1beta1/workspaces/ws1/status",
        ),
    ),
    # Discovery and everything else: non-resource, verb = lower-case method.
    ("GET", "/api", N("get", "/api")),
    ("GET", "/api/v1", N("get", "/api/v1")),
    ("GET", "/apis/apps", N("get", "/apis/apps")),
    ("GET", "/apis/apps/v1", N("get", "/apis/apps/v1")),
    ("GET", "/kapis/iam.kubesphere.io/v1beta1", N("get", "/kapis/iam.kubesphere.io/v1beta1")),
    ("POST", "/kapis/iam.kubesphere.io/v1beta1/", N("post", "/kapis/iam.kubesphere.io/v1beta1/")),
    ("GET", "/healthz", N("get", "/healthz")),
    ("POST", "/proxy/app/api/x", N("post", "/proxy/app/api/x")),
    ("DELETE", "/", N("delete", "/")),
    ("GET", "/dist/ext/index.js", N("get", "/dist/ext/index.js")),
    # An encoded slash stays in its segment, and stays encoded in the path used for nonResourceURLs.
    ("GET", "/public%2F..%2Fadmin", N("get", "/public%2F..%2Fadmin")),
    ("GET", "/a/100%25", N("get", "/a/100%25")),
]


@pytest.mark.parametrize("method,target,expected", CASES, ids=[f"{m} {t}" for m, t, _ in CASES])
def test_attributes(method, target, expected):
    assert attrsOf(method, target) == expected


def test_trailing_slash_ignored_for_resources_like_kubernetes():
    assert attrsOf("GET", "/api/v1/namespaces/default/pods/").resource == "pods"


def test_empty_segment_in_the_middle_is_kept():
    # Kubernetes' splitPath keeps it: "namespaces//secrets" does not name a namespace.
    a = attrsOf("GET", "/api/v1/namespaces//secrets")
    assert (a.namespace, a.resource, a.verb) == ("", "secrets", "list")
