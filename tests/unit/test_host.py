"""The Host check of the HTTP/1.1 server (RFC 9112 3.2): host[:port], or empty; anything else is a 400."""

import pytest

from ksproxy.http.server import _VALID_HOST

GOOD = [b"x", b"example.com", b"example.com.", b"example.com:8080", b"example.com:", b"10.0.0.1:80", b"[::1]",
        b"[::1]:8443", b"[2001:db8::1]", b"my_host", b"xn--bcher-kva.example", b"a%20b"]
BAD = [b"[::1", b"::1", b"x:abc", b"x:80:80", b"x/y", b"u@x", b"x y", b"x?y", b"x#y", b"[::1]x", b"x\\y", b"[::1]:a"]


@pytest.mark.parametrize("host", GOOD)
def test_valid(host: bytes) -> None:
    assert _VALID_HOST(host)


@pytest.mark.parametrize("host", BAD)
def test_invalid(host: bytes) -> None:
    assert not _VALID_HOST(host)
