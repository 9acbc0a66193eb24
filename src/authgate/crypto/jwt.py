"""Signing keys and JWTs: generation, JWK export, signing with ``kid``, verification.

Only the algorithms named in ``ALGORITHMS`` are ever accepted when verifying our own tokens; a
token's ``alg`` header never chooses the key type. HS256 exists only for verifying tokens that a
customer signs with a shared secret (``verify_hs256``), where the dialect requires it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ALGORITHMS = ("EdDSA", "ES256", "RS256")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class TokenError(Exception):
    """A token failed verification; ``expired`` tells an expired but well-signed one apart."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    kid: str
    alg: str
    private_pem: bytes
    public_jwk: dict[str, Any]


def generate_key(alg: str) -> KeyMaterial:
    if alg == "EdDSA":
        private: PrivateKey = ed25519.Ed25519PrivateKey.generate()
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r}")
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    jwk = public_jwk(private.public_key(), alg)
    kid = jwk_thumbprint(jwk)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return KeyMaterial(kid=kid, alg=alg, private_pem=pem, public_jwk=jwk)


def public_jwk(public: PublicKey, alg: str) -> dict[str, Any]:
    exporter = {"EdDSA": OKPAlgorithm, "ES256": ECAlgorithm, "RS256": RSAAlgorithm}[alg]
    return dict(exporter.to_jwk(public, as_dict=True))


_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"),
                       "RSA": ("e", "kty", "n")}


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint: a stable, content-derived ``kid``."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).decode().rstrip("=")


def load_private_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey,
                            rsa.RSAPrivateKey)):
        raise ValueError("unsupported private key type")
    return key


def load_public_jwk(jwk: dict[str, Any]) -> Any:
    return jwt.PyJWK.from_dict(jwk).key


# The signature schemes, made once: they hold no state, and making them again for every
# signature cost about a tenth of an ES256 signature.
_SHA256 = hashes.SHA256()
_ECDSA_SHA256 = ec.ECDSA(_SHA256)
_PKCS1V15 = padding.PKCS1v15()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class Signer:
    """Signs claims with one private key: RFC 7515 compact serialisation, the header encoded
    once per key and type, the payload with orjson (PyJWT's encoder costs more than the
    signature; every token is still verified by PyJWT, joserfc and client SDKs in the tests)."""

    __slots__ = ("kid", "alg", "_key", "_headers")

    def __init__(self, kid: str, alg: str, private_pem: bytes) -> None:
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported signing algorithm {alg!r}")
        self.kid, self.alg = kid, alg
        self._key = load_private_key(private_pem)
        self._headers: dict[str, bytes] = {}

    def _header(self, typ: str) -> bytes:
        header = self._headers.get(typ)
        if header is None:
            header = self._headers[typ] = _b64(orjson.dumps(
                {"alg": self.alg, "kid": self.kid, "typ": typ}))
        return header

    def _signature(self, data: bytes) -> bytes:
        key = self._key
        if self.alg == "EdDSA":
            assert isinstance(key, ed25519.Ed25519PrivateKey)
            return key.sign(data)
        if self.alg == "ES256":  # JWS wants r || s, 32 bytes each, not DER
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            r, s = decode_dss_signature(key.sign(data, _ECDSA_SHA256))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        assert isinstance(key, rsa.RSAPrivateKey)
        return key.sign(data, _PKCS1V15, _SHA256)

    def sign(self, claims: dict[str, Any], *, typ: str = "JWT") -> str:
        signing_input = self._header(typ) + b"." + _b64(orjson.dumps(claims))
        return (signing_input + b"." + _b64(self._signature(signing_input))).decode()


def unverified_header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError("malformed token") from exc


def has_type(header: dict[str, Any], typ: str) -> bool:
    """Whether a JOSE header declares the media type ``typ``: compared without case and with
    the optional "application/" prefix (RFC 7515 §4.1.9)."""
    declared = header.get("typ")
    if not isinstance(declared, str):
        return False
    declared = declared.lower()
    return declared.removeprefix("application/") == typ.lower().removeprefix("application/")


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a token whose signature is not checked yet: only to choose which key
    verifies it, never to trust anything in it."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError("malformed token") from exc
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    return claims


def verify(token: str, key: Any, alg: str, *, issuer: str | None = None,
           audience: str | list[str] | None = None, leeway: float = 30,
           require: tuple[str, ...] = ("exp", "iat", "sub"),
           now: float | None = None) -> dict[str, Any]:
    """Verify a token signed with one of our asymmetric keys. ``now`` (epoch seconds) is the
    clock that ``exp``, ``nbf`` and ``iat`` are checked against (default: the system clock)."""
    if alg not in ALGORITHMS:
        raise TokenError("unsupported algorithm")
    return _decode(token, key, [alg], issuer=issuer, audience=audience, leeway=leeway,
                   require=require, now=now)


def verify_hs256(token: str, secret: bytes, *, audience: str | list[str] | None = None,
                 issuer: str | None = None, leeway: float = 30,
                 require: tuple[str, ...] = (), now: float | None = None) -> dict[str, Any]:
    """Verify a customer-signed token made with a shared secret (HS256 only; never ``none``)."""
    return _decode(token, secret, ["HS256"], issuer=issuer, audience=audience, leeway=leeway,
                   require=require, now=now)


def check_times(claims: dict[str, Any], now: float, leeway: float) -> None:
    """``exp``, ``nbf`` and ``iat`` against ``now``, with ``leeway`` seconds of skew."""
    for name in ("exp", "nbf", "iat"):
        if name in claims and (isinstance(claims[name], bool)
                               or not isinstance(claims[name], (int, float))
                               or not math.isfinite(claims[name])):
            raise TokenError(f"invalid {name} claim")
    if "exp" in claims and claims["exp"] <= now - leeway:
        raise TokenError("token expired", expired=True)
    if "nbf" in claims and claims["nbf"] > now + leeway:
        raise TokenError("token not yet valid")
    if "iat" in claims and claims["iat"] > now + leeway:
        raise TokenError("token issued in the future")


def _decode(token: str, key: Any, algorithms: list[str], *, issuer: str | None,
            audience: str | list[str] | None, leeway: float,
            require: tuple[str, ...], now: float | None) -> dict[str, Any]:
    options: dict[str, Any] = {"require": list(require), "verify_aud": audience is not None,
                               "verify_exp": False, "verify_nbf": False, "verify_iat": False}
    try:
        claims = jwt.decode(token, key, algorithms=algorithms, audience=audience,
                            issuer=issuer, options=options)
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid token: {type(exc).__name__}") from exc
    except (ValueError, TypeError) as exc:
        raise TokenError("malformed token") from exc
    try:  # what orjson cannot encode (integers past 64 bits, lone surrogates, deep nesting)
        orjson.dumps(claims)  # could not be signed into our own tokens or stored
    except TypeError as exc:
        raise TokenError("malformed token") from exc
    check_times(claims, time.time() if now is None else now, leeway)
    return claims
