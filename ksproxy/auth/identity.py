# -*- test-case-name: tests.unit.test_auth_identity -*-
"""
Who is asking, what the gate decided, and how an identity travels to an upstream (SPEC 7.3).

Upstreams trust C{X-Remote-*} headers only because ksproxy removes whatever the client sent under those names
before it adds its own; both halves live here so they cannot drift apart.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import attrs

from ksproxy.http.headers import Headers

__all__ = [
    "Identity",
    "ANONYMOUS",
    "Decision",
    "stripIdentityHeaders",
    "addIdentityHeaders",
    "stripImpersonationHeaders",
    "addImpersonationHeaders",
    "escapeHeaderKey",
    "isHeaderSafe",
]


def _tupleOfStr(value: object) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)  # type: ignore[call-overload]


def _extraConverter(value: Mapping[str, object]) -> Mapping[str, Tuple[str, ...]]:
    return {str(k): _tupleOfStr(v) for k, v in dict(value).items()}


@attrs.frozen
class Identity:
    """
    An authenticated (or anonymous) user, in Kubernetes' C{user.Info} shape.

    @ivar extra: extra attributes (for example scopes), key to values.
    """

    user: str
    uid: str = ""
    groups: Tuple[str, ...] = attrs.field(default=(), converter=_tupleOfStr)
    # A dict is not hashable: the hash leaves it out (equality still compares it).
    extra: Mapping[str, Tuple[str, ...]] = attrs.field(factory=dict, converter=_extraConverter, hash=False)


ANONYMOUS = Identity(user="system:anonymous", groups=("system:unauthenticated",))


@attrs.frozen
class Decision:
    """
    What the gate says about one request.

    @ivar identity: who the request runs as: L{ANONYMOUS} for anonymous requests that were let in, C{None}
        on public paths (no identity is established there, so none is forwarded) and on 401/503.
    @ivar code: 200 allowed, 401 unauthenticated, 403 forbidden, 503 the gate could not decide (a review
        backend failed or an internal error was logged).
    @ivar message: for the C{Status} body; never contains the credential.
    @ivar wwwAuthenticate: the C{WWW-Authenticate} value, set on 401.
    """

    identity: Optional[Identity]
    code: int
    message: str = ""
    wwwAuthenticate: Optional[bytes] = None

    @property
    def allowed(self) -> bool:
        return self.code == 200


# RFC 9110 tchar: the bytes Kubernetes leaves alone in an extra key (client-go headerKeyEscape).
_TCHAR = frozenset(b"!#$&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def escapeHeaderKey(key: str) -> bytes:
    """
    Percent-encode an extra key for a header name the way client-go does (C{headerKeyEscape}).

    Every byte of the UTF-8 key that is not an RFC 9110 token character, and C{%} itself, becomes C{%XX}, so
    the receiver's C{url.PathUnescape} gives the key back.
    """
    out = bytearray()
    for b in key.encode("utf-8"):
        if b in _TCHAR:
            out.append(b)
        else:
            out += b"%%%02X" % (b,)
    return bytes(out)


def isHeaderSafe(value: str) -> bool:
    """
    Whether C{value} can be sent as a header value unchanged: no control characters (CR and LF above all,
    which would let a crafted user name inject headers) and no leading or trailing white space.
    """
    if value != value.strip(" \t"):
        return False
    for ch in value:
        o = ord(ch)
        if o < 0x20 or o == 0x7F:
            return False
    return True


_IDENTITY_NAMES = frozenset([b"x-remote-user", b"x-remote-uid", b"x-remote-group"])
_IDENTITY_EXTRA = b"x-remote-extra-"
_IMPERSONATE_NAMES = frozenset([b"impersonate-user", b"impersonate-uid", b"impersonate-group"])
_IMPERSONATE_EXTRA = b"impersonate-extra-"


def _strip(headers: Headers, prefix: bytes, names: frozenset, extra: bytes) -> None:
    items = headers.items
    # The usual request has none of these: look before building a new list.
    for item in items:
        if item[0].startswith(prefix):
            break
    else:
        return
    headers.items = [i for i in items if not (i[0] in names or i[0].startswith(extra))]


def stripIdentityHeaders(headers: Headers) -> None:
    """Remove every client-supplied C{X-Remote-User}, C{-Uid}, C{-Group} and C{X-Remote-Extra-*} (SPEC 7.3)."""
    _strip(headers, b"x-remote-", _IDENTITY_NAMES, _IDENTITY_EXTRA)


def stripImpersonationHeaders(headers: Headers) -> None:
    """
    Remove every client-supplied C{Impersonate-*} header.

    Needed wherever ksproxy talks to a kube-apiserver with its own credentials: a client's impersonation
    header would otherwise run with ksproxy's rights.
    """
    _strip(headers, b"impersonate-", _IMPERSONATE_NAMES, _IMPERSONATE_EXTRA)


def _add(headers: Headers, identity: Identity, user: bytes, uid: bytes, group: bytes, extra: bytes) -> None:
    # Values that could break the header block are left out rather than sent damaged; the authenticators
    # already refuse such names, so this only guards identities built elsewhere.
    if isHeaderSafe(identity.user):
        headers.add(user, identity.user.encode("utf-8"))
    if identity.uid and isHeaderSafe(identity.uid):
        headers.add(uid, identity.uid.encode("utf-8"))
    for g in identity.groups:
        if isHeaderSafe(g):
            headers.add(group, g.encode("utf-8"))
    for key, values in identity.extra.items():
        name = extra + escapeHeaderKey(key)
        for v in values:
            if isHeaderSafe(v):
                headers.add(name, v.encode("utf-8"))


def addIdentityHeaders(headers: Headers, identity: Identity) -> None:
    """
    Add C{X-Remote-User}, C{X-Remote-Uid} (when set), one C{X-Remote-Group} per group and one
    C{X-Remote-Extra-<escaped key>} per extra value.  Call L{stripIdentityHeaders} first: this only adds.
    """
    _add(headers, identity, b"X-Remote-User", b"X-Remote-Uid", b"X-Remote-Group", b"X-Remote-Extra-")


def addImpersonationHeaders(headers: Headers, identity: Identity) -> None:
    """
    Add C{Impersonate-User}, C{Impersonate-Uid}, C{Impersonate-Group} and C{Impersonate-Extra-<key>} for
    C{identity}, for requests sent to a kube-apiserver with ksproxy's own credentials.  Call
    L{stripImpersonationHeaders} first.
    """
    _add(
        headers,
        identity,
        b"Impersonate-User",
        b"Impersonate-Uid",
        b"Impersonate-Group",
        b"Impersonate-Extra-",
    )
