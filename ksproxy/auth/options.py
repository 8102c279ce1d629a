# -*- test-case-name: tests.unit.test_auth_options -*-
"""
Command-line options for authentication and authorisation, and L{buildGate}, which turns parsed options
into a L{Gate}.

C{ksproxy.tap.RunOptions} mixes in L{AuthOptionsMixin}, whose C{postOptions} runs L{validateAuthOptions}
(the host's C{postOptions} calls C{super().postOptions()}); C{makeService} calls L{buildGate}.  Every file
is read there, at start-up, so a missing key or a broken policy stops the process with a clear message
instead of failing requests later.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from ksproxy.auth.attributes import RequestAttributes
from ksproxy.auth.gate import Gate
from ksproxy.auth.identity import Identity
from ksproxy.auth.interfaces import ALLOW, IAuthenticator, IAuthorizer, Verdict
from ksproxy.auth.kubeclient import IKubeReviewClient
from ksproxy.paths import compilePattern

__all__ = [
    "AUTH_OPTIONS",
    "AUTH_FLAGS",
    "AUTHORIZATION_MODES",
    "AuthOptionsMixin",
    "AlwaysAllow",
    "validateAuthOptions",
    "buildGate",
]

_log = Logger()

AUTHORIZATION_MODES = ("rbac-file", "sar", "always-allow")

# twisted.python.usage optParameters entries: [long, short, default, doc, coerce].
AUTH_OPTIONS: List[list] = [
    ["jwt-hs256-secret-file", None, None, "Accept bearer JWTs signed with HS256 by the secret in this file."],
    ["jwt-jwks-file", None, None, "Accept bearer JWTs signed by a key of this JWKS file (chosen by kid)."],
    ["jwt-issuer", None, None, "Required 'iss' claim of accepted JWTs."],
    ["jwt-username-claim", None, "sub", "JWT claim holding the user name."],
    ["jwt-groups-claim", None, "groups", "JWT claim holding the groups (a string or a list of strings)."],
    ["jwt-username-prefix", None, "", "Prefix added to user names from JWTs (e.g. 'jwt:')."],
    ["jwt-groups-prefix", None, "", "Prefix added to group names from JWTs."],
    ["jwt-leeway", None, 30.0, "Seconds of clock skew allowed on exp, nbf and iat.", float],
    ["token-file", None, None, "Static bearer tokens, Kubernetes CSV: token,user,uid,\"group1,group2\"."],
    ["token-review-ttl", None, 10.0, "Seconds a TokenReview answer is reused.", float],
    ["authorization-mode", None, None,
     "Comma-separated authorisers tried in order: rbac-file, sar, always-allow "
     "(default: rbac-file with --authorization-policy-file, else always-allow)."],
    ["authorization-policy-file", None, None, "Kubernetes RBAC YAML (Roles, ClusterRoles and bindings)."],
    ["sar-ttl", None, 10.0, "Seconds a SubjectAccessReview answer is reused.", float],
    ["auth-kubeconfig", None, None,
     "Kubeconfig for TokenReview/SubjectAccessReview (default: the source's client, in-cluster, ~/.kube/config)."],
]  # fmt: skip

# optFlags entries: [long, short, doc].
AUTH_FLAGS: List[list] = [
    ["token-review", None, "Accept bearer tokens the cluster accepts (TokenReview)."],
    [
        "anonymous",
        None,
        "Let requests without credentials through as system:anonymous when authentication is on.",
    ],
]

_LIST_OPTIONS = ("jwt-public-key", "jwt-audience", "public-path")


class AuthOptionsMixin:
    """
    Mix into a C{usage.Options} subclass (before C{usage.Options} in the bases) to get the auth options.
    Repeatable options are collected as lists under C{jwt-public-key}, C{jwt-audience} and C{public-path}.
    """

    optParameters = AUTH_OPTIONS
    optFlags = AUTH_FLAGS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in _LIST_OPTIONS:
            self[name] = []  # type: ignore[index]

    def postOptions(self) -> None:
        """Refuse impossible combinations at parse time; cooperative, so the host's C{postOptions} runs too."""
        validateAuthOptions(self)  # type: ignore[arg-type]
        super().postOptions()  # type: ignore[misc]

    def opt_jwt_public_key(self, path: str) -> None:
        """PEM file of public keys or certificates (RS*/PS*, ES*, EdDSA) for bearer JWTs; repeatable."""
        self["jwt-public-key"].append(path)  # type: ignore[index]

    def opt_jwt_audience(self, audience: str) -> None:
        """An accepted 'aud' of JWTs (one must match); repeatable."""
        self["jwt-audience"].append(audience)  # type: ignore[index]

    def opt_public_path(self, pattern: str) -> None:
        """Path pattern served without authentication or authorisation (/dist/* always is); repeatable."""
        self["public-path"].append(pattern)  # type: ignore[index]


