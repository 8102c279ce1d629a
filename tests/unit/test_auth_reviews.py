"""TokenReview and SubjectAccessReview against a fake client: request shape, answers, and cache lifetimes."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ksproxy.auth.attributes import requestAttributes
from ksproxy.auth.identity import Identity
from ksproxy.auth.interfaces import IAuthenticator, IAuthorizer, Rejected, Unavailable, Verdict
from ksproxy.auth.kubeclient import IKubeReviewClient, KubeAPIError
from ksproxy.auth.sar import SAR_PATH, SubjectAccessReviewAuthorizer, subjectAccessReview
from ksproxy.auth.tokenreview import TOKENREVIEW_PATH, TokenReviewAuthenticator, identityFromTokenReview


@implementer(IKubeReviewClient)
class FakeReviewClient:
    """Records each call and hands back a Deferred the test fires."""

    def __init__(self):
        self.calls = []

    def create(self, path, body):
        d = Deferred()
        self.calls.append((path, body, d))
        return d


def tokenReviewAnswer(authenticated=True, **user):
    status = {"authenticated": authenticated}
    if authenticated:
        status["user"] = {"username": "alice", "uid": "u1", "groups": ["dev", "system:authenticated"], **user}
    return {"kind": "TokenReview", "status": status}


class TokenReviewTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.client = FakeReviewClient()
        self.auth = TokenReviewAuthenticator(self.client, self.clock, ttl=10)

    def test_interface(self):
        verifyObject(IAuthenticator, self.auth)

    def test_request_and_identity(self):
        d = self.auth.authenticate("tok")
        self.assertNoResult(d)
        [(path, body, pending)] = self.client.calls
        self.assertEqual(path, TOKENREVIEW_PATH)
        self.assertEqual(
            body, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "tok"}}
        )
        pending.callback(tokenReviewAnswer(extra={"scopes": ["a"]}))
        self.assertEqual(
            self.successResultOf(d),
            Identity("alice", "u1", ("dev", "system:authenticated"), {"scopes": ("a",)}),
        )

    def test_success_cached_for_the_ttl(self):
        d = self.auth.authenticate("tok")
        self.client.calls[0][2].callback(tokenReviewAnswer())
        identity = self.successResultOf(d)
        self.clock.advance(9.9)
        self.assertEqual(self.auth.authenticate("tok"), identity)  # synchronous: no Deferred
        self.assertEqual(len(self.client.calls), 1)
        self.clock.advance(0.2)
        again = self.auth.authenticate("tok")
        self.assertIsInstance(again, Deferred)
        self.assertEqual(len(self.client.calls), 2)

    def test_refusal_cached_as_refusal(self):
        d = self.auth.authenticate("bad")
        self.client.calls[0][2].callback(tokenReviewAnswer(authenticated=False))
        self.assertEqual(self.successResultOf(d), Rejected("token was not accepted by the cluster"))
        self.clock.advance(5)
        self.assertEqual(self.auth.authenticate("bad"), Rejected("token was not accepted by the cluster"))
        self.assertEqual(len(self.client.calls), 1)

    def test_errors_never_cached(self):
        d = self.auth.authenticate("tok")
        self.client.calls[0][2].errback(KubeAPIError(500, "boom"))
        self.assertIsInstance(self.successResultOf(d), Unavailable)
        self.assertEqual(self.flushLoggedErrors(), [])  # an API error is a warning line, not a logged failure
        d2 = self.auth.authenticate("tok")
        self.assertEqual(len(self.client.calls), 2)
        self.client.calls[1][2].callback(tokenReviewAnswer())
        self.assertIsInstance(self.successResultOf(d2), Identity)

    def test_different_tokens_not_shared(self):
        self.auth.authenticate("a")
        self.auth.authenticate("b")
        self.assertEqual(len(self.client.calls), 2)

    def test_concurrent_misses_coalesced(self):
        d1 = self.auth.authenticate("tok")
        d2 = self.auth.authenticate("tok")
        d3 = self.auth.authenticate("tok")
        d2.cancel()
        self.assertEqual(len(self.client.calls), 1)
        self.client.calls[0][2].callback(tokenReviewAnswer())
        self.assertEqual(self.successResultOf(d1).user, "alice")
        self.failureResultOf(d2, CancelledError)
        self.assertEqual(self.successResultOf(d3).user, "alice")

    def test_malformed_answers(self):
        for answer in (
            {},
            {"status": {"authenticated": True}},
            {"status": {"authenticated": True, "user": {"username": ""}}},
            {"status": {"authenticated": True, "user": {"username": "a", "groups": "g"}}},
            {"status": {"authenticated": True, "user": {"username": "a", "extra": {"k": "v"}}}},
            [],
        ):
            self.assertIsInstance(identityFromTokenReview(answer), Unavailable, answer)
        self.assertIsInstance(
            identityFromTokenReview({"status": {"authenticated": True, "user": {"username": "a\r\nb"}}}),
            Rejected,
        )

    def test_audiences_sent(self):
        auth = TokenReviewAuthenticator(self.client, self.clock, audiences=["ksproxy"])
        auth.authenticate("t")
        self.assertEqual(self.client.calls[0][1]["spec"], {"token": "t", "audiences": ["ksproxy"]})


ALICE = Identity("alice", "u1", ("dev", "system:authenticated"), {"scopes": ("x",)})


def attrsOf(method, segments, query=b""):
    return requestAttributes(method, segments, query)


class SubjectAccessReviewTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.client = FakeReviewClient()
        self.authz = SubjectAccessReviewAuthorizer(self.client, self.clock, ttl=10)
        self.pods = attrsOf(b"GET", ("api", "v1", "namespaces", "default", "pods", "web", "log"))

    def answer(self, i, **status):
        self.client.calls[i][2].callback({"kind": "SubjectAccessReview", "status": status})

    def test_interface(self):
        verifyObject(IAuthorizer, self.authz)

    def test_resource_request_shape(self):
        self.assertEqual(
            subjectAccessReview(ALICE, self.pods),
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": "alice",
                    "uid": "u1",
                    "groups": ["dev", "system:authenticated"],
                    "extra": {"scopes": ["x"]},
                    "resourceAttributes": {
                        "namespace": "default",
                        "verb": "get",
                        "group": "",
                        "version": "v1",
                        "resource": "pods",
                        "subresource": "log",
                        "name": "web",
                    },
                },
            },
        )

    def test_non_resource_request_shape(self):
        spec = subjectAccessReview(Identity("bob"), attrsOf(b"POST", ("healthz",)))["spec"]
        self.assertEqual(
            spec, {"user": "bob", "groups": [], "nonResourceAttributes": {"path": "/healthz", "verb": "post"}}
        )

    def test_verdicts(self):
        for status, expected in (
            ({"allowed": True}, Verdict("allow")),
            ({"allowed": True, "reason": "rbac"}, Verdict("allow", reason="rbac")),
            ({"allowed": False, "denied": True, "reason": "no"}, Verdict("deny", reason="no")),
            ({"allowed": False}, Verdict("noOpinion")),
        ):
            client = FakeReviewClient()
            authz = SubjectAccessReviewAuthorizer(client, self.clock)
            d = authz.authorize(ALICE, self.pods)
            self.assertEqual(client.calls[0][0], SAR_PATH)
            client.calls[0][2].callback({"status": status})
            self.assertEqual(self.successResultOf(d), expected)

    def test_cached_for_the_ttl_per_identity_and_attributes(self):
        d = self.authz.authorize(ALICE, self.pods)
        self.answer(0, allowed=True)
        self.assertEqual(self.successResultOf(d).decision, "allow")
        self.clock.advance(9.9)
        self.assertEqual(self.authz.authorize(ALICE, self.pods).decision, "allow")
        self.assertEqual(len(self.client.calls), 1)
        # Another user, or another request, is another question.
        self.authz.authorize(Identity("bob"), self.pods)
        self.authz.authorize(ALICE, attrsOf(b"DELETE", ("api", "v1", "namespaces", "default", "pods", "web")))
        self.assertEqual(len(self.client.calls), 3)
        self.clock.advance(0.2)
        self.assertIsInstance(self.authz.authorize(ALICE, self.pods), Deferred)
        self.assertEqual(len(self.client.calls), 4)

    def test_denial_cached_errors_not(self):
        d = self.authz.authorize(ALICE, self.pods)
        self.answer(0, allowed=False, denied=True)
        self.assertEqual(self.successResultOf(d).decision, "deny")
        self.assertEqual(self.authz.authorize(ALICE, self.pods).decision, "deny")
        self.clock.advance(11)
        d = self.authz.authorize(ALICE, self.pods)
        self.client.calls[1][2].errback(ConnectionRefusedError())
        self.assertTrue(self.successResultOf(d).error)
        self.assertEqual(self.flushLoggedErrors(), [])  # connection refused: a warning line
        self.assertIsInstance(self.authz.authorize(ALICE, self.pods), Deferred)
        self.assertEqual(len(self.client.calls), 3)

    def test_answer_without_status_is_an_error(self):
        d = self.authz.authorize(ALICE, self.pods)
        self.client.calls[0][2].callback({"kind": "Status"})
        self.assertTrue(self.successResultOf(d).error)


class CacheBoundTests(SynchronousTestCase):
    def test_oldest_entries_evicted_beyond_max_size(self):
        clock = Clock()
        client = FakeReviewClient()
        auth = TokenReviewAuthenticator(client, clock, ttl=10, maxSize=2)
        for i, tok in enumerate(("a", "b", "c")):
            auth.authenticate(tok)
            client.calls[i][2].callback(tokenReviewAnswer())
        self.assertEqual(len(auth._cache), 2)
        self.assertIsInstance(auth.authenticate("c"), Identity)
        self.assertIsInstance(auth.authenticate("a"), Deferred)  # evicted: asked again
