"""The auth command-line options and buildGate: what each combination builds, and what it refuses."""

from __future__ import annotations

import os

import jwt
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.auth.gate import Gate
from ksproxy.auth.identity import ANONYMOUS, Decision
from ksproxy.auth.jwt import JWTAuthenticator
from ksproxy.auth.options import AlwaysAllow, AuthOptionsMixin, buildGate
from ksproxy.auth.rbac import RBACAuthorizer
from ksproxy.auth.sar import SubjectAccessReviewAuthorizer
from ksproxy.auth.tokenfile import StaticTokenAuthenticator
from ksproxy.auth.tokenreview import TokenReviewAuthenticator
from ksproxy.http.headers import Headers
from ksproxy.paths import parseTarget
from tests.unit.test_auth_reviews import FakeReviewClient

SECRET = b"0123456789abcdef0123456789abcdef"
POLICY = b"""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: b}
roleRef: {kind: ClusterRole, name: missing}
subjects: [{kind: User, name: alice}]
"""


class Options(AuthOptionsMixin, usage.Options):
    optParameters = [["listen", None, "tcp:8080", "where"]]


def parse(*argv: str) -> Options:
    o = Options()
    o.parseOptions(list(argv))
    return o


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        o = parse()
        self.assertEqual(o["jwt-username-claim"], "sub")
        self.assertEqual(o["jwt-groups-claim"], "groups")
        self.assertEqual(o["jwt-leeway"], 30.0)
        self.assertEqual(o["token-review-ttl"], 10.0)
        self.assertEqual((o["jwt-public-key"], o["jwt-audience"], o["public-path"]), ([], [], []))
        self.assertEqual((o["anonymous"], o["token-review"]), (0, 0))
        self.assertEqual(o["listen"], "tcp:8080")

    def test_repeatable_and_coerced(self):
        o = parse(
            "--jwt-public-key", "a.pem", "--jwt-public-key=b.pem", "--jwt-audience", "x", "--jwt-audience", "y",
            "--public-path", "/login", "--public-path", "/static/*", "--jwt-leeway", "5", "--anonymous",
        )  # fmt: skip
        self.assertEqual(o["jwt-public-key"], ["a.pem", "b.pem"])
        self.assertEqual(o["jwt-audience"], ["x", "y"])
        self.assertEqual(o["public-path"], ["/login", "/static/*"])
        self.assertEqual(o["jwt-leeway"], 5.0)
        self.assertEqual(o["anonymous"], 1)

    def test_help_lists_the_options(self):
        text = str(Options())
        for name in ("--jwt-hs256-secret-file", "--jwt-public-key", "--token-review", "--authorization-mode"):
            self.assertIn(name, text)


class BuildGateTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def file(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def build(self, *argv: str, client=None) -> Gate:
        return buildGate(parse(*argv), self.clock, kubeApiClient=client)

    def test_nothing_configured(self):
        gate = self.build()
        self.assertEqual((gate.authenticators, gate.authorizers, gate.anonymous), ((), (), True))
        decision = gate.check(b"DELETE", parseTarget(b"/api/v1/nodes/n"), Headers())
        self.assertEqual(decision, Decision(ANONYMOUS, 200))

    def test_everything_configured(self):
        client = FakeReviewClient()
        gate = self.build(
            "--jwt-hs256-secret-file", self.file("secret", SECRET + b"\n"),
            "--jwt-issuer", "me", "--jwt-audience", "ksproxy",
            "--token-file", self.file("tokens.csv", b"t,alice,1\n"),
            "--token-review",
            "--authorization-policy-file", self.file("policy.yaml", POLICY),
            "--authorization-mode", "rbac-file, sar,always-allow",
            "--public-path", "/login",
            client=client,
        )  # fmt: skip
        self.assertEqual(
            [type(a) for a in gate.authenticators],
            [JWTAuthenticator, StaticTokenAuthenticator, TokenReviewAuthenticator],
        )
        self.assertEqual(
            [type(a) for a in gate.authorizers], [RBACAuthorizer, SubjectAccessReviewAuthorizer, AlwaysAllow]
        )
        self.assertFalse(gate.anonymous)
        self.assertEqual([p.source for p in gate.publicPaths], ["/dist/*", "/login"])
        tok = jwt.encode({"sub": "bob", "exp": 1_700_000_100, "iss": "me", "aud": "ksproxy"}, SECRET, "HS256")
        headers = Headers([(b"Authorization", b"Bearer " + tok.encode())])
        d = gate.check(b"GET", parseTarget(b"/x"), headers)
        # RBAC has no opinion, so the SAR is asked (a Deferred); the cluster has none either, so always-allow.
        self.assertEqual(len(client.calls), 1)
        client.calls[0][2].callback({"status": {"allowed": False}})
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_policy_file_alone_means_rbac(self):
        gate = self.build("--authorization-policy-file", self.file("p.yaml", POLICY))
        self.assertEqual([type(a) for a in gate.authorizers], [RBACAuthorizer])
        self.assertTrue(gate.anonymous)  # no authenticator: anonymous, judged by the policy
        self.assertEqual(gate.check(b"GET", parseTarget(b"/x"), Headers()).code, 403)

    def test_authentication_alone_refuses_anonymous_unless_asked(self):
        secret = self.file("secret", SECRET)
        self.assertFalse(self.build("--jwt-hs256-secret-file", secret).anonymous)
        self.assertTrue(self.build("--jwt-hs256-secret-file", secret, "--anonymous").anonymous)

    def test_refused_combinations(self):
        secret = self.file("secret", SECRET)
        for argv, message in (
            (["--authorization-mode", "rbac"], "unknown mode 'rbac'"),
            (["--authorization-mode", "rbac-file"], "needs --authorization-policy-file"),
            (["--authorization-mode", "sar,sar"], "listed twice"),
            (["--authorization-policy-file", "p", "--authorization-mode", "sar"], "only used with"),
            (["--jwt-issuer", "me"], "--jwt-issuer needs a JWT key"),
            (["--jwt-audience", "me"], "--jwt-audience needs a JWT key"),
            (["--jwt-hs256-secret-file", secret, "--jwt-leeway", "-1"], "must not be negative"),
            (["--jwt-hs256-secret-file", secret, "--jwt-username-claim", ""], "must not be empty"),
            (["--public-path", "nope"], "--public-path"),
            (["--jwt-hs256-secret-file", self.file("short", b"short")], "at least 32"),
            (["--jwt-public-key", os.path.join(self.dir, "missing.pem")], "JWT keys"),
            (["--jwt-jwks-file", self.file("jwks", b"{}")], "JWKS"),
            (["--token-file", self.file("t.csv", b"a,b\n")], "--token-file"),
            (
                ["--authorization-policy-file", self.file("bad.yaml", b"kind: X")],
                "--authorization-policy-file",
            ),
        ):
            with self.assertRaises(usage.UsageError) as e:
                self.build(*argv)
            self.assertIn(message, str(e.exception), argv)


class ParseTimeValidationTests(SynchronousTestCase):
    def test_post_options_validates_and_chains(self):
        calls = []

        class Host(AuthOptionsMixin, usage.Options):
            def postOptions(self):
                calls.append("host")
                super().postOptions()

        with self.assertRaises(usage.UsageError):
            Host().parseOptions(["--authorization-mode", "nope"])
        self.assertEqual(calls, ["host"])
        Host().parseOptions(["--anonymous"])
        self.assertEqual(calls, ["host", "host"])
