# -*- test-case-name: tests.unit.test_auth_reviews,tests.integration.test_auth_kube -*-
"""
Bearer tokens checked by the cluster: a C{TokenReview} sent to the kube-apiserver, its answer cached by
sha256(token) for a short time.

Both answers (accepted and refused) are cached for the TTL; a failed review (the API server unreachable or
answering an error) is never cached, and the request gets 503 rather than a 401 it might not deserve.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ksproxy.auth._cache import ReviewCache
from ksproxy.auth.identity import Identity, isHeaderSafe
from ksproxy.auth.interfaces import AuthnResult, IAuthenticator, Rejected, Unavailable
from ksproxy.auth.kubeclient import IKubeReviewClient, logReviewFailure

__all__ = ["TOKENREVIEW_PATH", "TokenReviewAuthenticator", "identityFromTokenReview"]

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

_log = Logger()


def identityFromTokenReview(review: Any) -> AuthnResult:
    """Read a TokenReview's C{status} as an authentication result."""
    status = review.get("status") if isinstance(review, dict) else None
    if not isinstance(status, dict):
        return Unavailable("the token review answer has no status")
    if status.get("authenticated") is not True:
        return Rejected("token was not accepted by the cluster")
    user = status.get("user")
    if not isinstance(user, dict):
        return Unavailable("the token review answer has no user")
    name = user.get("username")
    uid = user.get("uid") or ""
    groups = user.get("groups") or []
    extra = user.get("extra") or {}
    if (
        not isinstance(name, str)
        or not name
        or not isinstance(uid, str)
        or not isinstance(groups, list)
        or not all(isinstance(g, str) for g in groups)
        or not isinstance(extra, dict)
        or not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in extra.values())
    ):
        return Unavailable("the token review answer has a malformed user")
    if not all(isHeaderSafe(s) for s in (name, uid, *groups)):
        return Rejected("the cluster's user name contains characters that are not allowed")
    return Identity(
        user=name, uid=uid, groups=tuple(groups), extra={str(k): tuple(v) for k, v in extra.items()}
    )


@implementer(IAuthenticator)
class TokenReviewAuthenticator:
    """
    Asks the cluster about every token it has not seen within C{ttl} seconds.  It is the last word on any
    token it is given: a token the cluster refuses is L{Rejected}.

    @param audiences: sent as C{spec.audiences}; empty means the API server's own audiences.
    """

    def __init__(
        self,
        client: IKubeReviewClient,
        clock: IReactorTime,
        ttl: float = 10.0,
        audiences: Sequence[str] = (),
        maxSize: int = 10000,
    ) -> None:
        self._client = client
        self._audiences = tuple(audiences)

        def ttlFor(result: AuthnResult) -> Optional[float]:
            return None if isinstance(result, Unavailable) else ttl

        self._cache: ReviewCache[AuthnResult] = ReviewCache(clock, ttlFor, maxSize)

    def authenticate(self, token: str) -> AuthnResult | Deferred[AuthnResult]:
        key = hashlib.sha256(token.encode("utf-8")).digest()
        return self._cache.get(key, lambda: self._review(token))

    def _review(self, token: str) -> Deferred[AuthnResult]:
        spec: dict = {"token": token}
        if self._audiences:
            spec["audiences"] = list(self._audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        d = self._client.create(TOKENREVIEW_PATH, body)
        d.addCallbacks(identityFromTokenReview, self._failed)
        return d

    def _failed(self, failure: Failure) -> AuthnResult:
        logReviewFailure(_log, "TokenReview", failure)
        return Unavailable("the cluster could not review the token")
