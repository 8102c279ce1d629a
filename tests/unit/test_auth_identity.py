"""Identity headers (SPEC 7.3): spoofed ones removed, the real identity added the way Kubernetes sends it."""

from __future__ import annotations

import pytest

from ksproxy.auth.identity import (
    ANONYMOUS,
    Decision,
    Identity,
    addIdentityHeaders,
    addImpersonationHeaders,
    escapeHeaderKey,
    isHeaderSafe,
    stripIdentityHeaders,
    stripImpersonationHeaders,
)
from ksproxy.http.headers import Headers


def test_spoofed_identity_headers_removed_whatever_their_case():
    h = Headers(
        [
            (b"Host", b"x"),
            (b"X-Remote-User", b"admin"),
            (b"x-remote-group", b"system:masters"),
            (b"X-REMOTE-UID", b"0"),
            (b"X-Remote-Extra-Scopes", b"all"),
            (b"x-remote-extra-acme.com%2Fproject", b"p"),
            (b"X-Remote-Userx", b"kept: not an identity header"),
            (b"X-Remote-Addr", b"kept"),
            (b"Authorization", b"Bearer t"),
        ]
    )
    stripIdentityHeaders(h)
    assert list(h) == [
        (b"Host", b"x"),
        (b"X-Remote-Userx", b"kept: not an identity header"),
        (b"X-Remote-Addr", b"kept"),
        (b"Authorization", b"Bearer t"),
    ]


def test_strip_without_identity_headers_keeps_the_list():
    h = Headers([(b"Host", b"x")])
    items = h.items
    stripIdentityHeaders(h)
    assert h.items is items


def test_add_identity_headers():
    h = Headers([(b"Host", b"x")])
    identity = Identity(
        "alice",
        uid="42",
        groups=("dev", "system:authenticated"),
        extra={"scopes": ("a", "b"), "acme.com/pro ject": "x"},
    )
    addIdentityHeaders(h, identity)
    assert list(h)[1:] == [
        (b"X-Remote-User", b"alice"),
        (b"X-Remote-Uid", b"42"),
        (b"X-Remote-Group", b"dev"),
        (b"X-Remote-Group", b"system:authenticated"),
        (b"X-Remote-Extra-scopes", b"a"),
        (b"X-Remote-Extra-scopes", b"b"),
        (b"X-Remote-Extra-acme.com%2Fpro%20ject", b"x"),
    ]


def test_strip_then_add_leaves_only_the_real_identity():
    h = Headers([(b"X-Remote-User", b"admin"), (b"X-Remote-Group", b"system:masters")])
    stripIdentityHeaders(h)
    addIdentityHeaders(h, ANONYMOUS)
    assert h.getAll(b"x-remote-user") == [b"system:anonymous"]
    assert h.getAll(b"x-remote-group") == [b"system:unauthenticated"]
    assert b"x-remote-uid" not in h


def test_unsafe_values_never_reach_the_wire():
    h = Headers()
    addIdentityHeaders(
        h, Identity("bob\r\nX-Remote-Group: system:masters", groups=("ok", "bad\n"), extra={"k": ("v\x00",)})
    )
    assert list(h) == [(b"X-Remote-Group", b"ok")]


def test_impersonation_headers():
    h = Headers(
        [(b"Impersonate-User", b"admin"), (b"impersonate-extra-x", b"y"), (b"Impersonate-Group", b"g")]
    )
    stripImpersonationHeaders(h)
    assert len(h) == 0
    addImpersonationHeaders(h, Identity("alice", groups=("dev",), extra={"scopes": ("s",)}))
    assert list(h) == [
        (b"Impersonate-User", b"alice"),
        (b"Impersonate-Group", b"dev"),
        (b"Impersonate-Extra-scopes", b"s"),
    ]


@pytest.mark.parametrize(
    "key,escaped",
    [
        ("scopes", b"scopes"),
        ("acme.com/project", b"acme.com%2Fproject"),
        ("100%", b"100%25"),
        ("a b:c", b"a%20b%3Ac"),
        ("é", b"%C3%A9"),
        ("!#$&'*+-.^_`|~", b"!#$&'*+-.^_`|~"),
    ],
)
def test_escape_header_key_like_client_go(key, escaped):
    assert escapeHeaderKey(key) == escaped


@pytest.mark.parametrize(
    "value,safe",
    [("alice", True), ("a b", True), (" a", False), ("a\t", False), ("a\nb", False), ("a\x7f", False)],
)
def test_is_header_safe(value, safe):
    assert isHeaderSafe(value) is safe


def test_value_types():
    assert ANONYMOUS == Identity(user="system:anonymous", groups=("system:unauthenticated",))
    i = Identity("a", groups=["g"], extra={"k": ["v"]})
    assert i.groups == ("g",) and i.extra == {"k": ("v",)}
    assert hash(i) == hash(Identity("a", groups=("g",), extra={"k": ("v",)}))
    assert Decision(None, 200).allowed and not Decision(None, 403).allowed
