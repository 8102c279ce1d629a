"""
Authentication and authorisation in front of every route, end to end: a JWT key and an RBAC policy file
configured on a real ksproxy; only the identities the policy allows reach each route, the rest get 401/403
with a Status body, and upstreams receive trustworthy identity headers.
"""

from __future__ import annotations

import json
import os
import time

import jwt
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.integration.gateway import RunningGateway
from tests.util import RecordingUpstream, httpRequest, listenUpstream

SECRET = b"0123456789abcdef0123456789abcdef-test-secret"

MANIFESTS = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: APIService
metadata: {{name: v1.things.example.io}}
spec: {{group: things.example.io, version: v1, url: 'http://127.0.0.1:{port}'}}
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {{name: tool}}
spec:
  matcher: {{path: /proxy/tool/*, method: '*'}}
  upstream: {{url: 'http://127.0.0.1:{port}'}}
  directives:
    authProxy: true
    stripPathPrefix: /proxy/tool
    # Header rules that claim an identity: authProxy goes over them.
    headerUp: ['X-Remote-User: injected', '+X-Remote-Group system:masters', 'X-Remote-Extra-Scopes: all', 'X-A: 1']
---
apiVersion: extensions.kubesphere.io/v1alpha1
kind: JSBundle
metadata: {{name: ui}}
spec: {{raw: ZXhwb3J0IGRlZmF1bHQge307Cg==}}
"""

POLICY = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: things-reader}
rules:
- apiGroups: [things.example.io]
  resources: [widgets]
  verbs: [get, list]
- nonResourceURLs: ["/proxy/tool/*"]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: readers}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: things-reader}
subjects:
- {kind: Group, name: readers, apiGroup: rbac.authorization.k8s.io}
"""


def token(sub: str, groups=(), **claims) -> str:  # type: ignore[no-untyped-def]
    now = int(time.time())
    body = {"sub": sub, "groups": list(groups), "exp": now + 600, "iat": now, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


class AuthGatewayTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.upstream = RecordingUpstream()
        self.upPort, port = listenUpstream(reactor, self.upstream)
        self.gw = RunningGateway({"all.yaml": MANIFESTS.format(port=port)})
        secret = os.path.join(self.gw.dir, "..", os.path.basename(self.gw.dir) + ".secret")
        with open(secret, "wb") as f:
            f.write(SECRET)
        policy = os.path.join(self.gw.dir, "..", os.path.basename(self.gw.dir) + ".policy.yaml")
        with open(policy, "w") as f:
            f.write(POLICY)
        self.gw.extraArgs = ["--jwt-hs256-secret-file", secret, "--authorization-policy-file", policy]
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        yield self.upPort.stopListening()

    def get(self, path: str, tok=None, method: str = "GET", **headers):  # type: ignore[no-untyped-def]
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        return httpRequest(self.gw.port, method, path, {k.replace("_", "-"): v for k, v in headers.items()})

    @defer.inlineCallbacks
    def test_matrix(self):  # type: ignore[no-untyped-def]
        reader = token("alice", ["readers"])
        stranger = token("bob", ["others"])
        cases = [
            # (path, method, token, expected status)
            ("/kapis/things.example.io/v1/widgets", "GET", reader, 200),
            ("/kapis/things.example.io/v1/namespaces/ns/widgets/w1", "GET", reader, 200),
            ("/kapis/things.example.io/v1/widgets", "POST", reader, 403),
            ("/kapis/things.example.io/v1/gadgets", "GET", reader, 403),
            ("/kapis/things.example.io/v1/widgets", "GET", stranger, 403),
            ("/kapis/things.example.io/v1/widgets", "GET", None, 401),
            ("/kapis/things.example.io/v1/widgets", "GET", "not-a-jwt", 401),
            ("/kapis/things.example.io/v1/widgets", "GET", token("eve", ["readers"], exp=int(time.time()) - 3600), 401),
            ("/proxy/tool/page", "GET", reader, 200),
            ("/proxy/tool/page", "DELETE", reader, 403),
            ("/proxy/tool/page", "GET", stranger, 403),
            ("/dist/ui/index.js", "GET", None, 200),  # bundles are public
        ]
        for path, method, tok, expected in cases:
            before = len(self.upstream.requests)
            status, headers, body = yield self.get(path, tok, method=method)
            self.assertEqual(status, expected, (path, method, body))
            if expected in (401, 403):
                doc = json.loads(body)
                self.assertEqual((doc["kind"], doc["code"]), ("Status", expected))
                self.assertEqual(len(self.upstream.requests), before, "a refused request reached the upstream")
                self.assertNotIn(tok or "\0", body.decode())
            if expected == 401:
                self.assertIn("www-authenticate", {k.lower() for k, _ in headers})

    @defer.inlineCallbacks
    def test_identityHeadersTrustworthy(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield self.get(
            "/kapis/things.example.io/v1/widgets",
            token("alice", ["readers"]),
            X_Remote_User="admin",
            X_Remote_Group="system:masters",
            X_Remote_Extra_Scopes="all",
        )
        self.assertEqual(status, 200)
        last = self.upstream.last
        self.assertEqual(last.headerAll(b"x-remote-user"), [b"alice"])
        self.assertEqual(sorted(last.headerAll(b"x-remote-group")), [b"readers", b"system:authenticated"])
        self.assertEqual(last.headerAll(b"x-remote-extra-scopes"), [])
        status, _, _ = yield self.get("/proxy/tool/page", token("alice", ["readers"]), X_Remote_User="admin")
        self.assertEqual(status, 200)
        last = self.upstream.last
        self.assertEqual(last.headerAll(b"x-remote-user"), [b"alice"])
        self.assertEqual(sorted(last.headerAll(b"x-remote-group")), [b"readers", b"system:authenticated"])
        self.assertEqual(last.headerAll(b"x-remote-extra-scopes"), [])
        self.assertEqual(last.headerAll(b"x-a"), [b"1"])  # the other rules still apply


class DefaultUpstreamTests(TestCase):
    """--default-upstream: unmatched /api and /apis go to a kube-apiserver with ksproxy's own credentials."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.kube = RecordingUpstream("kube")
        self.kubePort, kport = listenUpstream(reactor, self.kube)
        self.gw = RunningGateway({})
        base = os.path.join(self.gw.dir, "..", os.path.basename(self.gw.dir))
        with open(base + ".secret", "wb") as f:
            f.write(SECRET)
        with open(base + ".token", "w") as f:
            f.write("ksproxy-sa-token\n")
        self.gw.extraArgs = [
            "--jwt-hs256-secret-file", base + ".secret",
            "--default-upstream", f"http://127.0.0.1:{kport}",
            "--default-upstream-token-file", base + ".token",
        ]
        yield self.gw.start()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.gw.stop()
        yield self.kubePort.stopListening()

    @defer.inlineCallbacks
    def test_impersonatesTheCaller(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield httpRequest(
            self.gw.port,
            "GET",
            "/api/v1/namespaces/default/pods?watch=1",
            {"Authorization": f"Bearer {token('alice', ['devs'])}", "Impersonate-User": "system:admin"},
        )
        self.assertEqual(status, 200)
        last = self.kube.last
        self.assertEqual(last.uri, b"/api/v1/namespaces/default/pods?watch=1")
        self.assertEqual(last.headerAll(b"authorization"), [b"Bearer ksproxy-sa-token"])
        self.assertEqual(last.headerAll(b"impersonate-user"), [b"alice"])
        self.assertEqual(sorted(last.headerAll(b"impersonate-group")), [b"devs", b"system:authenticated"])

    @defer.inlineCallbacks
    def test_onlyKubePaths(self):  # type: ignore[no-untyped-def]
        status, _, _ = yield httpRequest(
            self.gw.port, "GET", "/other/path", {"Authorization": f"Bearer {token('alice')}"}
        )
        self.assertEqual(status, 404)
        self.assertEqual(self.kube.requests, [])
