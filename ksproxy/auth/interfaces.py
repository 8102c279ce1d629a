"""
The two seams of the gate: who is asking (L{IAuthenticator}) and may they (L{IAuthorizer}).

Both may answer at once (a value) or later (a L{Deferred}); the gate only allocates Deferreds when one of
them does, so JWTs, static tokens and the policy file cost no Deferred per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

from ksproxy.auth.identity import Identity

if TYPE_CHECKING:
    from ksproxy.auth.attributes import RequestAttributes

__all__ = [
    "IAuthenticator",
    "IAuthorizer",
    "Rejected",
    "Unavailable",
    "AuthnResult",
    "Verdict",
    "ALLOW",
    "DENY",
    "NO_OPINION",
]


@attrs.frozen
class Rejected:
    """The authenticator looked at the token and does not accept it; C{reason} is safe to show the client."""

    reason: str = ""


@attrs.frozen
class Unavailable:
    """The authenticator could not decide (its backend failed); the request gets 503, nothing is cached."""

    reason: str = ""


# An Identity: accepted.  None: not a token this authenticator knows.  Rejected / Unavailable: as above.
AuthnResult = Union[Identity, Rejected, Unavailable, None]


@attrs.frozen
class Verdict:
    """
    An authoriser's answer, as Kubernetes has it: allow, deny, or no opinion (let the next one decide).

    @ivar error: set when the authoriser could not decide because something failed; a chain that ends on an
        error answers 503 instead of 403.
    """

    decision: str  # "allow" | "deny" | "noOpinion"
    reason: str = ""
    error: str = ""


ALLOW = Verdict("allow")
DENY = Verdict("deny")
NO_OPINION = Verdict("noOpinion")


class IAuthenticator(Interface):
    def authenticate(token: str) -> AuthnResult | Deferred[AuthnResult]:
        """
        Say who presented bearer C{token}.  Must not raise and must not put the token in any reason.
        """


class IAuthorizer(Interface):
    def authorize(identity: Identity, attributes: RequestAttributes) -> Verdict | Deferred[Verdict]:
        """Say whether C{identity} may do what C{attributes} describe.  Must not raise."""
