# -*- test-case-name: tests.unit.test_auth_rbac -*-
"""
A local authoriser that reads Kubernetes RBAC objects (ClusterRole, Role, ClusterRoleBinding, RoleBinding)
from one multi-document YAML file and evaluates them the way the kube-apiserver's RBAC authoriser does.

RBAC only ever allows: a request no rule allows gets "no opinion", and the gate denies it when no later
authoriser allows it.  The file is checked for changes at most once a second; a change that does not parse
keeps the previous policy (and the error is logged), so a bad edit never opens or closes the gate.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import attrs
import yaml
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ksproxy.auth._files import WatchedFile
from ksproxy.auth.attributes import RequestAttributes
from ksproxy.auth.identity import Identity
from ksproxy.auth.interfaces import NO_OPINION, IAuthorizer, Verdict

__all__ = ["PolicyError", "PolicyRule", "Grant", "Policy", "parsePolicy", "RBACAuthorizer"]

RBAC_GROUP = "rbac.authorization.k8s.io"
_KINDS = ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")


class PolicyError(ValueError):
    """The policy file is not a valid set of RBAC objects; the message names the document and field."""


def _wildcardOr(values: FrozenSet[str], value: str) -> bool:
    return "*" in values or value in values


@attrs.frozen
class PolicyRule:
    """One C{rules[]} entry, with Kubernetes' matching semantics."""

    verbs: FrozenSet[str]
    apiGroups: FrozenSet[str] = frozenset()
    resources: Tuple[str, ...] = ()
    resourceNames: FrozenSet[str] = frozenset()
    nonResourceURLs: Tuple[str, ...] = ()

    def allows(self, a: RequestAttributes) -> bool:
        if not _wildcardOr(self.verbs, a.verb):
            return False
        if a.isResourceRequest:
            return (
                bool(self.resources)
                and _wildcardOr(self.apiGroups, a.apiGroup)
                and self._resourceMatches(a.resource, a.subresource)
                and (not self.resourceNames or a.name in self.resourceNames)
            )
        for url in self.nonResourceURLs:
            if url == "*" or url == a.path or (url.endswith("*") and a.path.startswith(url[:-1])):
                return True
        return False

    def _resourceMatches(self, resource: str, subresource: str) -> bool:
        combined = f"{resource}/{subresource}" if subresource else resource
        for r in self.resources:
            if r == "*" or r == combined:
                return True
            # "*/scale" grants the scale subresource of every resource.
            if subresource and r == "*/" + subresource:
                return True
        return False


@attrs.frozen
class Grant:
    """
    The rules one binding gives its subjects.

    @ivar namespace: C{""} for a ClusterRoleBinding (every namespace and the cluster scope), else the
        RoleBinding's namespace (resource requests in that namespace only).
    @ivar via: which binding and role, for logs and C{/debug} output.
    """

    namespace: str
    rules: Tuple[PolicyRule, ...]
    via: str


@attrs.frozen
class Policy:
    """Grants indexed by subject: user names (service accounts as C{system:serviceaccount:<ns>:<name>}) and groups."""

    users: Mapping[str, Tuple[Grant, ...]] = attrs.field(factory=dict)
    groups: Mapping[str, Tuple[Grant, ...]] = attrs.field(factory=dict)

    def allowedBy(self, identity: Identity, a: RequestAttributes) -> Optional[str]:
        """The binding that allows the request, or C{None}."""
        for grants in self._grantsFor(identity):
            for grant in grants:
                if grant.namespace and (not a.isResourceRequest or grant.namespace != a.namespace):
                    continue
                for rule in grant.rules:
                    if rule.allows(a):
                        return grant.via
        return None

    def _grantsFor(self, identity: Identity) -> List[Tuple[Grant, ...]]:
        out = []
        g = self.users.get(identity.user)
        if g:
            out.append(g)
        for group in identity.groups:
            g = self.groups.get(group)
            if g:
                out.append(g)
        return out


# -- parsing ------------------------------------------------------------------------------------------------


def _strList(obj: Mapping[str, Any], key: str, where: str) -> Tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}.{key}: must be a list of strings")
    return tuple(value)


