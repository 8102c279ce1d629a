"""
Kubernetes C{Status} bodies for every error ksproxy answers itself (SPEC 9).

One place builds them, so every error looks the same to kubectl, the console and curl.
"""

from __future__ import annotations

import json
from typing import Dict, Optional

__all__ = ["REASONS", "PHRASES", "statusBody", "phrase"]

# Kubernetes StatusReason values by HTTP code.
REASONS: Dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "Timeout",
    413: "RequestEntityTooLarge",
    414: "RequestURITooLong",
    417: "ExpectationFailed",
    431: "RequestHeaderFieldsTooLarge",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
    508: "LoopDetected",
}

PHRASES: Dict[int, bytes] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    508: b"Loop Detected",
}


def phrase(code: int) -> bytes:
    """The reason phrase for C{code}; an unknown code gets a generic one (the phrase carries no meaning)."""
    return PHRASES.get(code, b"Unknown")


def statusBody(code: int, message: str, reason: Optional[str] = None) -> bytes:
    """A JSON C{Status} object as the Kubernetes API server writes it."""
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason or REASONS.get(code, "Unknown"),
            "code": code,
        },
        separators=(",", ":"),
    ).encode("utf-8")
