"""
Authentication and authorisation in front of every route (SPEC 7).

The request path uses four names: L{Gate.check} (via L{buildGate} from the parsed options) decides about a
request, L{stripIdentityHeaders} removes client-supplied C{X-Remote-*} headers, and L{addIdentityHeaders}
forwards the identity the gate established.  C{ksproxy.tap.Options} mixes in L{AuthOptionsMixin}.
"""

from ksproxy.auth.gate import Gate
from ksproxy.auth.identity import (
    ANONYMOUS,
    Decision,
    Identity,
    addIdentityHeaders,
    addImpersonationHeaders,
    stripIdentityHeaders,
    stripImpersonationHeaders,
)
from ksproxy.auth.options import AUTH_FLAGS, AUTH_OPTIONS, AuthOptionsMixin, buildGate, validateAuthOptions

__all__ = [
    "ANONYMOUS",
    "AUTH_FLAGS",
    "AUTH_OPTIONS",
    "AuthOptionsMixin",
    "Decision",
    "Gate",
    "Identity",
    "addIdentityHeaders",
    "addImpersonationHeaders",
    "buildGate",
    "stripIdentityHeaders",
    "stripImpersonationHeaders",
    "validateAuthOptions",
]
