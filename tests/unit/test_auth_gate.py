"""The gate: authenticator chain, authoriser chain, public paths, anonymous access and every error answer."""

from __future__ import annotations

import jwt
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ksproxy.auth.attributes import RequestAttributes, requestAttributes
from ksproxy.auth.gate import WWW_AUTHENTICATE, Gate, forbiddenMessage
from ksproxy.auth.identity import ANONYMOUS, Decision, Identity
from ksproxy.auth.interfaces import (
    ALLOW,
    DENY,
    NO_OPINION,
    IAuthenticator,
    IAuthorizer,
    Rejected,
    Unavailable,
    Verdict,
)
from ksproxy.auth.jwt import JWTAuthenticator, hmacKey
from ksproxy.auth.rbac import RBACAuthorizer
from ksproxy.auth.tokenreview import TokenReviewAuthenticator
from ksproxy.http.headers import Headers
from ksproxy.paths import parseTarget
from tests.unit.test_auth_reviews import FakeReviewClient, tokenReviewAnswer

NOW = 1_700_000_000
SECRET = b"k" * 32
AUTHENTICATED = "system:authenticated"


def check(gate: Gate, method: str, target: str, *headers) -> Decision | Deferred[Decision]:
    return gate.check(method.encode(), parseTarget(target.encode()), Headers(list(headers)))


def bearer(token: str):
    return (b"Authorization", b"Bearer " + token.encode())


def token(sub="alice", groups=("dev",), exp=NOW + 600, secret=SECRET):
    return jwt.encode({"sub": sub, "groups": list(groups), "exp": exp}, secret, algorithm="HS256")


@implementer(IAuthenticator)
class Fixed:
    """Answers every token with a fixed result (or a Deferred of it)."""

    def __init__(self, result):
        self.result = result
        self.seen = []

    def authenticate(self, token):
        self.seen.append(token)
        return self.result() if callable(self.result) else self.result


@implementer(IAuthorizer)
class FixedAuthz:
    def __init__(self, verdict):
        self.verdict = verdict
        self.seen = []

    def authorize(self, identity, attributes):
        self.seen.append((identity, attributes))
        return self.verdict() if callable(self.verdict) else self.verdict


class DefaultsTests(SynchronousTestCase):
    def test_nothing_configured_everything_anonymous_and_allowed(self):
        gate = Gate()
        for method, target in (
            ("GET", "/"),
            ("DELETE", "/api/v1/namespaces/a/pods/b"),
            ("POST", "/kapis/x/y/z"),
        ):
            self.assertEqual(check(gate, method, target), Decision(ANONYMOUS, 200))

    def test_credentials_without_authenticators_are_refused(self):
        # "Anonymous only when no Authorization header is present."
        decision = check(Gate(), "GET", "/", bearer("whatever"))
        self.assertEqual((decision.code, decision.wwwAuthenticate), (401, WWW_AUTHENTICATE))

    def test_authoriser_without_authenticator_judges_anonymous(self):
        authz = FixedAuthz(DENY)
        decision = check(Gate(authorizers=[authz]), "GET", "/healthz")
        self.assertEqual(decision.code, 403)
        self.assertEqual(decision.message, 'forbidden: User "system:anonymous" cannot get path "/healthz"')
        self.assertEqual(authz.seen[0][0], ANONYMOUS)


class PublicPathTests(SynchronousTestCase):
    def setUp(self):
        self.auth = Fixed(Rejected("nope"))
        self.gate = Gate([self.auth], [FixedAuthz(DENY)], publicPaths=["/login", "/static/*", "/oauth*"])

    def test_public_paths_skip_both_chains(self):
        for target in (
            "/dist/ext/index.js",
            "/dist/a/b/c",
            "/login",
            "/static/x.css",
            "/oauth/callback",
            "/oauthx",
        ):
            self.assertEqual(check(self.gate, "GET", target, bearer("broken")), Decision(None, 200), target)
        self.assertEqual(self.auth.seen, [])

    def test_not_public(self):
        for target in ("/dist", "/distx/a", "/login/x", "/static", "/dist%2Fa", "/api/dist/x"):
            decision = check(self.gate, "GET", target)
            self.assertEqual(decision.code, 401, target)

    def test_dot_segments_cannot_escape_a_public_prefix(self):
        self.assertEqual(check(self.gate, "GET", "/dist/../api/v1/secrets").code, 401)
        self.assertEqual(check(self.gate, "GET", "/dist/%2e%2e/api/v1/secrets").code, 401)


class AuthenticationTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.jwt = JWTAuthenticator([hmacKey(SECRET)], self.clock)

    def test_absent_credential_is_401_when_authentication_is_on(self):
        decision = check(Gate([self.jwt]), "GET", "/api/v1/pods")
        self.assertEqual(decision, Decision(None, 401, "Unauthorized", WWW_AUTHENTICATE))

    def test_anonymous_when_enabled(self):
        self.assertEqual(check(Gate([self.jwt], anonymous=True), "GET", "/x"), Decision(ANONYMOUS, 200))

    def test_valid_token_is_synchronous_and_adds_authenticated_group(self):
        decision = check(Gate([self.jwt]), "GET", "/x", bearer(token()))
        self.assertEqual(decision, Decision(Identity("alice", groups=("dev", AUTHENTICATED)), 200))

    def test_invalid_credential_is_401_never_anonymous(self):
        gate = Gate([self.jwt], anonymous=True)
        bad = token(secret=b"x" * 32)
        for headers, message in (
            ([bearer(token(exp=NOW - 100))], "invalid bearer token: token has expired"),
            ([bearer(bad)], "invalid bearer token: token signature is invalid"),
            ([bearer("opaque")], "invalid bearer token"),
            ([(b"Authorization", b"Basic YWxpY2U6cHc=")], "unsupported authorization scheme (use Bearer)"),
            ([(b"Authorization", b"Bearer")], "malformed bearer token"),
            ([(b"Authorization", b"Bearer   ")], "malformed bearer token"),
            ([(b"Authorization", b"Bearer a b")], "malformed bearer token"),
            ([(b"Authorization", "Bearer é".encode())], "malformed bearer token"),
            ([bearer(token()), bearer(token())], "more than one Authorization header"),
        ):
            decision = check(gate, "GET", "/x", *headers)
            self.assertEqual(decision, Decision(None, 401, message, WWW_AUTHENTICATE), headers)
            self.assertNotIn(bad, decision.message)

    def test_scheme_is_case_insensitive(self):
        decision = check(Gate([self.jwt]), "GET", "/x", (b"authorization", b"bearer " + token().encode()))
        self.assertEqual(decision.code, 200)

    def test_chain_first_acceptance_wins_and_first_rejection_is_reported(self):
        static = Fixed(lambda: None)
        later = Fixed(Identity("bob"))
        gate = Gate([self.jwt, static, later])
        # A JWT the JWT authenticator rejects is still offered to the others (a service-account token is a JWT).
        decision = check(gate, "GET", "/x", bearer(token(secret=b"x" * 32)))
        self.assertEqual(decision.identity, Identity("bob", groups=(AUTHENTICATED,)))
        self.assertEqual(len(static.seen), 1)
        gate = Gate([self.jwt, static])
        decision = check(gate, "GET", "/x", bearer(token(exp=NOW - 100)))
        self.assertEqual(decision.message, "invalid bearer token: token has expired")

    def test_unavailable_is_503(self):
        decision = check(Gate([Fixed(Unavailable("api down"))]), "GET", "/x", bearer("t"))
        self.assertEqual(decision, Decision(None, 503, "authentication is unavailable: api down"))

    def test_deferred_authenticator(self):
        pending = Deferred()
        after = Fixed(Identity("carol"))
        gate = Gate([Fixed(lambda: pending), after])
        d = check(gate, "GET", "/x", bearer("t"))
        self.assertNoResult(d)
        pending.callback(None)  # not this authenticator's token: the chain goes on
        self.assertEqual(self.successResultOf(d), Decision(Identity("carol", groups=(AUTHENTICATED,)), 200))

    def test_deferred_rejection_then_sync_rejection(self):
        gate = Gate([Fixed(lambda: succeed(Rejected("first"))), Fixed(Rejected("second"))])
        d = check(gate, "GET", "/x", bearer("t"))
        self.assertEqual(self.successResultOf(d).message, "invalid bearer token: first")

    def test_internal_errors_become_503(self):
        def boom():
            raise RuntimeError("bug")

        decision = check(Gate([Fixed(boom)]), "GET", "/x", bearer("t"))
        self.assertEqual(decision.code, 503)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        d = check(Gate([Fixed(lambda: fail(RuntimeError("async bug")))]), "GET", "/x", bearer("t"))
        self.assertEqual(self.successResultOf(d).code, 503)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cancelled_check_is_quiet(self):
        d = check(Gate([Fixed(lambda: Deferred())]), "GET", "/x", bearer("t"))
        d.cancel()
        self.assertEqual(self.successResultOf(d).code, 503)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_token_review_through_the_gate_cached_on_both_sides_of_the_ttl(self):
        client = FakeReviewClient()
        gate = Gate([self.jwt, TokenReviewAuthenticator(client, self.clock, ttl=10)])
        d = check(gate, "GET", "/x", bearer("sa-token"))
        client.calls[0][2].callback(tokenReviewAnswer())
        self.assertEqual(self.successResultOf(d).identity.user, "alice")
        self.clock.advance(9.99)
        decision = check(gate, "GET", "/x", bearer("sa-token"))
        self.assertIsInstance(decision, Decision)  # a cache hit needs no Deferred
        self.assertEqual(decision.code, 200)
        self.clock.advance(0.02)
        d = check(gate, "GET", "/x", bearer("sa-token"))
        self.assertNoResult(d)
        self.assertEqual(len(client.calls), 2)
        client.calls[1][2].callback(tokenReviewAnswer(authenticated=False))
        self.assertEqual(self.successResultOf(d).code, 401)


