# -*- test-case-name: tests.unit.test_auth_gate -*-
"""
The one place a request is authenticated and authorised (SPEC 7), in front of every route.

L{Gate.check} answers synchronously whenever no I/O is needed (public paths, anonymous requests, JWTs,
static tokens, the policy file, cached reviews): that is the hot path and it allocates no Deferred.  Only a
TokenReview or SubjectAccessReview cache miss returns a Deferred.  It never raises and never fails a
Deferred: anything unexpected becomes a logged 503 decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ksproxy.auth.attributes import RequestAttributes, requestAttributes
from ksproxy.auth.identity import ANONYMOUS, Decision, Identity
from ksproxy.auth.interfaces import AuthnResult, IAuthenticator, IAuthorizer, Rejected, Unavailable, Verdict
from ksproxy.paths import PathPattern, compilePattern

if TYPE_CHECKING:
    from ksproxy.http.headers import Headers
    from ksproxy.paths import RequestPath

__all__ = ["Gate", "ALWAYS_PUBLIC", "WWW_AUTHENTICATE", "forbiddenMessage", "AUTHENTICATED_GROUP"]

_log = Logger()

ALWAYS_PUBLIC = ("/dist/*",)
WWW_AUTHENTICATE = b'Bearer realm="ksproxy"'
AUTHENTICATED_GROUP = "system:authenticated"
_VISIBLE_ASCII = bytes(range(0x21, 0x7F))

DecisionResult = Union[Decision, "Deferred[Decision]"]


def forbiddenMessage(identity: Identity, a: RequestAttributes, reason: str = "") -> str:
    """The kube-apiserver's 403 message for C{a}, word for word where Kubernetes has one."""
    user = identity.user
    if not a.isResourceRequest:
        message = f'forbidden: User "{user}" cannot {a.verb} path "{a.path}"'
    else:
        resource = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        if a.namespace:
            scope = f'in the namespace "{a.namespace}"'
        elif a.workspace:
            scope = f'in the workspace "{a.workspace}"'
        else:
            scope = "at the cluster scope"
        qualified = f"{a.resource}.{a.apiGroup}" if a.apiGroup else a.resource
        subject = f'{qualified} "{a.name}"' if a.name else qualified
        message = (
            f'{subject} is forbidden: User "{user}" cannot {a.verb} resource "{resource}" '
            f'in API group "{a.apiGroup}" {scope}'
        )
    if reason:
        message = f"{message}: {reason}"
    return message


def _withAuthenticatedGroup(identity: Identity) -> Identity:
    if AUTHENTICATED_GROUP in identity.groups:
        return identity
    return Identity(identity.user, identity.uid, (*identity.groups, AUTHENTICATED_GROUP), identity.extra)


