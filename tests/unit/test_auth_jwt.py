"""Bearer JWTs: keys of each type, every way a token can be wrong, and the algorithm pinning."""

from __future__ import annotations

import base64
import json
import os
import tempfile

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import CertificateBuilder, Name, NameAttribute, random_serial_number
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock

from ksproxy.auth.identity import Identity
from ksproxy.auth.interfaces import Rejected
from ksproxy.auth.jwt import (
    JWTAuthenticator,
    KeyFileError,
    hmacKey,
    loadHMACSecretFile,
    loadJWKS,
    loadPEMKeys,
)

NOW = 1_700_000_000
SECRET = b"s" * 40
ISSUER = "https://issuer.example"
AUDIENCE = "ksproxy"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(public) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**over):
    base = {
        "sub": "alice",
        "groups": ["dev", "ops"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": NOW + 600,
        "iat": NOW,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def clock(at: float = NOW) -> Clock:
    c = Clock()
    c.advance(at)
    return c


def authenticator(keys, **kw) -> JWTAuthenticator:
    kw.setdefault("issuer", ISSUER)
    kw.setdefault("audiences", [AUDIENCE])
    return JWTAuthenticator(keys, kw.pop("clock", None) or clock(), **kw)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# (name, signing key, algorithm, verification keys)
KEYSETS = [
    ("HS256", SECRET, "HS256", lambda: [hmacKey(SECRET)]),
    ("RS256", RSA_KEY, "RS256", lambda: loadPEMKeys(pem(RSA_KEY.public_key()))),
    ("ES256", EC_KEY, "ES256", lambda: loadPEMKeys(pem(EC_KEY.public_key()))),
]


@pytest.mark.parametrize("name,signer,alg,keys", KEYSETS, ids=[k[0] for k in KEYSETS])
class TestEachKeyType:
    def test_valid(self, name, signer, alg, keys):
        token = jwt.encode(claims(), signer, algorithm=alg)
        assert authenticator(keys()).authenticate(token) == Identity("alice", groups=("dev", "ops"))

    @pytest.mark.parametrize(
        "over,reason",
        [
            ({"exp": NOW - 31}, "token has expired"),
            ({"exp": None}, "token has no expiry (exp)"),
            ({"exp": "soon"}, "token expiry (exp) is not a number"),
            ({"nbf": NOW + 31}, "token is not valid yet (nbf)"),
            ({"iat": NOW + 31}, "token is not valid yet (iat)"),
            ({"iss": "https://evil.example"}, "token issuer is not accepted"),
            ({"iss": None}, "token issuer is not accepted"),
            ({"aud": "someone-else"}, "token audience is not accepted"),
            ({"aud": ["a", "b"]}, "token audience is not accepted"),
            ({"aud": None}, "token audience is not accepted"),
            ({"sub": None}, "token has no 'sub' claim to use as user name"),
            ({"sub": ""}, "token has no 'sub' claim to use as user name"),
            (
                {"sub": "alice\r\nX-Remote-User: root"},
                "token user name contains characters that are not allowed",
            ),
            ({"groups": [1, 2]}, "token claim 'groups' must be a string or a list of strings"),
            ({"groups": ["ok", "bad\n"]}, "token group names contain characters that are not allowed"),
        ],
    )
    def test_bad_claims(self, name, signer, alg, keys, over, reason):
        token = jwt.encode(claims(**over), signer, algorithm=alg)
        assert authenticator(keys()).authenticate(token) == Rejected(reason)

    def test_tampered_payload(self, name, signer, alg, keys):
        header, payload, sig = jwt.encode(claims(), signer, algorithm=alg).split(".")
        forged = b64(json.dumps(claims(sub="admin", groups=["system:masters"])).encode())
        assert authenticator(keys()).authenticate(f"{header}.{forged}.{sig}") == Rejected(
            "token signature is invalid"
        )

    def test_tampered_signature(self, name, signer, alg, keys):
        header, payload, sig = jwt.encode(claims(), signer, algorithm=alg).split(".")
        raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
        raw[len(raw) // 2] ^= 1
        assert authenticator(keys()).authenticate(f"{header}.{payload}.{b64(bytes(raw))}") == Rejected(
            "token signature is invalid"
        )

    def test_alg_none_refused(self, name, signer, alg, keys):
        token = jwt.encode(claims(), None, algorithm="none")
        assert authenticator(keys()).authenticate(token) == Rejected("token algorithm 'none' is not accepted")

    def test_unsigned_token_with_the_key_algorithm_refused(self, name, signer, alg, keys):
        header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        body = b64(json.dumps(claims()).encode())
        assert authenticator(keys()).authenticate(f"{header}.{body}.") == Rejected(
            "token signature is invalid"
        )


@pytest.mark.parametrize("leeway", [0, 30])
def test_expiry_on_both_sides_of_the_leeway(leeway):
    c = clock()
    auth = authenticator([hmacKey(SECRET)], clock=c, leeway=leeway)
    token = jwt.encode(claims(exp=NOW + 100), SECRET, algorithm="HS256")
    c.advance(100 + leeway - 0.5)
    assert isinstance(auth.authenticate(token), Identity)
    c.advance(1)
    assert auth.authenticate(token) == Rejected("token has expired")


def test_not_before_on_both_sides_of_the_leeway():
    c = clock()
    auth = authenticator([hmacKey(SECRET)], clock=c)
    token = jwt.encode(claims(nbf=NOW + 100, iat=NOW + 100), SECRET, algorithm="HS256")
    c.advance(100 - 30 - 0.5)
    assert auth.authenticate(token) == Rejected("token is not valid yet (nbf)")
    c.advance(1)
    assert isinstance(auth.authenticate(token), Identity)


def test_hs_rs_confusion_refused():
    """An HS256 token 'signed' with the RSA public key's PEM must not pass as the RSA key's token."""
    publicPem = pem(RSA_KEY.public_key())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    import hmac

    sig = b64(hmac.new(publicPem, f"{header}.{body}".encode(), "sha256").digest())
    token = f"{header}.{body}.{sig}"
    assert authenticator(loadPEMKeys(publicPem)).authenticate(token) == Rejected(
        "token algorithm 'HS256' is not accepted"
    )
    # With an HMAC secret configured as well, HS256 is accepted in general but only with the secret.
    keys = [*loadPEMKeys(publicPem), hmacKey(SECRET)]
    assert authenticator(keys).authenticate(token) == Rejected("token signature is invalid")


def test_rs_token_against_hmac_only_refused():
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
    assert authenticator([hmacKey(SECRET)]).authenticate(token) == Rejected(
        "token algorithm 'RS256' is not accepted"
    )


def test_wrong_rsa_key():
    token = jwt.encode(claims(), RSA_OTHER, algorithm="RS256")
    assert authenticator(loadPEMKeys(pem(RSA_KEY.public_key()))).authenticate(token) == Rejected(
        "token signature is invalid"
    )


def test_es256_key_refuses_es384_header():
    token = jwt.encode(claims(), ec.generate_private_key(ec.SECP384R1()), algorithm="ES384")
    assert authenticator(loadPEMKeys(pem(EC_KEY.public_key()))).authenticate(token) == Rejected(
        "token algorithm 'ES384' is not accepted"
    )


@pytest.mark.parametrize("token", ["opaque-static-token", "a.b", "not.a.jwt", "e30.e30.e30x.y"])
def test_non_jwt_is_not_recognised(token):
    assert authenticator([hmacKey(SECRET)]).authenticate(token) is None


def test_claims_configurable_and_prefixed():
    token = jwt.encode(claims(email="a@x.io", roles="admins"), SECRET, algorithm="HS256")
    auth = authenticator(
        [hmacKey(SECRET)],
        usernameClaim="email",
        groupsClaim="roles",
        usernamePrefix="oidc:",
        groupsPrefix="oidc:",
    )
    assert auth.authenticate(token) == Identity("oidc:a@x.io", groups=("oidc:admins",))


def test_no_issuer_or_audience_configured_accepts_any():
    token = jwt.encode(claims(iss="whoever", aud="whatever", groups=None), SECRET, algorithm="HS256")
    auth = JWTAuthenticator([hmacKey(SECRET)], clock())
    assert auth.authenticate(token) == Identity("alice")


def test_audience_list_and_several_configured():
    token = jwt.encode(claims(aud=["x", "ksproxy"]), SECRET, algorithm="HS256")
    assert isinstance(
        authenticator([hmacKey(SECRET)], audiences=["y", "ksproxy"]).authenticate(token), Identity
    )


class TestJWKS:
    def jwks(self, *entries) -> bytes:
        return json.dumps({"keys": list(entries)}).encode()

    def jwk(self, key, kid, **extra):
        d = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        d.update(kid=kid, **extra)
        return d

    def test_kid_selects_key(self):
        keys = loadJWKS(self.jwks(self.jwk(RSA_OTHER, "old"), self.jwk(RSA_KEY, "new")))
        auth = authenticator(keys)
        good = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "new"})
        assert isinstance(auth.authenticate(good), Identity)
        # Signed by "new" but claiming to be "old": only "old" is tried.
        wrongKid = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "old"})
        assert auth.authenticate(wrongKid) == Rejected("token signature is invalid")
        unknown = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "gone"})
        assert auth.authenticate(unknown) == Rejected("no key matches the token's key id")

    def test_no_kid_tries_every_key(self):
        keys = loadJWKS(self.jwks(self.jwk(RSA_OTHER, "old"), self.jwk(RSA_KEY, "new")))
        token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
        assert isinstance(authenticator(keys).authenticate(token), Identity)

    def test_alg_narrows(self):
        keys = loadJWKS(self.jwks(self.jwk(RSA_KEY, "k", alg="RS256")))
        assert keys[0].algorithms == frozenset(["RS256"])
        ps = jwt.encode(claims(), RSA_KEY, algorithm="PS256", headers={"kid": "k"})
        assert authenticator(keys).authenticate(ps) == Rejected("token algorithm 'PS256' is not accepted")

    def test_alg_that_does_not_fit_the_key_type(self):
        with pytest.raises(KeyFileError, match="does not fit"):
            loadJWKS(self.jwks(self.jwk(RSA_KEY, "k", alg="HS256")))

    def test_encryption_keys_skipped(self):
        keys = loadJWKS(self.jwks(self.jwk(RSA_OTHER, "enc", use="enc"), self.jwk(RSA_KEY, "sig")))
        assert [k.kid for k in keys] == ["sig"]

    def test_ec_key(self):
        d = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
        keys = loadJWKS(self.jwks(dict(d, kid="ec")))
        assert keys[0].algorithms == frozenset(["ES256"])
        token = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec"})
        assert isinstance(authenticator(keys).authenticate(token), Identity)

    @pytest.mark.parametrize(
        "doc", [b"nope", b"{}", b'{"keys": [1]}', b'{"keys": []}', b'{"keys": [{"kty": "XX"}]}']
    )
    def test_bad_documents(self, doc):
        with pytest.raises(KeyFileError):
            loadJWKS(doc, "jwks.json")


