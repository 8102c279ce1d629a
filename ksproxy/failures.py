"""
Readable one-line reasons for failed out-of-band requests (health checks, bundle URL sources): what
/debug/routes and the logs show, never a repr.  Imports nothing heavy, so the checkers can use it freely.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer, error
from twisted.python.failure import Failure

__all__ = ["describeFailure"]

_TIMEOUTS = (defer.CancelledError, defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError)
# Named by string so that this module needs neither pyOpenSSL nor treq (Failure.check compares names).
_TLS_ERROR = "OpenSSL.SSL.Error"
_SELF_DESCRIBING = (error.ConnectError, error.DNSLookupError, error.ConnectionLost, "ksproxy.fetch.FetchError")


def _cause(failure: Failure) -> Failure:
    # twisted.web's ResponseNeverReceived / ResponseFailed / RequestTransmissionFailed keep the real reasons
    # in a list, and their own text is that list's repr: look through them to the first reason.
    for _ in range(8):
        reasons = getattr(failure.value, "reasons", None)
        if not reasons or not isinstance(reasons[0], Failure):
            break
        failure = reasons[0]
    return failure


def describeFailure(failure: Failure, timeout: Optional[float] = None) -> str:
    """
    One readable line for a failed request.

    @param timeout: the request's time limit in seconds, named when the failure was that limit running out
        (a cancellation is how both our timers and treq's end a request).
    """
    cause = _cause(failure)
    if cause.check(*_TIMEOUTS):
        return f"no answer within {timeout:g}s" if timeout is not None else "no answer in time"
    if cause.check(_TLS_ERROR):
        # pyOpenSSL's args are [(library, function, reason), ...]: the reasons are what a reader needs.
        errors = cause.value.args[0] if cause.value.args else None
        if isinstance(errors, list) and errors and all(isinstance(e, tuple) and e for e in errors):
            detail = "; ".join(str(e[-1]) for e in errors)
        else:
            detail = cause.getErrorMessage()
        return f"TLS handshake failed: {detail or 'no reason given'}"
    if cause.check(error.ConnectionRefusedError):
        return "connection refused"
    name = cause.type.__name__ if cause.type is not None else "Exception"
    message = cause.getErrorMessage().strip()
    if not message or message == "None":
        return name
    # Twisted's connection errors already say what they are ("DNS lookup failed: ..."); others get their type.
    return message if cause.check(*_SELF_DESCRIBING) else f"{name}: {message}"
