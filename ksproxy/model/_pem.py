# -*- test-case-name: tests.unit.test_parse -*-
"""
Base64 fields of the manifests (Kubernetes C{format: byte}), including KubeSphere's double encoding.

KubeSphere 4.x tooling often base64-encodes a value that is already base64 (the PEM file was encoded once by
the author, then once more because the field is C{[]byte}).  Both spellings are accepted, by rules that can
never mistake one for the other: see L{decodeBase64Pem} and L{decodeBase64Text}.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Tuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["decodeBase64Pem", "pemFromBase64", "scriptFromBase64"]

_PEM_MARK = b"-----BEGIN "
# The standard base64 alphabet with padding, as Go's encoding/base64 StdEncoding decodes it for []byte.
_B64_TEXT = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# Text bytes of a script: anything but C0 controls other than tab, LF, FF, CR (and DEL).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def _b64decode(data: bytes) -> bytes:
    """Strict standard base64, ignoring CR/LF (Go does the same); ValueError otherwise."""
    compact = data.replace(b"\r", b"").replace(b"\n", b"")
    if not _B64_TEXT.fullmatch(compact):
        raise ValueError("not valid base64")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:  # pragma: no cover - the regex already guarantees validity
        raise ValueError(f"not valid base64 ({e})") from e


def _describeNonBase64(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        return "PEM text, but the field takes base64 of PEM (Kubernetes format: byte): base64-encode it"
    bad = next((c for c in stripped if not (c.isascii() and (c.isalnum() or c in "+/=\r\n"))), None)
    if bad is not None:
        return f"not valid base64 (unexpected character {bad!r}: a placeholder left in the manifest?)"
    return "not valid base64 (wrong length or padding)"


def _firstDecode(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        # A YAML !!binary value: the loader already did the first decode.
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"must be a base64 string, not {type(value).__name__}")
    try:
        return _b64decode(value.encode("ascii"))
    except (UnicodeEncodeError, ValueError):
        raise ValueError(_describeNonBase64(value)) from None


def pemFromBase64(value: object) -> bytes:
    """
    Decode a C{caBundle}: base64 of PEM, or base64 of base64 of PEM (KubeSphere's double encoding).

    Rule: decode once; if the bytes contain a PEM header they are the bundle; otherwise, if they are
    themselves valid base64 whose decoding contains a PEM header, that is the bundle.  At least one X.509
    certificate must then load.

    @return: normalised PEM (each certificate re-serialised; other blocks and text dropped).
    @raise ValueError: saying what is wrong (without the field name).
    """
    first = _firstDecode(value)
    if not first:
        raise ValueError("empty")
    pem = first
    if _PEM_MARK not in first:
        try:
            second = _b64decode(b"".join(first.split()))
        except ValueError:
            second = b""
        if _PEM_MARK not in second:
            raise ValueError(
                f"decodes to {len(first)} bytes that are neither PEM (no '-----BEGIN' line) nor base64 of PEM"
            )
        pem = second
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValueError(f"holds no loadable PEM certificate ({e})") from None
    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates)


def decodeBase64Pem(value: str, *, field: str) -> bytes:
    """
    L{pemFromBase64} for callers outside the parser: the ValueError message starts with C{field}.
    """
    try:
        return pemFromBase64(value)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


def scriptFromBase64(value: object) -> Tuple[bytes, bool]:
    """
    Decode a C{raw} script: base64 of the script, or base64 of base64 of it.

    Rule: decode once.  The result is taken as double encoded, and decoded again, only when (1) it consists
    of nothing but the base64 alphabet with correct padding (optionally in CR/LF-wrapped lines), at least 4
    characters, and (2) its decoding is non-empty UTF-8 text without control characters (tab, CR, LF and FF
    allowed).  Real JavaScript never passes (1): any program longer than a bare identifier has spaces, dots,
    brackets or semicolons; random binary rarely passes (2).  The cost: a bundle that is literally one
    identifier of 4n letters would be misread, and no working bundle is that.

    @return: the bytes and whether the second decode was applied.
    @raise ValueError: saying what is wrong (without the field name).
    """
    first = _firstDecode(value)
    compact = first.replace(b"\r", b"").replace(b"\n", b"")
    if len(compact) < 4 or not _B64_TEXT.fullmatch(compact):
        return first, False
    second = base64.b64decode(compact)
    if not second or _CONTROL.search(second):
        return first, False
    try:
        second.decode("utf-8")
    except UnicodeDecodeError:
        return first, False
    return second, True
