"""L{ksproxy.failures.describeFailure}: every kind of failed out-of-band request reads as one plain line."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from ksproxy.failures import describeFailure
from ksproxy.fetch import FetchError


def _f(exc: BaseException) -> Failure:
    return Failure(exc)


@pytest.mark.parametrize(
    "failure,expected",
    [
        # What treq's own timeout gives: the repr of this list was what /debug/routes showed.
        (_f(ResponseNeverReceived([_f(defer.CancelledError())])), "no answer within 1s"),
        (_f(defer.CancelledError()), "no answer within 1s"),
        (_f(error.ConnectingCancelledError(None)), "no answer within 1s"),
        (_f(error.TimeoutError()), "no answer within 1s"),
        (_f(error.ConnectionRefusedError("111: Connection refused")), "connection refused"),
        (
            _f(error.DNSLookupError("address 'nx.invalid' not found")),
            "DNS lookup failed: address 'nx.invalid' not found.",
        ),
        (
            _f(ResponseNeverReceived([_f(SSL.Error([("SSL routines", "", "certificate verify failed")]))])),
            "TLS handshake failed: certificate verify failed",
        ),
        (_f(SSL.Error("odd")), "TLS handshake failed: odd"),
        (
            _f(ResponseFailed([_f(error.ConnectionLost("peer went away"))])),
            "Connection to the other side was lost in a non-clean fashion: peer went away.",
        ),
        (_f(FetchError("response larger than 10 bytes")), "response larger than 10 bytes"),
        (_f(ValueError("boom")), "ValueError: boom"),
        (_f(ValueError()), "ValueError"),
    ],
)
def test_readable(failure: Failure, expected: str) -> None:
    text = describeFailure(failure, 1.0)
    assert text == expected
    assert "<" not in text and "Failure" not in text


def test_timeoutWithoutALimit() -> None:
    assert describeFailure(_f(defer.CancelledError())) == "no answer in time"
