"""The RBAC policy file: Kubernetes' matching rules, a matrix of identities x routes x verbs, and reloads."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.auth.attributes import requestAttributes
from ksproxy.auth.identity import ANONYMOUS, Identity
from ksproxy.auth.interfaces import NO_OPINION
from ksproxy.auth.rbac import PolicyError, RBACAuthorizer, parsePolicy
from ksproxy.paths import parseTarget

POLICY = b"""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: viewer}
rules:
- apiGroups: [""]
  resources: ["pods", "pods/log"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["monitoring.kubesphere.io"]
  resources: ["*"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: paths}
rules:
- nonResourceURLs: ["/healthz", "/proxy/app/*"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: scaler}
rules:
- apiGroups: ["*"]
  resources: ["*/scale"]
  verbs: ["update", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: editor, namespace: team-a}
rules:
- apiGroups: ["", "apps"]
  resources: ["pods", "deployments"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: config-reader, namespace: team-a}
rules:
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: ["app-config"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: admin}
aggregationRule:
  clusterRoleSelectors:
  - matchLabels: {example.com/aggregate-to-admin: "true"}
rules: []
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: extensions-admin
  labels: {example.com/aggregate-to-admin: "true"}
rules:
- apiGroups: ["extensions.kubesphere.io"]
  resources: ["*"]
  verbs: ["*"]
- nonResourceURLs: ["*"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: viewers}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: viewer}
subjects:
- {kind: Group, name: viewers}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: everyone-paths}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: paths}
subjects:
- {kind: Group, name: system:authenticated}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: root}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}
subjects:
- {kind: User, name: root}
---
apiVersion: v1
kind: List
items:
- apiVersion: rbac.authorization.k8s.io/v1
  kind: RoleBinding
  metadata: {name: editors, namespace: team-a}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: editor}
  subjects:
  - {kind: User, name: alice}
  - {kind: ServiceAccount, name: ci}
- apiVersion: rbac.authorization.k8s.io/v1
  kind: RoleBinding
  metadata: {name: bob-views, namespace: team-b}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: viewer}
  subjects:
  - {kind: User, name: bob}
- apiVersion: rbac.authorization.k8s.io/v1
  kind: RoleBinding
  metadata: {name: carol-config, namespace: team-a}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: config-reader}
  subjects:
  - {kind: User, name: carol}
- apiVersion: rbac.authorization.k8s.io/v1
  kind: RoleBinding
  metadata: {name: scalers, namespace: team-b}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: scaler}
  subjects:
  - {kind: Group, name: scalers}
