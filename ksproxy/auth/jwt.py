# -*- test-case-name: tests.unit.test_auth_jwt -*-
"""
Bearer JWTs checked locally: signature with a pinned algorithm per key, then C{exp}, C{nbf}, C{iat},
C{iss} and C{aud} against an injected clock.

Each key accepts only the algorithms of its own type (an RSA key never verifies an HS256 token, an HMAC
secret never an RS256 one), and C{none} is never accepted, so algorithm confusion cannot happen whatever a
token's header says.  PyJWT checks the signature; the claims are checked here so that time comes from the
reactor, not from the wall clock.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import attrs
import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ksproxy.auth.identity import Identity, isHeaderSafe
from ksproxy.auth.interfaces import AuthnResult, IAuthenticator, Rejected

__all__ = [
    "VerificationKey",
    "JWTAuthenticator",
    "hmacKey",
    "loadHMACSecretFile",
    "loadPEMKeys",
    "loadPEMKeyFile",
    "loadJWKS",
    "loadJWKSFile",
    "algorithmsForKey",
    "KeyFileError",
]

_log = Logger()

HMAC_ALGORITHMS = frozenset(["HS256", "HS384", "HS512"])
RSA_ALGORITHMS = frozenset(["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MIN_HMAC_BYTES = 32  # RFC 7518 3.2: a key at least as long as the hash output
MIN_RSA_BITS = 2048


class KeyFileError(ValueError):
    """A key file or key that cannot be used (raised at start-up, never on the request path)."""


@attrs.frozen
class VerificationKey:
    """
    One key and the only algorithms it may verify.

    @ivar key: the HMAC secret (bytes) or a C{cryptography} public key.
    @ivar kid: the JWKS key id, if any; a token that names a kid is checked only with keys of that kid (or
        with keys that have none).
    """

    key: Any = attrs.field(eq=False, repr=False)
    algorithms: FrozenSet[str]
    kid: Optional[str] = None
    source: str = ""


def algorithmsForKey(key: Any) -> FrozenSet[str]:
    """The JWS algorithms a key of this type may verify: pinned by key type, never taken from a token."""
    if isinstance(key, (bytes, bytearray)):
        return HMAC_ALGORITHMS
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"RSA key of {key.key_size} bits is too short (at least {MIN_RSA_BITS})")
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise KeyFileError(f"unsupported elliptic curve {key.curve.name}")
        return frozenset([alg])
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return frozenset(["EdDSA"])
    raise KeyFileError(f"unsupported key type {type(key).__name__}")


def hmacKey(secret: bytes, source: str = "") -> VerificationKey:
    if len(secret) < MIN_HMAC_BYTES:
        raise KeyFileError(
            f"HMAC secret {source} is {len(secret)} bytes; at least {MIN_HMAC_BYTES} are needed"
        )
    return VerificationKey(bytes(secret), frozenset(["HS256"]), None, source)


def loadHMACSecretFile(path: str) -> VerificationKey:
    """An HS256 key from a file; trailing white space (a newline left by an editor or C{echo}) is dropped."""
    with open(path, "rb") as f:
        secret = f.read().rstrip(b" \t\r\n")
    return hmacKey(secret, path)


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)


def loadPEMKeys(data: bytes, source: str = "") -> List[VerificationKey]:
    """Every public key (C{PUBLIC KEY}, C{RSA PUBLIC KEY}) or certificate's key in a PEM blob."""
    keys: List[VerificationKey] = []
    for m in _PEM_BLOCK.finditer(data):
        kind = m.group(1)
        block = m.group(0)
        try:
            if kind == b"CERTIFICATE":
                key: Any = x509.load_pem_x509_certificate(block).public_key()
            elif kind in (b"PUBLIC KEY", b"RSA PUBLIC KEY"):
                key = load_pem_public_key(block)
            elif b"PRIVATE" in kind:
                raise KeyFileError(f"{source} holds a private key; give ksproxy only the public key")
            else:
                continue
        except KeyFileError:
            raise
        except Exception as e:
            raise KeyFileError(f"cannot load {kind.decode()} from {source}: {e}") from e
        keys.append(VerificationKey(key, algorithmsForKey(key), None, source))
    if not keys:
        raise KeyFileError(f"no public key or certificate found in {source}")
    return keys