class Gate:
    """
    Authenticator chain, then authoriser chain.

    @param authenticators: tried in order; the first to return an identity wins.  A token one of them
        rejects is still offered to the next (a cluster service-account token is a JWT too); when none
        accepts it, the first rejection's reason is the 401 message.  An authenticator that cannot decide
        (L{Unavailable}) ends the chain with 503.
    @param authorizers: tried in order (Kubernetes' union authoriser): the first allow or deny decides, no
        opinion passes on, and the end of the chain denies.  None at all: everything is allowed.
    @param publicPaths: path patterns (SPEC 2.1 syntax) that skip both chains; C{/dist/*} is always one.
    @param anonymous: let requests without C{Authorization} through as L{ANONYMOUS}.  Defaults to "only if
        there is no authenticator" (SPEC 7).
    """

    def __init__(
        self,
        authenticators: Sequence[IAuthenticator] = (),
        authorizers: Sequence[IAuthorizer] = (),
        *,
        publicPaths: Iterable[str] = (),
        anonymous: Optional[bool] = None,
    ) -> None:
        self.authenticators: Tuple[IAuthenticator, ...] = tuple(authenticators)
        self.authorizers: Tuple[IAuthorizer, ...] = tuple(authorizers)
        self.anonymous: bool = (not self.authenticators) if anonymous is None else anonymous
        patterns: List[PathPattern] = []
        for p in (*ALWAYS_PUBLIC, *publicPaths):
            compiled = compilePattern(p)
            if compiled not in patterns:
                patterns.append(compiled)
        self.publicPaths: Tuple[PathPattern, ...] = tuple(patterns)
        self._public = Decision(None, 200)
        self._anonymousAllowed = Decision(ANONYMOUS, 200)
        self._authenticationRequired = Decision(None, 401, "Unauthorized", WWW_AUTHENTICATE)

    def isPublic(self, path: RequestPath) -> bool:
        segments = path.segments
        for p in self.publicPaths:
            if p.matches(segments):
                return True
        return False

    def check(self, method: bytes, path: RequestPath, headers: Headers) -> DecisionResult:
        """Decide about one request; see the module docstring for when the answer is a Deferred."""
        try:
            if self.isPublic(path):
                return self._public
            credentials = headers.getAll(b"authorization")
            if not credentials:
                if not self.anonymous:
                    return self._authenticationRequired
                if not self.authorizers:
                    return self._anonymousAllowed
                return self._authorize(ANONYMOUS, method, path)
            token = _bearerToken(credentials)
            if isinstance(token, Decision):
                return token
            result = self._authenticate(token, 0, None)
            if isinstance(result, Deferred):
                return result.addCallback(self._authenticated, method, path).addErrback(self._internalError)
            return self._authenticated(result, method, path)
        except Exception:
            return self._internalError(Failure())

    # -- authentication ----------------------------------------------------------------------------------

    def _authenticate(
        self, token: str, start: int, firstRejection: Optional[Rejected]
    ) -> AuthnResult | Deferred[AuthnResult]:
        authenticators = self.authenticators
        for i in range(start, len(authenticators)):
            result = authenticators[i].authenticate(token)
            if isinstance(result, Deferred):
                return result.addCallback(self._resume, token, i, firstRejection)
            if result is None:
                continue
            if isinstance(result, Rejected):
                if firstRejection is None:
                    firstRejection = result
                continue
            return result
        return firstRejection if firstRejection is not None else Rejected("")

    def _resume(
        self, result: AuthnResult, token: str, index: int, firstRejection: Optional[Rejected]
    ) -> AuthnResult | Deferred[AuthnResult]:
        if result is None or isinstance(result, Rejected):
            if firstRejection is None and isinstance(result, Rejected):
                firstRejection = result
            return self._authenticate(token, index + 1, firstRejection)
        return result

    def _authenticated(self, result: AuthnResult, method: bytes, path: RequestPath) -> DecisionResult:
        if isinstance(result, Identity):
            identity = _withAuthenticatedGroup(result)
            if not self.authorizers:
                return Decision(identity, 200)
            return self._authorize(identity, method, path)
        if isinstance(result, Unavailable):
            _log.warn("Authentication unavailable: {reason}", reason=result.reason)
            return Decision(None, 503, f"authentication is unavailable: {result.reason}")
        reason = result.reason if isinstance(result, Rejected) else ""
        message = f"invalid bearer token: {reason}" if reason else "invalid bearer token"
        return Decision(None, 401, message, WWW_AUTHENTICATE)

    # -- authorisation -----------------------------------------------------------------------------------

    def _authorize(self, identity: Identity, method: bytes, path: RequestPath) -> DecisionResult:
        attributes = requestAttributes(method, path.segments, path.query or b"")
        return self._authorizeFrom(identity, attributes, 0, "")

    def _authorizeFrom(
        self, identity: Identity, a: RequestAttributes, start: int, error: str
    ) -> DecisionResult:
        authorizers = self.authorizers
        for i in range(start, len(authorizers)):
            verdict = authorizers[i].authorize(identity, a)
            if isinstance(verdict, Deferred):
                return verdict.addCallback(self._authorizeResumed, identity, a, i, error)
            decided = self._verdict(identity, a, verdict)
            if decided is not None:
                return decided
            if verdict.error and not error:
                error = verdict.error
        if error:
            _log.warn("Authorisation unavailable: {error}", error=error)
            return Decision(identity, 503, f"authorization is unavailable: {error}")
        return Decision(identity, 403, forbiddenMessage(identity, a))

    def _authorizeResumed(
        self, verdict: Verdict, identity: Identity, a: RequestAttributes, index: int, error: str
    ) -> DecisionResult:
        decided = self._verdict(identity, a, verdict)
        if decided is not None:
            return decided
        return self._authorizeFrom(identity, a, index + 1, error or verdict.error)

    @staticmethod
    def _verdict(identity: Identity, a: RequestAttributes, verdict: Verdict) -> Optional[Decision]:
        if verdict.decision == "allow":
            return Decision(identity, 200)
        if verdict.decision == "deny":
            return Decision(identity, 403, forbiddenMessage(identity, a, verdict.reason))
        return None

    @staticmethod
    def _internalError(failure: Failure) -> Decision:
        if failure.check(CancelledError):
            # The caller gave up (the client went away): nothing went wrong here.
            return Decision(None, 503, "the request was cancelled")
        _log.failure("The authentication gate failed", failure)
        return Decision(None, 503, "authentication or authorization failed internally")


def _bearerToken(credentials: List[bytes]) -> str | Decision:
    """The token of a single C{Authorization: Bearer <token>} header, or the 401 to answer instead."""
    if len(credentials) != 1:
        return Decision(None, 401, "more than one Authorization header", WWW_AUTHENTICATE)
    scheme, _, rest = credentials[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return Decision(None, 401, "unsupported authorization scheme (use Bearer)", WWW_AUTHENTICATE)
    token = rest.strip(b" \t")
    if not token or token.translate(None, _VISIBLE_ASCII):
        return Decision(None, 401, "malformed bearer token", WWW_AUTHENTICATE)
    return token.decode("ascii")