class TestKeyFiles:
    def test_certificate_and_several_keys_in_one_pem(self):
        name = Name([NameAttribute(NameOID.COMMON_NAME, "issuer")])
        import datetime

        cert = (
            CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(EC_KEY.public_key())
            .serial_number(random_serial_number())
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1))
            .sign(EC_KEY, hashes.SHA256())
        )
        data = pem(RSA_KEY.public_key()) + cert.public_bytes(serialization.Encoding.PEM)
        keys = loadPEMKeys(data)
        assert [sorted(k.algorithms)[0] for k in keys] == ["PS256", "ES256"]
        token = jwt.encode(claims(), EC_KEY, algorithm="ES256")
        assert isinstance(authenticator(keys).authenticate(token), Identity)

    def test_private_key_refused(self):
        data = RSA_KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with pytest.raises(KeyFileError, match="private key"):
            loadPEMKeys(data, "k.pem")

    def test_short_rsa_refused(self):
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        with pytest.raises(KeyFileError, match="too short"):
            loadPEMKeys(pem(small.public_key()))

    def test_no_key(self):
        with pytest.raises(KeyFileError, match="no public key"):
            loadPEMKeys(b"hello", "k.pem")

    def test_hmac_secret_file_strips_newline_and_needs_32_bytes(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "secret")
            with open(path, "wb") as f:
                f.write(SECRET + b"\n")
            assert loadHMACSecretFile(path).key == SECRET
            with open(path, "wb") as f:
                f.write(b"short\n")
            with pytest.raises(KeyFileError, match="at least 32"):
                loadHMACSecretFile(path)


def test_verified_tokens_remembered_forged_ones_not():
    auth = authenticator([hmacKey(SECRET)], verifiedCacheSize=2)
    tokens = [jwt.encode(claims(sub=f"u{i}"), SECRET, algorithm="HS256") for i in range(3)]
    for t in tokens:
        assert isinstance(auth.authenticate(t), Identity)
    assert list(auth._verified) == tokens[1:]  # bounded, oldest out
    auth.authenticate(jwt.encode(claims(), b"x" * 32, algorithm="HS256"))
    assert list(auth._verified) == tokens[1:]
    # A remembered token is still checked against the clock.
    auth._clock.advance(601 + 30)
    assert auth.authenticate(tokens[2]) == Rejected("token has expired")