def _modes(options: Mapping[str, Any]) -> List[str]:
    raw = options.get("authorization-mode")
    if not raw:
        return ["rbac-file"] if options.get("authorization-policy-file") else ["always-allow"]
    return [m.strip() for m in str(raw).split(",") if m.strip()]


def _jwtConfigured(options: Mapping[str, Any]) -> bool:
    return bool(
        options.get("jwt-hs256-secret-file") or options.get("jwt-public-key") or options.get("jwt-jwks-file")
    )


def validateAuthOptions(options: Mapping[str, Any]) -> None:
    """Check combinations that cannot work; raise C{usage.UsageError} saying which."""
    modes = _modes(options)
    for m in modes:
        if m not in AUTHORIZATION_MODES:
            raise usage.UsageError(
                f"--authorization-mode: unknown mode {m!r} (use {', '.join(AUTHORIZATION_MODES)})"
            )
    if len(set(modes)) != len(modes):
        raise usage.UsageError("--authorization-mode: a mode is listed twice")
    if "rbac-file" in modes and not options.get("authorization-policy-file"):
        raise usage.UsageError("--authorization-mode rbac-file needs --authorization-policy-file")
    if options.get("authorization-policy-file") and "rbac-file" not in modes:
        raise usage.UsageError("--authorization-policy-file is only used with --authorization-mode rbac-file")
    if not _jwtConfigured(options):
        for name in ("jwt-issuer", "jwt-audience"):
            if options.get(name):
                raise usage.UsageError(f"--{name} needs a JWT key (--jwt-hs256-secret-file, --jwt-public-key "
                                       "or --jwt-jwks-file)")  # fmt: skip
    for name in ("jwt-leeway", "token-review-ttl", "sar-ttl"):
        value = options.get(name)
        if value is not None and float(value) < 0:
            raise usage.UsageError(f"--{name} must not be negative")
    for pattern in options.get("public-path") or ():
        try:
            compilePattern(pattern)
        except ValueError as e:
            raise usage.UsageError(f"--public-path: {e}") from e
    for name in ("jwt-username-claim", "jwt-groups-claim"):
        if options.get(name) == "":
            raise usage.UsageError(f"--{name} must not be empty")


@implementer(IAuthorizer)
class AlwaysAllow:
    """Allows everything (the end of a chain that should let authenticated users do anything)."""

    def authorize(self, identity: Identity, attributes: RequestAttributes) -> Verdict:
        return ALLOW


def _reviewClient(options: Mapping[str, Any], reactor: Any, kubeApiClient: Any) -> IKubeReviewClient:
    from ksproxy.auth.kubeclient import ThreadedKubeClient, apiClientFromConfig

    if options.get("auth-kubeconfig"):
        return ThreadedKubeClient(apiClientFromConfig(options["auth-kubeconfig"]), reactor)
    if kubeApiClient is not None:
        if IKubeReviewClient.providedBy(kubeApiClient):
            return kubeApiClient
        return ThreadedKubeClient(kubeApiClient, reactor)
    return ThreadedKubeClient(apiClientFromConfig(None), reactor)


