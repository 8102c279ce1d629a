# -*- test-case-name: tests.unit.test_auth_reviews,tests.integration.test_auth_kube -*-
"""
Authorisation by the cluster: a C{SubjectAccessReview} per (identity, request attributes), cached for a
short time.  A failed review is never cached and ends as 503, not as a 403 the user did not earn.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ksproxy.auth._cache import ReviewCache
from ksproxy.auth.attributes import RequestAttributes
from ksproxy.auth.identity import Identity
from ksproxy.auth.interfaces import ALLOW, DENY, NO_OPINION, IAuthorizer, Verdict
from ksproxy.auth.kubeclient import IKubeReviewClient, logReviewFailure

__all__ = ["SAR_PATH", "SubjectAccessReviewAuthorizer", "subjectAccessReview", "verdictFromReview"]

SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"

_log = Logger()


def subjectAccessReview(identity: Identity, a: RequestAttributes) -> dict:
    """The C{SubjectAccessReview} object asking whether C{identity} may do C{a}."""
    spec: dict = {"user": identity.user, "groups": list(identity.groups)}
    if identity.uid:
        spec["uid"] = identity.uid
    if identity.extra:
        spec["extra"] = {k: list(v) for k, v in identity.extra.items()}
    if a.isResourceRequest:
        spec["resourceAttributes"] = {
            k: v
            for k, v in (
                ("namespace", a.namespace),
                ("verb", a.verb),
                ("group", a.apiGroup),
                ("version", a.apiVersion),
                ("resource", a.resource),
                ("subresource", a.subresource),
                ("name", a.name),
            )
            if v or k in ("verb", "group")
        }
    else:
        spec["nonResourceAttributes"] = {"path": a.path, "verb": a.verb}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


def verdictFromReview(review: Any) -> Verdict:
    status = review.get("status") if isinstance(review, dict) else None
    if not isinstance(status, dict):
        return Verdict("noOpinion", error="the access review answer has no status")
    reason = status.get("reason") if isinstance(status.get("reason"), str) else ""
    if status.get("allowed") is True:
        return Verdict("allow", reason=reason) if reason else ALLOW
    if status.get("denied") is True:
        return Verdict("deny", reason=reason) if reason else DENY
    if status.get("evaluationError"):
        _log.warn("SubjectAccessReview evaluation error: {error}", error=status.get("evaluationError"))
    return Verdict("noOpinion", reason=reason) if reason else NO_OPINION


@implementer(IAuthorizer)
class SubjectAccessReviewAuthorizer:
    """Asks the cluster; C{allowed} allows, C{denied} denies, anything else has no opinion."""

    def __init__(
        self, client: IKubeReviewClient, clock: IReactorTime, ttl: float = 10.0, maxSize: int = 10000
    ) -> None:
        self._client = client

        def ttlFor(v: Verdict) -> Optional[float]:
            return None if v.error else ttl

        self._cache: ReviewCache[Verdict] = ReviewCache(clock, ttlFor, maxSize)

    def authorize(self, identity: Identity, attributes: RequestAttributes) -> Verdict | Deferred[Verdict]:
        body = subjectAccessReview(identity, attributes)
        key = hashlib.sha256(json.dumps(body["spec"], sort_keys=True).encode("utf-8")).digest()
        return self._cache.get(key, lambda: self._review(body))

    def _review(self, body: dict) -> Deferred[Verdict]:
        d = self._client.create(SAR_PATH, body)
        d.addCallbacks(verdictFromReview, self._failed)
        return d

    def _failed(self, failure: Failure) -> Verdict:
        logReviewFailure(_log, "SubjectAccessReview", failure)
        return Verdict("noOpinion", error="the cluster could not review the request")