def loadPEMKeyFile(path: str) -> List[VerificationKey]:
    with open(path, "rb") as f:
        return loadPEMKeys(f.read(), path)


def loadJWKS(data: bytes, source: str = "") -> List[VerificationKey]:
    """
    The signing keys of a JWKS document.  A key's C{alg}, when present, narrows the algorithms of its type
    (it can never widen them); keys marked C{"use": "enc"} are skipped.
    """
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise KeyFileError(f"{source} is not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyFileError(f"{source} is not a JWKS document (no 'keys' list)")
    keys: List[VerificationKey] = []
    for i, jwk in enumerate(doc["keys"]):
        where = f"{source} keys[{i}]"
        if not isinstance(jwk, dict):
            raise KeyFileError(f"{where} is not an object")
        if jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise KeyFileError(f"{where}: kid must be a string")
        try:
            # The key type alone picks the key class; "alg" is checked against it below.
            key = pyjwt.PyJWK({k: v for k, v in jwk.items() if k != "alg"}).key
        except Exception as e:
            raise KeyFileError(f"{where}: {e}") from e
        if isinstance(key, (bytes, bytearray)) and len(key) < MIN_HMAC_BYTES:
            raise KeyFileError(f"{where}: HMAC key shorter than {MIN_HMAC_BYTES} bytes")
        algorithms = algorithmsForKey(key)
        alg = jwk.get("alg")
        if alg is not None:
            if alg not in algorithms:
                raise KeyFileError(f"{where}: alg {alg!r} does not fit a key of type {jwk.get('kty')!r}")
            algorithms = frozenset([alg])
        keys.append(VerificationKey(key, algorithms, kid, where))
    if not keys:
        raise KeyFileError(f"no signing key in {source}")
    return keys


def loadJWKSFile(path: str) -> List[VerificationKey]:
    with open(path, "rb") as f:
        return loadJWKS(f.read(), path)


def _isNumber(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@implementer(IAuthenticator)
class JWTAuthenticator:
    """
    Accepts a bearer JWT signed by one of C{keys} whose claims hold at the clock's time.

    A token that is not shaped like a JWT is not this authenticator's (C{None}); a JWT that fails any check
    is L{Rejected} with a short reason (expired, wrong audience, ...) that never contains the token.

    @param issuer: when set, C{iss} must equal it.
    @param audiences: when set, C{aud} (a string or a list) must contain one of them.
    @param leeway: seconds of clock skew allowed on C{exp}, C{nbf} and C{iat}.
    @param requireExpiry: refuse tokens without C{exp} (the default: such a token would never expire).
    @param verifiedCacheSize: how many tokens with a verified signature to remember (their claims are still
        checked on every request).
    """

    def __init__(
        self,
        keys: Sequence[VerificationKey],
        clock: IReactorTime,
        *,
        issuer: Optional[str] = None,
        audiences: Iterable[str] = (),
        usernameClaim: str = "sub",
        groupsClaim: str = "groups",
        usernamePrefix: str = "",
        groupsPrefix: str = "",
        leeway: float = 30.0,
        requireExpiry: bool = True,
        verifiedCacheSize: int = 4096,
    ) -> None:
        if not keys:
            raise KeyFileError("a JWT authenticator needs at least one key")
        self._keys: Tuple[VerificationKey, ...] = tuple(keys)
        self._algorithms = frozenset().union(*(k.algorithms for k in self._keys))
        self._clock = clock
        self._issuer = issuer
        self._audiences = frozenset(audiences)
        self._usernameClaim = usernameClaim
        self._groupsClaim = groupsClaim
        self._usernamePrefix = usernamePrefix
        self._groupsPrefix = groupsPrefix
        self._leeway = leeway
        self._requireExpiry = requireExpiry
        # One PyJWS per algorithm, each allowed exactly that algorithm.
        self._jws = {alg: pyjwt.PyJWS(algorithms=[alg]) for alg in self._algorithms}
        # Signature checks dominate the cost of a request (RSA and EC above all): remember verified tokens.
        self._verified: OrderedDict[str, dict] = OrderedDict()
        self._verifiedMax = verifiedCacheSize

    def authenticate(self, token: str) -> AuthnResult:
        if token.count(".") != 2:
            return None
        claims = self._verified.get(token)
        if claims is None:
            verified = self._verify(token)
            if not isinstance(verified, dict):
                return verified
            claims = verified
            # Only tokens whose signature checked out are remembered, so a flood of forged tokens cannot
            # push out the real ones; claims (expiry above all) are checked on every use.
            self._verified[token] = claims
            if len(self._verified) > self._verifiedMax:
                self._verified.popitem(last=False)
        return self._checkClaims(claims)

    def _verify(self, token: str) -> dict | AuthnResult:
        """The claims of a token whose signature one of the keys verifies, or why not."""
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            return None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            # Covers "none" and any algorithm no configured key is pinned to (HS/RS confusion).
            return Rejected(f"token algorithm {str(alg)[:16]!r} is not accepted")
        kid = header.get("kid")
        candidates = [
            k for k in self._keys if alg in k.algorithms and (k.kid is None or kid is None or k.kid == kid)
        ]
        if not candidates:
            return Rejected("no key matches the token's key id")
        payload: Optional[bytes] = None
        for k in candidates:
            try:
                payload = self._jws[alg].decode_complete(token, key=k.key, algorithms=[alg])["payload"]
                break
            except pyjwt.InvalidSignatureError:
                continue
            except pyjwt.PyJWTError as e:
                _log.debug("JWT rejected by key {source}: {error}", source=k.source, error=e)
                continue
        if payload is None:
            return Rejected("token signature is invalid")
        try:
            claims = json.loads(payload)
        except ValueError:
            return Rejected("token payload is not JSON")
        if not isinstance(claims, dict):
            return Rejected("token payload is not a JSON object")
        return claims

    def _checkClaims(self, claims: dict) -> AuthnResult:
        now = self._clock.seconds()
        leeway = self._leeway
        exp = claims.get("exp")
        if exp is None:
            if self._requireExpiry:
                return Rejected("token has no expiry (exp)")
        elif not _isNumber(exp):
            return Rejected("token expiry (exp) is not a number")
        elif exp <= now - leeway:
            return Rejected("token has expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _isNumber(nbf):
                return Rejected("token nbf is not a number")
            if nbf > now + leeway:
                return Rejected("token is not valid yet (nbf)")
        iat = claims.get("iat")
        if iat is not None:
            if not _isNumber(iat):
                return Rejected("token iat is not a number")
            if iat > now + leeway:
                return Rejected("token is not valid yet (iat)")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            return Rejected("token issuer is not accepted")
        if self._audiences:
            aud = claims.get("aud")
            if isinstance(aud, str):
                auds: FrozenSet[Any] = frozenset([aud])
            elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
                auds = frozenset(aud)
            else:
                return Rejected("token audience is not accepted")
            if not (auds & self._audiences):
                return Rejected("token audience is not accepted")
        user = claims.get(self._usernameClaim)
        if not isinstance(user, str) or not user:
            return Rejected(f"token has no {self._usernameClaim!r} claim to use as user name")
        user = self._usernamePrefix + user
        if not isHeaderSafe(user):
            return Rejected("token user name contains characters that are not allowed")
        rawGroups = claims.get(self._groupsClaim, ())
        if isinstance(rawGroups, str):
            rawGroups = [rawGroups]
        if not isinstance(rawGroups, (list, tuple)) or not all(isinstance(g, str) for g in rawGroups):
            return Rejected(f"token claim {self._groupsClaim!r} must be a string or a list of strings")
        groups = tuple(self._groupsPrefix + g for g in rawGroups)
        if not all(isHeaderSafe(g) for g in groups):
            return Rejected("token group names contain characters that are not allowed")
        return Identity(user=user, groups=groups)