def _mapping(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: must be a mapping")
    return obj


def _parseRule(raw: Any, where: str, namespaced: bool) -> PolicyRule:
    raw = _mapping(raw, where)
    verbs = _strList(raw, "verbs", where)
    if not verbs:
        raise PolicyError(f"{where}.verbs: at least one verb is required")
    apiGroups = _strList(raw, "apiGroups", where)
    resources = _strList(raw, "resources", where)
    resourceNames = _strList(raw, "resourceNames", where)
    urls = _strList(raw, "nonResourceURLs", where)
    if urls:
        if namespaced:
            raise PolicyError(f"{where}.nonResourceURLs: a namespaced Role cannot grant non-resource URLs")
        if apiGroups or resources:
            raise PolicyError(f"{where}: a rule cannot apply to both resources and non-resource URLs")
        for u in urls:
            if u != "*" and not u.startswith("/"):
                raise PolicyError(f"{where}.nonResourceURLs: {u!r} must start with '/' or be '*'")
    else:
        if not apiGroups:
            raise PolicyError(f"{where}.apiGroups: resource rules need at least one API group ('' is core)")
        if not resources:
            raise PolicyError(f"{where}.resources: resource rules need at least one resource")
    return PolicyRule(frozenset(verbs), frozenset(apiGroups), resources, frozenset(resourceNames), urls)


def _selectorMatches(selector: Mapping[str, Any], labels: Mapping[str, str], where: str) -> bool:
    """Kubernetes label selector semantics; every part is validated even when an earlier one fails."""
    matchLabels = _mapping(selector.get("matchLabels") or {}, f"{where}.matchLabels")
    ok = all(labels.get(str(k)) == str(v) for k, v in matchLabels.items())
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise PolicyError(f"{where}.matchExpressions: must be a list")
    for i, expr in enumerate(expressions):
        expr = _mapping(expr, f"{where}.matchExpressions[{i}]")
        key, op = expr.get("key"), expr.get("operator")
        values = _strList(expr, "values", f"{where}.matchExpressions[{i}]")
        if op == "In":
            ok = ok and key in labels and labels[key] in values
        elif op == "NotIn":
            ok = ok and (key not in labels or labels[key] not in values)
        elif op == "Exists":
            ok = ok and key in labels
        elif op == "DoesNotExist":
            ok = ok and key not in labels
        else:
            raise PolicyError(f"{where}.matchExpressions[{i}].operator: unknown operator {op!r}")
    return ok


@attrs.define
class _Role:
    rules: Tuple[PolicyRule, ...]
    labels: Mapping[str, str]
    aggregation: Optional[List[Mapping[str, Any]]]
    where: str


def _documents(data: bytes, source: str) -> List[Tuple[str, Mapping[str, Any]]]:
    try:
        docs = list(yaml.safe_load_all(data))
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {e}") from e
    out: List[Tuple[str, Mapping[str, Any]]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{source} document {i + 1}"
        doc = _mapping(doc, where)
        if doc.get("kind") == "List" and doc.get("apiVersion") == "v1":
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise PolicyError(f"{where}.items: must be a list")
            out.extend(
                (f"{where} items[{j}]", _mapping(item, f"{where} items[{j}]")) for j, item in enumerate(items)
            )
        else:
            out.append((where, doc))
    return out


def parsePolicy(data: bytes, source: str = "policy") -> Policy:
    """Parse every RBAC object in C{data} (multi-document YAML, C{v1 List}s allowed) into a L{Policy}."""
    clusterRoles: Dict[str, _Role] = {}
    roles: Dict[Tuple[str, str], _Role] = {}
    bindings: List[Tuple[str, str, str, Mapping[str, Any]]] = []
    seen: Dict[Tuple[str, str, str], str] = {}
    for where, doc in _documents(data, source):
        apiVersion, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(apiVersion, str) or apiVersion.split("/")[0] != RBAC_GROUP:
            raise PolicyError(f"{where}: apiVersion {apiVersion!r} is not {RBAC_GROUP}/v1")
        if kind not in _KINDS:
            raise PolicyError(f"{where}: kind {kind!r} is not one of {', '.join(_KINDS)}")
        meta = _mapping(doc.get("metadata") or {}, f"{where}.metadata")
        name, namespace = meta.get("name"), meta.get("namespace") or ""
        if not isinstance(name, str) or not name:
            raise PolicyError(f"{where}.metadata.name: required")
        if not isinstance(namespace, str):
            raise PolicyError(f"{where}.metadata.namespace: must be a string")
        namespaced = kind in ("Role", "RoleBinding")
        if namespaced and not namespace:
            raise PolicyError(f"{where}: a {kind} needs metadata.namespace")
        if not namespaced:
            namespace = ""
        label = f"{kind} {namespace + '/' if namespace else ''}{name}"
        where = f"{where} ({label})"
        key = (kind, namespace, name)
        if key in seen:
            raise PolicyError(f"{where}: defined twice (first in {seen[key]})")
        seen[key] = where
        if kind in ("ClusterRole", "Role"):
            rawRules = doc.get("rules") or []
            if not isinstance(rawRules, list):
                raise PolicyError(f"{where}.rules: must be a list")
            rules = tuple(_parseRule(r, f"{where}.rules[{i}]", namespaced) for i, r in enumerate(rawRules))
            labels = meta.get("labels") or {}
            if not isinstance(labels, dict):
                raise PolicyError(f"{where}.metadata.labels: must be a mapping")
            aggregation = None
            if kind == "ClusterRole" and doc.get("aggregationRule") is not None:
                agg = _mapping(doc["aggregationRule"], f"{where}.aggregationRule")
                selectors = agg.get("clusterRoleSelectors") or []
                if not isinstance(selectors, list):
                    raise PolicyError(f"{where}.aggregationRule.clusterRoleSelectors: must be a list")
                aggregation = [
                    _mapping(s, f"{where}.aggregationRule.clusterRoleSelectors") for s in selectors
                ]
                for selector in aggregation:  # validate now, even if no role is there to match
                    _selectorMatches(selector, {}, f"{where}.aggregationRule")
            role = _Role(rules, {str(k): str(v) for k, v in labels.items()}, aggregation, where)
            if kind == "ClusterRole":
                clusterRoles[name] = role
            else:
                roles[(namespace, name)] = role
        else:
            bindings.append((where, label, namespace, doc))

    _aggregate(clusterRoles)

    users: Dict[str, List[Grant]] = {}
    groups: Dict[str, List[Grant]] = {}
    for where, label, namespace, doc in bindings:
        ref = _mapping(doc.get("roleRef"), f"{where}.roleRef")
        refKind, refName = ref.get("kind"), ref.get("name")
        if refKind not in ("ClusterRole", "Role") or (refKind == "Role" and not namespace):
            raise PolicyError(f"{where}.roleRef.kind: {refKind!r} cannot be bound here")
        if not isinstance(refName, str) or not refName:
            raise PolicyError(f"{where}.roleRef.name: required")
        role = clusterRoles.get(refName) if refKind == "ClusterRole" else roles.get((namespace, refName))
        subjects = doc.get("subjects") or []
        if not isinstance(subjects, list):
            raise PolicyError(f"{where}.subjects: must be a list")
        # A binding to a role that does not exist grants nothing, as in Kubernetes; it is still checked.
        grant = Grant(namespace, role.rules if role else (), f"{label} -> {refKind} {refName}")
        for i, s in enumerate(subjects):
            s = _mapping(s, f"{where}.subjects[{i}]")
            sKind, sName = s.get("kind"), s.get("name")
            if not isinstance(sName, str) or not sName:
                raise PolicyError(f"{where}.subjects[{i}].name: required")
            if sKind == "User":
                users.setdefault(sName, []).append(grant)
            elif sKind == "Group":
                groups.setdefault(sName, []).append(grant)
            elif sKind == "ServiceAccount":
                saNamespace = s.get("namespace") or namespace
                if not saNamespace:
                    raise PolicyError(f"{where}.subjects[{i}].namespace: required for a ServiceAccount")
                users.setdefault(f"system:serviceaccount:{saNamespace}:{sName}", []).append(grant)
            else:
                raise PolicyError(
                    f"{where}.subjects[{i}].kind: {sKind!r} is not User, Group or ServiceAccount"
                )
    return Policy(
        users={k: tuple(v) for k, v in users.items()},
        groups={k: tuple(v) for k, v in groups.items()},
    )


def _aggregate(clusterRoles: Dict[str, _Role]) -> None:
    """Give each aggregated ClusterRole the rules of the ClusterRoles its selectors pick (transitively)."""
    resolved: Dict[str, Tuple[PolicyRule, ...]] = {}

    def rulesOf(name: str, stack: Sequence[str]) -> Tuple[PolicyRule, ...]:
        if name in resolved:
            return resolved[name]
        role = clusterRoles[name]
        if role.aggregation is None or name in stack:
            return role.rules
        rules: List[PolicyRule] = list(role.rules)
        for other, candidate in sorted(clusterRoles.items()):
            if other == name:
                continue
            for selector in role.aggregation:
                if _selectorMatches(selector, candidate.labels, f"{role.where}.aggregationRule"):
                    for r in rulesOf(other, (*stack, name)):
                        if r not in rules:
                            rules.append(r)
                    break
        resolved[name] = tuple(rules)
        return resolved[name]

    for name in list(clusterRoles):
        rulesOf(name, ())
    for name, rules in resolved.items():
        clusterRoles[name].rules = rules


@implementer(IAuthorizer)
class RBACAuthorizer:
    """Allows what the policy file's bindings grant; has no opinion about anything else."""

    def __init__(self, path: str, clock: IReactorTime, interval: float = 1.0) -> None:
        self._file = WatchedFile(path, lambda data: parsePolicy(data, path), clock, interval)

    @property
    def policy(self) -> Policy:
        return self._file.current()

    def authorize(self, identity: Identity, attributes: RequestAttributes) -> Verdict:
        via = self._file.current().allowedBy(identity, attributes)
        if via is None:
            return NO_OPINION
        return Verdict("allow", reason=f"allowed by {via}")