"""

AUTH = "system:authenticated"
ALICE = Identity("alice", groups=(AUTH,))
BOB = Identity("bob", groups=(AUTH,))
CAROL = Identity("carol", groups=(AUTH,))
VIC = Identity("vic", groups=("viewers", AUTH))
ROOT = Identity("root", groups=(AUTH,))
CI = Identity("system:serviceaccount:team-a:ci", groups=("system:serviceaccounts", AUTH))
OTHER_CI = Identity("system:serviceaccount:team-b:ci", groups=("system:serviceaccounts", AUTH))
SCALER = Identity("sam", groups=("scalers", AUTH))

PODS_A = "/api/v1/namespaces/team-a/pods"
PODS_B = "/api/v1/namespaces/team-b/pods"
DEPLOY_A = "/apis/apps/v1/namespaces/team-a/deployments"
METRICS = "/kapis/monitoring.kubesphere.io/v1beta1/namespaces/team-c/metrics"
EXT = "/apis/extensions.kubesphere.io/v1alpha1/jsbundles"

MATRIX = [
    # alice: editor in team-a only, plus the public paths every authenticated user has.
    (ALICE, "GET", PODS_A, True),
    (ALICE, "POST", PODS_A, True),
    (ALICE, "DELETE", PODS_A + "/web", True),
    (ALICE, "DELETE", PODS_A, True),  # deletecollection is covered by "*"
    (ALICE, "PATCH", DEPLOY_A + "/web", True),
    (ALICE, "GET", PODS_B, False),
    (ALICE, "GET", "/api/v1/pods", False),  # cluster-wide list: a RoleBinding never grants it
    (ALICE, "GET", PODS_A + "/web/log", False),  # pods does not cover pods/log
    (ALICE, "GET", "/api/v1/namespaces/team-a/secrets", False),
    (ALICE, "GET", "/healthz", True),
    (ALICE, "POST", "/healthz", False),
    (ALICE, "GET", "/proxy/app/x/y", True),
    (ALICE, "GET", "/proxy/app", False),
    (ALICE, "GET", "/proxy/app%2F..%2Fadmin", False),
    (ALICE, "GET", "/proxy/other", False),
    # bob: viewer (a ClusterRole) bound in team-b only.
    (BOB, "GET", PODS_B, True),
    (BOB, "GET", PODS_B + "?watch=true", True),
    (BOB, "GET", PODS_B + "/web/log", True),
    (BOB, "DELETE", PODS_B + "/web", False),
    (BOB, "GET", PODS_A, False),
    (BOB, "GET", "/api/v1/pods", False),
    # carol: one named secret.
    (CAROL, "GET", "/api/v1/namespaces/team-a/secrets/app-config", True),
    (CAROL, "GET", "/api/v1/namespaces/team-a/secrets/db-password", False),
    (CAROL, "GET", "/api/v1/namespaces/team-a/secrets", False),  # a list names nothing
    (CAROL, "PUT", "/api/v1/namespaces/team-a/secrets/app-config", False),
    (CAROL, "GET", "/api/v1/namespaces/team-b/secrets/app-config", False),
    # vic: viewer everywhere through a group.
    (VIC, "GET", PODS_A, True),
    (VIC, "GET", "/api/v1/pods", True),
    (VIC, "GET", METRICS, True),
    (VIC, "POST", METRICS, False),
    (VIC, "GET", EXT, False),
    # root: the aggregated admin role.
    (ROOT, "DELETE", EXT + "/b1", True),
    (ROOT, "GET", "/anything/at/all", True),
    (ROOT, "GET", PODS_A, False),  # admin aggregates only extension rules
    # service accounts: the subject's namespace defaults to the RoleBinding's.
    (CI, "POST", DEPLOY_A, True),
    (OTHER_CI, "POST", DEPLOY_A, False),
    # "*/scale" grants the scale subresource of any resource, nothing else.
    (SCALER, "PUT", "/apis/apps/v1/namespaces/team-b/deployments/web/scale", True),
    (SCALER, "PUT", "/apis/apps/v1/namespaces/team-b/deployments/web", False),
    (SCALER, "PUT", "/apis/apps/v1/namespaces/team-a/deployments/web/scale", False),
    # anonymous: nothing is granted to system:unauthenticated.
    (ANONYMOUS, "GET", "/healthz", False),
    (ANONYMOUS, "GET", PODS_A, False),
]


@pytest.fixture(scope="module")
def policy():
    return parsePolicy(POLICY)


@pytest.mark.parametrize(
    "identity,method,target,allowed", MATRIX, ids=[f"{i.user}-{m}-{t}" for i, m, t, _ in MATRIX]
)
def test_matrix(policy, identity, method, target, allowed):
    p = parseTarget(target.encode())
    a = requestAttributes(method.encode(), p.segments, p.query or b"")
    assert (policy.allowedBy(identity, a) is not None) is allowed


def test_allowed_by_names_the_binding(policy):
    p = parseTarget(PODS_A.encode())
    a = requestAttributes(b"GET", p.segments, b"")
    assert policy.allowedBy(ALICE, a) == "RoleBinding team-a/editors -> Role editor"


def test_binding_to_a_missing_role_grants_nothing():
    policy = parsePolicy(
        b"""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: b}
