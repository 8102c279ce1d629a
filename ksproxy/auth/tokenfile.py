# -*- test-case-name: tests.unit.test_auth_tokenfile -*-
"""
Static bearer tokens from a file in Kubernetes' C{--token-auth-file} CSV format:
C{token,user,uid,"group1,group2"} (the group column is optional, columns after it are ignored).

The file is re-read when it changes (checked at most once a second), so tokens can be rotated without a
restart; a file that no longer parses keeps the previous tokens.
"""

from __future__ import annotations

import csv
import hashlib
import io
from typing import Dict

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ksproxy.auth._files import WatchedFile
from ksproxy.auth.identity import Identity, isHeaderSafe
from ksproxy.auth.interfaces import AuthnResult, IAuthenticator

__all__ = ["parseTokenFile", "TokenFileError", "StaticTokenAuthenticator"]

_log = Logger()


class TokenFileError(ValueError):
    """The token file does not parse; the message names the line, never a token."""


def _digest(token: str) -> bytes:
    # Look tokens up by digest: a dict probe on the token itself would leak timing about its prefix.
    return hashlib.sha256(token.encode("utf-8")).digest()


def parseTokenFile(data: bytes, source: str = "") -> Dict[bytes, Identity]:
    """Map sha256(token) to the identity of each line.  A later duplicate wins, as in Kubernetes."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TokenFileError(f"{source} is not UTF-8: {e}") from e
    tokens: Dict[bytes, Identity] = {}
    reader = csv.reader(io.StringIO(text), skipinitialspace=True, strict=True)
    try:
        for record in reader:
            line = reader.line_num
            if not record or record == [""]:
                continue
            if len(record) < 3:
                raise TokenFileError(f"{source} line {line}: need at least token,user,uid")
            # Kubernetes trims leading space only; trailing space in a name is never meant, so trim both.
            token, user, uid = record[0].strip(), record[1].strip(), record[2].strip()
            if not token:
                raise TokenFileError(f"{source} line {line}: empty token")
            if not user:
                raise TokenFileError(f"{source} line {line}: empty user name")
            groups = ()
            if len(record) >= 4:
                groups = tuple(g.strip() for g in record[3].split(",") if g.strip())
            for value in (user, uid, *groups):
                if not isHeaderSafe(value):
                    raise TokenFileError(
                        f"{source} line {line}: a name contains characters that are not allowed"
                    )
            key = _digest(token)
            if key in tokens:
                _log.warn(
                    "Duplicate token in {source} line {line}: the later line wins", source=source, line=line
                )
            tokens[key] = Identity(user=user, uid=uid, groups=groups)
    except csv.Error as e:
        raise TokenFileError(f"{source} line {reader.line_num}: {e}") from e
    return tokens


@implementer(IAuthenticator)
class StaticTokenAuthenticator:
    """Accepts the tokens listed in the file; any other token is not its business (C{None})."""

    def __init__(self, path: str, clock: IReactorTime, interval: float = 1.0) -> None:
        self._file = WatchedFile(path, lambda data: parseTokenFile(data, path), clock, interval)

    def authenticate(self, token: str) -> AuthnResult:
        return self._file.current().get(_digest(token))
