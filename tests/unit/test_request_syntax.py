"""
The request-line checks HTTP/2 makes explicitly (L{REQUEST_METHODS}, L{validTarget}) are the ones llhttp makes
for HTTP/1.1: the two protocols accept the same methods and targets.
"""

from typing import List

import httptools
import pytest

from ksproxy.http.server import REQUEST_METHODS, validHost, validTarget


class _Callbacks:
    def on_headers_complete(self) -> None:
        pass


def _llhttpAccepts(requestLine: bytes) -> bool:
    parser = httptools.HttpRequestParser(_Callbacks())
    try:
        parser.feed_data(requestLine + b"\r\nHost: a\r\n\r\n")
    except httptools.HttpParserUpgrade:
        return True  # CONNECT: parsed (and then refused with a 405 by both protocols)
    except httptools.HttpParserError:
        return False
    return True


# Tokens llhttp knows in other protocols (RTSP, the HTTP/2 preface), lower case, and unknown ones.
_NOT_HTTP: List[bytes] = [b"PRI", b"DESCRIBE", b"SETUP", b"PLAY", b"RECORD", b"get", b"Get", b"FROB", b"GETX", b"G"]


@pytest.mark.parametrize("method", sorted(REQUEST_METHODS) + _NOT_HTTP)
def test_methodsAsLlhttp(method: bytes) -> None:
    assert (method in REQUEST_METHODS) == _llhttpAccepts(method + b" /x HTTP/1.1")


def test_targetBytesAsLlhttp() -> None:
    for byte in range(256):
        target = b"/a" + bytes([byte]) + b"b"
        assert bool(validTarget(target)) == _llhttpAccepts(b"GET " + target + b" HTTP/1.1"), byte


def test_emptyTarget() -> None:
    assert not validTarget(b"")


def test_validHost() -> None:
    assert validHost(b"a.example.test:8443")
    assert validHost(b"a.example.test:8443")  # the second time from the cache
    assert not validHost(b"a.test foo")
    assert not validHost(b"a.test foo")  # refusals are not cached