roleRef: {kind: ClusterRole, name: missing}
subjects: [{kind: User, name: alice}]
"""
    )
    a = requestAttributes(b"GET", ("healthz",), b"")
    assert policy.allowedBy(ALICE, a) is None


def doc(kind, body, name="x", namespace=None):
    meta = f"{{name: {name}{', namespace: ' + namespace if namespace else ''}}}"
    return f"apiVersion: rbac.authorization.k8s.io/v1\nkind: {kind}\nmetadata: {meta}\n{body}".encode()


@pytest.mark.parametrize(
    "data,message",
    [
        (b"a: [", "not valid YAML"),
        (b"- 1\n- 2", "must be a mapping"),
        (b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}", "is not rbac.authorization.k8s.io/v1"),
        (
            b"apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBindng\nmetadata: {name: x}",
            "kind 'ClusterRoleBindng'",
        ),
        (doc("ClusterRole", "rules: []", name='""'), "metadata.name: required"),
        (doc("Role", "rules: []"), "needs metadata.namespace"),
        (doc("ClusterRole", "rules: [{apiGroups: ['']}]"), "at least one verb"),
        (doc("ClusterRole", "rules: [{verbs: [get], resources: [pods]}]"), "at least one API group"),
        (doc("ClusterRole", "rules: [{verbs: [get], apiGroups: ['']}]"), "at least one resource"),
        (
            doc(
                "ClusterRole",
                "rules: [{verbs: [get], apiGroups: [''], resources: [pods], nonResourceURLs: [/x]}]",
            ),
            "both",
        ),
        (doc("Role", "rules: [{verbs: [get], nonResourceURLs: [/x]}]", namespace="a"), "namespaced Role"),
        (doc("ClusterRole", "rules: [{verbs: [get], nonResourceURLs: [x]}]"), "must start with '/'"),
        (doc("ClusterRole", "rules: [{verbs: get, nonResourceURLs: [/x]}]"), "must be a list of strings"),
        (doc("ClusterRole", "rules: []") + b"\n---\n" + doc("ClusterRole", "rules: []"), "defined twice"),
        (doc("ClusterRoleBinding", "roleRef: {kind: Role, name: r}\nsubjects: []"), "cannot be bound here"),
        (
            doc(
                "ClusterRoleBinding",
                "roleRef: {kind: ClusterRole, name: r}\nsubjects: [{kind: Robot, name: r2}]",
            ),
            "'Robot'",
        ),
        (
            doc(
                "ClusterRoleBinding",
                "roleRef: {kind: ClusterRole, name: r}\nsubjects: [{kind: ServiceAccount, name: sa}]",
            ),
            "required for a ServiceAccount",
        ),
        (
            doc(
                "ClusterRole",
                "aggregationRule: {clusterRoleSelectors: [{matchExpressions: [{key: a, operator: Near}]}]}",
            ),
            "unknown operator",
        ),
    ],
)
def test_parse_errors(data, message):
    with pytest.raises(PolicyError, match=message):
        parsePolicy(data, "policy.yaml")


def test_aggregation_with_expressions():
    policy = parsePolicy(
        doc(
            "ClusterRole",
            "aggregationRule: {clusterRoleSelectors: [{matchExpressions: [{key: tier, operator: In, values: [a, b]}, {key: disabled, operator: DoesNotExist}]}]}",
            name="agg",
        )
        + b"\n---\n"
        + doc("ClusterRole", "rules: [{verbs: [get], nonResourceURLs: [/a]}]", name="ra").replace(
            b"{name: ra}", b"{name: ra, labels: {tier: a}}"
        )
        + b"\n---\n"
        + doc("ClusterRole", "rules: [{verbs: [get], nonResourceURLs: [/b]}]", name="rb").replace(
            b"{name: rb}", b"{name: rb, labels: {tier: b, disabled: x}}"
        )
        + b"\n---\n"
        + doc(
            "ClusterRoleBinding",
            "roleRef: {kind: ClusterRole, name: agg}\nsubjects: [{kind: User, name: u}]",
            name="bind",
        )
    )
    u = Identity("u")
    assert policy.allowedBy(u, requestAttributes(b"GET", ("a",))) is not None
    assert policy.allowedBy(u, requestAttributes(b"GET", ("b",))) is None


class ReloadTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.version = 0
        self.write(POLICY)
        self.clock = Clock()
        self.authz = RBACAuthorizer(self.path, self.clock)

    def write(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)
        self.version += 1
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + self.version * 1_000_000_000))

    def verdict(self, identity, target, method=b"GET"):
        p = parseTarget(target.encode())
        return self.authz.authorize(identity, requestAttributes(method, p.segments, p.query or b""))

    def test_changes_picked_up_after_a_second(self):
        self.assertEqual(self.verdict(ALICE, PODS_A).decision, "allow")
        self.write(b"")
        self.clock.advance(0.9)
        self.assertEqual(self.verdict(ALICE, PODS_A).decision, "allow")
        self.clock.advance(0.2)
        self.assertEqual(self.verdict(ALICE, PODS_A), NO_OPINION)

    def test_broken_reload_keeps_previous_policy(self):
        self.write(POLICY + b"\n---\nkind: Nonsense\n")
        self.clock.advance(1)
        self.assertEqual(self.verdict(ALICE, PODS_A).decision, "allow")
        self.assertIn("document 12: apiVersion None", self.authz._file.lastError)
        self.assertEqual(len(self.flushLoggedErrors()), 0)  # logged as an error event, not as a Failure
