# -*- test-case-name: tests.unit.test_auth_attributes -*-
"""
Kubernetes request attributes (verb, API group, resource, namespace, ...) from a method and a path, the way
the kube-apiserver's C{RequestInfoFactory} and KubeSphere's C{RequestInfoResolver} derive them.

Resource paths: C{/api/<version>/...}, C{/apis/<group>/<version>/...} and KubeSphere's
C{/kapis/<group>/<version>/...}.  KubeSphere's multi-cluster prefix C{clusters/<c>/} is skipped both before
the API prefix (C{/clusters/<c>/kapis/...}) and right after it (C{/kapis/clusters/<c>/...}); the cluster is
recorded but does not change what is authorised.  Under C{/kapis} only, C{workspaces/<ws>/} after the version
is skipped as KubeSphere does, so C{/kapis/g/v/workspaces/ws1/namespaces} is resource C{namespaces} (cluster
scope, workspace C{ws1}) and C{.../workspaces/ws1/namespaces/ns1/pods} is C{pods} in namespace C{ns1}; RBAC
has no workspace scope, so such requests need cluster-wide grants unless they name a namespace.  Every other
path is a non-resource request whose verb is the lower-case HTTP method.
"""

from __future__ import annotations

from typing import Optional, Sequence
from urllib.parse import parse_qsl

import attrs

__all__ = ["RequestAttributes", "requestAttributes", "joinPath"]

_API_PREFIXES = frozenset(["api", "apis", "kapis"])
_GROUPLESS = frozenset(["api"])
_SPECIAL_VERBS = frozenset(["proxy", "watch"])
_SPECIAL_VERBS_NO_SUBRESOURCES = frozenset(["proxy"])
_NAMESPACE_SUBRESOURCES = frozenset(["status", "finalize"])
_VERBS = {
    b"GET": "get",
    b"HEAD": "get",
    b"POST": "create",
    b"PUT": "update",
    b"PATCH": "patch",
    b"DELETE": "delete",
}


@attrs.frozen
class RequestAttributes:
    """
    What a request does, in Kubernetes' authorisation vocabulary (C{authorizer.Attributes} minus the user).

    @ivar path: the normalised path with C{/} and C{%} inside a segment percent-encoded again, so a segment
        holding an encoded slash cannot pass for two segments when matched against C{nonResourceURLs}.
    """

    verb: str
    path: str
    isResourceRequest: bool = False
    apiPrefix: str = ""
    apiGroup: str = ""
    apiVersion: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    workspace: str = ""
    cluster: str = ""


def joinPath(segments: Sequence[str]) -> str:
    """C{/a/b} from C{("a", "b")}, keeping a C{/} that was inside a segment encoded."""
    return "/" + "/".join(s.replace("%", "%25").replace("/", "%2F") for s in segments)


def _watchRequested(values: Sequence[str]) -> bool:
    # metav1's string-to-bool conversion: only "0", "f" and "false" (any case) mean no.
    return bool(values) and values[0].lower() not in ("0", "f", "false")


def _nameFromFieldSelector(selector: str) -> Optional[str]:
    for requirement in selector.split(","):
        requirement = requirement.strip()
        for op in ("==", "="):
            field, sep, value = requirement.partition(op)
            if sep and field.strip() == "metadata.name" and "!" not in field:
                value = value.strip()
                if value and value not in (".", "..") and "/" not in value and "%" not in value:
                    return value
                return None
    return None


def requestAttributes(method: bytes, segments: Sequence[str], query: bytes = b"") -> RequestAttributes:
    """
    The attributes of a request for C{method} on the normalised, percent-decoded path C{segments} (empty
    segments included as they appear) with raw C{query}.
    """
    path = joinPath(segments)
    lowerMethod = method.decode("ascii", "replace").lower()
    # Kubernetes' splitPath: trim slashes at both ends, keep empty segments in the middle.
    parts = list(segments)
    while parts and not parts[0]:
        del parts[0]
    while parts and not parts[-1]:
        parts.pop()
    cluster = ""
    if len(parts) >= 3 and parts[0] == "clusters" and parts[2] in _API_PREFIXES:
        cluster = parts[1]
        parts = parts[2:]
    nonResource = RequestAttributes(verb=lowerMethod, path=path, cluster=cluster)
    if len(parts) < 3 or parts[0] not in _API_PREFIXES:
        return nonResource
    prefix = parts[0]
    parts = parts[1:]
    if parts[0] == "clusters":
        if len(parts) > 1:
            cluster = parts[1]
        if len(parts) > 2:
            parts = parts[2:]
    group = ""
    if prefix not in _GROUPLESS:
        if len(parts) < 3:
            return attrs.evolve(nonResource, cluster=cluster)
        group = parts[0]
        parts = parts[1:]
    version = parts[0]
    parts = parts[1:]
    if not parts:
        return attrs.evolve(nonResource, cluster=cluster)

    if parts[0] in _SPECIAL_VERBS and len(parts) >= 2:
        verb = parts[0]
        parts = parts[1:]
    else:
        verb = _VERBS.get(method, lowerMethod)

    workspace = ""
    if prefix == "kapis" and parts[0] == "workspaces":
        if len(parts) > 1:
            workspace = parts[1]
        if len(parts) > 2:
            parts = parts[2:]

    namespace = ""
    if parts[0] == "namespaces":
        if len(parts) > 1:
            namespace = parts[1]
            # /namespaces/<ns>/<kind>/... is about <kind> in <ns>; /namespaces/<ns>[/status|/finalize] is
            # about the namespace object itself.
            if len(parts) > 2 and parts[2] not in _NAMESPACE_SUBRESOURCES:
                parts = parts[2:]

    resource = parts[0]
    name = parts[1] if len(parts) >= 2 else ""
    subresource = parts[2] if len(parts) >= 3 and verb not in _SPECIAL_VERBS_NO_SUBRESOURCES else ""

    if not name and verb == "get":
        watch = False
        if query:
            params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            watch = _watchRequested([v for k, v in params if k == "watch"])
            for k, v in params:
                if k == "fieldSelector":
                    found = _nameFromFieldSelector(v)
                    if found:
                        name = found
                    break
        verb = "watch" if watch else "list"
    if not name and verb == "delete":
        verb = "deletecollection"

    return RequestAttributes(
        verb=verb,
        path=path,
        isResourceRequest=True,
        apiPrefix=prefix,
        apiGroup=group,
        apiVersion=version,
        namespace=namespace,
        resource=resource,
        subresource=subresource,
        name=name,
        workspace=workspace,
        cluster=cluster,
    )