class AuthorisationTests(SynchronousTestCase):
    alice = Identity("alice", groups=(AUTHENTICATED,))

    def gate(self, *authorizers):
        return Gate([Fixed(Identity("alice"))], list(authorizers))

    def test_union_semantics(self):
        for verdicts, code in (
            ([ALLOW], 200),
            ([DENY, ALLOW], 403),
            ([NO_OPINION, ALLOW], 200),
            ([NO_OPINION, NO_OPINION], 403),
            ([Verdict("noOpinion", error="sar down"), ALLOW], 200),
            ([Verdict("noOpinion", error="sar down"), NO_OPINION], 503),
        ):
            decision = check(self.gate(*map(FixedAuthz, verdicts)), "GET", "/api/v1/pods", bearer("t"))
            self.assertEqual(decision.code, code, verdicts)
            self.assertEqual(decision.identity, self.alice)

    def test_deferred_authoriser(self):
        pending = Deferred()
        gate = self.gate(FixedAuthz(lambda: pending), FixedAuthz(ALLOW))
        d = check(gate, "GET", "/x", bearer("t"))
        self.assertNoResult(d)
        pending.callback(NO_OPINION)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_denial_reason_appended(self):
        decision = check(
            self.gate(FixedAuthz(Verdict("deny", reason="policy says no"))), "GET", "/x", bearer("t")
        )
        self.assertEqual(decision.message, 'forbidden: User "alice" cannot get path "/x": policy says no')

    def test_authoriser_exception_is_503(self):
        def boom():
            raise KeyError("bug")

        decision = check(self.gate(FixedAuthz(boom)), "GET", "/x", bearer("t"))
        self.assertEqual(decision.code, 503)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_attributes_passed(self):
        authz = FixedAuthz(ALLOW)
        check(self.gate(authz), "GET", "/api/v1/namespaces/default/pods?watch=1", bearer("t"))
        a = authz.seen[0][1]
        self.assertEqual((a.verb, a.namespace, a.resource), ("watch", "default", "pods"))


