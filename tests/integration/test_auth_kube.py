"""
TokenReview and SubjectAccessReview through the official client, against the local fake API server.

Real HTTP on 127.0.0.1 and the reactor's thread pool: the path a production gate takes, minus the cluster.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from ksproxy.auth.gate import Gate
from ksproxy.auth.identity import Decision, Identity
from ksproxy.auth.kubeclient import ThreadedKubeClient, apiClientFromConfig
from ksproxy.auth.options import buildGate
from ksproxy.auth.sar import SAR_PATH, SubjectAccessReviewAuthorizer
from ksproxy.auth.tokenreview import TOKENREVIEW_PATH, TokenReviewAuthenticator
from ksproxy.http.headers import Headers
from ksproxy.paths import parseTarget
from ksproxy.testing.kubeapi import FakeKubeAPI
from tests.util import capturedLog

USERS = {
    "alice-token": {"username": "alice", "uid": "a1", "groups": ["dev", "system:authenticated"]},
    "bob-token": {
        "username": "bob",
        "uid": "b1",
        "groups": ["system:authenticated"],
        "extra": {"scopes": ["x"]},
    },
}


def tokenReview(body):
    user = USERS.get(body["spec"]["token"])
    status = (
        {"authenticated": True, "user": user} if user else {"authenticated": False, "error": "invalid token"}
    )
    return 201, dict(body, status=status)


def subjectAccessReview(body):
    spec = body["spec"]
    ra = spec.get("resourceAttributes") or {}
    if spec["user"] == "alice" and ra.get("namespace") == "dev":
        status = {"allowed": True, "reason": "alice owns dev"}
    elif spec["user"] == "bob" and ra.get("resource") == "secrets":
        status = {"allowed": False, "denied": True, "reason": "secrets are off limits"}
    else:
        status = {"allowed": False}
    return 201, dict(body, status=status)


def check(gate: Gate, method: bytes, target: bytes, token: str | None = None):
    headers = Headers([(b"Authorization", b"Bearer " + token.encode())] if token else [])
    return gate.check(method, parseTarget(target), headers)


class ReviewTests(TestCase):
    timeout = 20

    def setUp(self):
        self.api = FakeKubeAPI()
        self.api.addPostHandler(TOKENREVIEW_PATH, tokenReview)
        self.api.addPostHandler(SAR_PATH, subjectAccessReview)
        self.api.start()
        self.addCleanup(self.api.stop)
        tmp = self.mktemp()
        os.makedirs(tmp)
        self.kubeconfig = self.api.kubeconfig(os.path.join(tmp, "kubeconfig"))
        self.apiClient = apiClientFromConfig(self.kubeconfig)
        self.addCleanup(self.apiClient.close)
        client = ThreadedKubeClient(self.apiClient, reactor, timeout=5)
        self.gate = Gate(
            [TokenReviewAuthenticator(client, reactor, ttl=10)],
            [SubjectAccessReviewAuthorizer(client, reactor, ttl=10)],
        )

    def posts(self, path):
        return [r for r in self.api.requests if r.method == "POST" and r.path == path]

    @inlineCallbacks
    def test_token_review_and_access_review(self):
        d = check(self.gate, b"GET", b"/api/v1/namespaces/dev/pods", "alice-token")
        self.assertIsInstance(d, Deferred)
        decision = yield d
        alice = Identity("alice", "a1", ("dev", "system:authenticated"))
        self.assertEqual(decision, Decision(alice, 200))
        [review] = self.posts(TOKENREVIEW_PATH)
        self.assertEqual(review.json()["spec"], {"token": "alice-token"})
        self.assertEqual(review.headers["authorization"], "Bearer fake-token")  # ksproxy's own credentials
        [sar] = self.posts(SAR_PATH)
        self.assertEqual(
            sar.json()["spec"],
            {
                "user": "alice",
                "uid": "a1",
                "groups": ["dev", "system:authenticated"],
                "resourceAttributes": {
                    "namespace": "dev", "verb": "list", "group": "", "version": "v1", "resource": "pods",
                },
            },
        )  # fmt: skip
        # Both answers are cached: the same request again is decided at once, without a Deferred.
        self.assertEqual(check(self.gate, b"GET", b"/api/v1/namespaces/dev/pods", "alice-token"), decision)
        self.assertEqual(len(self.api.requests), 2)

    @inlineCallbacks
    def test_refusals(self):
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/dev/pods", "stolen-token")
        self.assertEqual((decision.code, decision.identity), (401, None))
        self.assertNotIn("stolen-token", decision.message)
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/prod/secrets/db", "bob-token")
        self.assertEqual(decision.code, 403)
        self.assertEqual(decision.identity.extra, {"scopes": ("x",)})
        self.assertEqual(
            decision.message,
            'secrets "db" is forbidden: User "bob" cannot get resource "secrets" in API group "" '
            'in the namespace "prod": secrets are off limits',
        )
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/prod/pods", "alice-token")
        self.assertEqual(decision.code, 403)

    def _warnLines(self) -> list:
        from twisted.logger import LogLevel

        return capturedLog(self, level=LogLevel.warn)

    @inlineCallbacks
    def test_api_failures_are_503_and_not_cached(self):
        warnings = self._warnLines()
        self.api.failNext(TOKENREVIEW_PATH, 500)
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/dev/pods", "alice-token")
        self.assertEqual(decision.code, 503)
        # An API server that fails is expected at some point: one warning line, not a logged traceback.
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(any(w.startswith("TokenReview failed: KubeAPIError: 500") for w in warnings), warnings)
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/dev/pods", "alice-token")
        self.assertEqual(decision.code, 200)
        self.api.failNext(SAR_PATH, 503)
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/dev/configmaps", "alice-token")
        self.assertEqual(decision.code, 503)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(any(w.startswith("SubjectAccessReview failed: KubeAPIError: 503") for w in warnings))
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/dev/configmaps", "alice-token")
        self.assertEqual(decision.code, 200)

    @inlineCallbacks
    def test_api_server_down(self):
        warnings = self._warnLines()
        self.api.stop()
        decision = yield check(self.gate, b"GET", b"/api/v1/namespaces/dev/pods", "alice-token")
        self.assertEqual(decision.code, 503)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(any(w.startswith("TokenReview failed: ") for w in warnings), warnings)

    @inlineCallbacks
    def test_build_gate_from_options(self):
        gate = buildGate(
            {"token-review": True, "authorization-mode": "sar", "auth-kubeconfig": self.kubeconfig}, reactor
        )
        decision = yield check(gate, b"DELETE", b"/api/v1/namespaces/dev/pods/web", "alice-token")
        self.assertEqual(decision.code, 200)
        decision = check(gate, b"GET", b"/api/v1/namespaces/dev/pods")
        self.assertEqual(decision.code, 401)  # authentication is on: no anonymous
        # The source's client can be handed over instead of a kubeconfig.
        gate = buildGate({"token-review": True}, reactor, kubeApiClient=self.apiClient)
        decision = yield check(gate, b"GET", b"/x", "bob-token")
        self.assertEqual((decision.code, decision.identity.user), (200, "bob"))