def buildGate(options: Mapping[str, Any], reactor: Any, *, kubeApiClient: Optional[Any] = None) -> Gate:
    """
    The gate the options describe.  With no authenticator and no authoriser configured, every request is
    anonymous and allowed (SPEC 7's development default).

    @param reactor: the clock for token expiry, caches and file reloads, and the thread pool for reviews.
    @param kubeApiClient: a C{kubernetes.client.ApiClient} (or an L{IKubeReviewClient}) for TokenReview and
        SubjectAccessReview; when absent and a review is asked for, one is built from C{--auth-kubeconfig},
        the in-cluster service account, or the default kubeconfig.
    @raise usage.UsageError: for bad combinations, and for key, token and policy files that do not load.
    """
    from ksproxy.auth import jwt as jwtauth
    from ksproxy.auth.rbac import PolicyError, RBACAuthorizer
    from ksproxy.auth.tokenfile import StaticTokenAuthenticator, TokenFileError

    validateAuthOptions(options)
    authenticators: List[IAuthenticator] = []
    reviewClient: Optional[IKubeReviewClient] = None

    def client() -> IKubeReviewClient:
        nonlocal reviewClient
        if reviewClient is None:
            reviewClient = _reviewClient(options, reactor, kubeApiClient)
        return reviewClient

    try:
        keys: List[jwtauth.VerificationKey] = []
        if options.get("jwt-hs256-secret-file"):
            keys.append(jwtauth.loadHMACSecretFile(options["jwt-hs256-secret-file"]))
        for path in options.get("jwt-public-key") or ():
            keys.extend(jwtauth.loadPEMKeyFile(path))
        if options.get("jwt-jwks-file"):
            keys.extend(jwtauth.loadJWKSFile(options["jwt-jwks-file"]))
    except (OSError, jwtauth.KeyFileError) as e:
        raise usage.UsageError(f"JWT keys: {e}") from e
    if keys:
        audiences: Sequence[str] = options.get("jwt-audience") or ()
        if not options.get("jwt-issuer") and not audiences:
            _log.warn(
                "JWTs are checked without --jwt-issuer or --jwt-audience: any token these keys sign is accepted"
            )
        authenticators.append(
            jwtauth.JWTAuthenticator(
                keys,
                reactor,
                issuer=options.get("jwt-issuer") or None,
                audiences=audiences,
                usernameClaim=options.get("jwt-username-claim") or "sub",
                groupsClaim=options.get("jwt-groups-claim") or "groups",
                usernamePrefix=options.get("jwt-username-prefix") or "",
                groupsPrefix=options.get("jwt-groups-prefix") or "",
                leeway=float(options.get("jwt-leeway", 30.0)),
            )
        )
    if options.get("token-file"):
        try:
            authenticators.append(StaticTokenAuthenticator(options["token-file"], reactor))
        except (OSError, TokenFileError) as e:
            raise usage.UsageError(f"--token-file: {e}") from e
    if options.get("token-review"):
        from ksproxy.auth.tokenreview import TokenReviewAuthenticator

        authenticators.append(
            TokenReviewAuthenticator(client(), reactor, ttl=float(options.get("token-review-ttl", 10.0)))
        )

    authorizers: List[IAuthorizer] = []
    modes = _modes(options)
    if modes != ["always-allow"]:
        for mode in modes:
            if mode == "rbac-file":
                try:
                    authorizers.append(RBACAuthorizer(options["authorization-policy-file"], reactor))
                except (OSError, PolicyError) as e:
                    raise usage.UsageError(f"--authorization-policy-file: {e}") from e
            elif mode == "sar":
                from ksproxy.auth.sar import SubjectAccessReviewAuthorizer

                authorizers.append(
                    SubjectAccessReviewAuthorizer(client(), reactor, ttl=float(options.get("sar-ttl", 10.0)))
                )
            else:
                authorizers.append(AlwaysAllow())

    return Gate(
        authenticators,
        authorizers,
        publicPaths=options.get("public-path") or (),
        anonymous=True if options.get("anonymous") else None,
    )