def attrsOf(method, target):
    p = parseTarget(target.encode())
    return requestAttributes(method.encode(), p.segments, p.query or b"")


@pytest.mark.parametrize(
    "a,message",
    [
        (
            attrsOf("GET", "/api/v1/namespaces/default/pods/web"),
            'pods "web" is forbidden: User "alice" cannot get resource "pods" in API group "" in the namespace "default"',
        ),
        (
            attrsOf("GET", "/api/v1/namespaces/default/pods"),
            'pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "default"',
        ),
        (
            attrsOf("PUT", "/apis/apps/v1/namespaces/a/deployments/web/scale"),
            'deployments.apps "web" is forbidden: User "alice" cannot update resource "deployments/scale" '
            'in API group "apps" in the namespace "a"',
        ),
        (
            attrsOf("GET", "/api/v1/nodes"),
            'nodes is forbidden: User "alice" cannot list resource "nodes" in API group "" at the cluster scope',
        ),
        (
            attrsOf("GET", "/kapis/tenant.kubesphere.io/v1alpha3/workspaces/ws1/namespaces"),
            'namespaces.tenant.kubesphere.io is forbidden: User "alice" cannot list resource "namespaces" '
            'in API group "tenant.kubesphere.io" in the workspace "ws1"',
        ),
        (
            RequestAttributes(verb="post", path="/healthz"),
            'forbidden: User "alice" cannot post path "/healthz"',
        ),
    ],
)
def test_forbidden_messages(a, message):
    assert forbiddenMessage(Identity("alice"), a) == message


class EndToEndPolicyTests(SynchronousTestCase):
    """JWTs and a policy file together: only the identities the policy allows reach each route."""

    POLICY = b"""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ext-reader}
rules:
- apiGroups: ["devops.kubesphere.io"]
  resources: ["pipelines", "pipelines/runs"]
  verbs: ["get", "list"]
- nonResourceURLs: ["/proxy/devops/*"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ext-writer}
rules:
- apiGroups: ["devops.kubesphere.io"]
  resources: ["*"]
  verbs: ["*"]
- nonResourceURLs: ["/proxy/devops/*"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: readers}
roleRef: {kind: ClusterRole, name: ext-reader}
subjects: [{kind: Group, name: system:authenticated}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: writers, namespace: proj}
roleRef: {kind: ClusterRole, name: ext-writer}
subjects: [{kind: Group, name: devops-admins}]
"""

    def setUp(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(self.POLICY)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.gate = Gate(
            [JWTAuthenticator([hmacKey(SECRET)], self.clock)],
            [RBACAuthorizer(path, self.clock)],
            anonymous=True,
        )

    def test_matrix(self):
        reader = bearer(token("rita", groups=()))
        admin = bearer(token("adam", groups=("devops-admins",)))
        runs = "/kapis/devops.kubesphere.io/v1alpha3/namespaces/proj/pipelines/p1/runs"
        other = "/kapis/devops.kubesphere.io/v1alpha3/namespaces/other/pipelines/p1/runs"
        for who, method, target, code in (
            (reader, "GET", runs, 200),
            (reader, "POST", runs, 403),
            (admin, "POST", runs, 200),
            (admin, "POST", other, 403),
            (admin, "GET", other, 200),
            (reader, "GET", "/proxy/devops/ui", 200),
            (reader, "POST", "/proxy/devops/ui", 403),
            (admin, "GET", "/proxy/devops/ui", 200),
            (admin, "POST", "/proxy/devops/ui", 403),  # a RoleBinding never grants non-resource URLs
            (None, "GET", runs, 403),  # anonymous is allowed in, but the policy grants it nothing
            (None, "GET", "/dist/devops/index.js", 200),
            (bearer(token("rita", exp=NOW - 1000)), "GET", runs, 401),
        ):
            headers = [who] if who else []
            decision = check(self.gate, method, target, *headers)
            self.assertIsInstance(decision, Decision)
            self.assertEqual(decision.code, code, (who, method, target, decision.message))
