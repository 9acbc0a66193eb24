"""Tokens we sign verify with independent libraries, for every algorithm we offer."""

from __future__ import annotations

import jwt
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from authgate.crypto import jwt as jwtlib

CLAIMS = {"sub": "u-1", "iat": 1_900_000_000, "exp": 1_900_000_900, "amr": ["pwd"],
          "tenants": {"t1": {"roles": ["admin"]}}, "name": "Zoë \u2603"}


@pytest.mark.parametrize("alg", jwtlib.ALGORITHMS)
def test_signed_tokens_verify_with_pyjwt_and_joserfc(alg: str):
    material = jwtlib.generate_key(alg)
    token = jwtlib.Signer(material.kid, alg, material.private_pem).sign(CLAIMS, typ="at+jwt")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": material.kid, "typ": "at+jwt"}
    public = jwt.PyJWK.from_dict(material.public_jwk).key
    assert jwt.decode(token, public, algorithms=[alg],
                      options={"verify_exp": False, "verify_iat": False}) == CLAIMS
    decoded = jose_jwt.decode(token, KeySet.import_key_set({"keys": [material.public_jwk]}),
                              algorithms=[alg])
    assert decoded.claims == CLAIMS
    assert jwtlib.verify(token, public, alg, now=1_900_000_100) == CLAIMS


@pytest.mark.parametrize("alg", jwtlib.ALGORITHMS)
def test_a_tampered_token_or_another_key_is_refused(alg: str):
    material, other = jwtlib.generate_key(alg), jwtlib.generate_key(alg)
    token = jwtlib.Signer(material.kid, alg, material.private_pem).sign(CLAIMS)
    head, body, signature = token.split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"admin","exp":1900000900,"iat":1}').decode()
    public = jwt.PyJWK.from_dict(material.public_jwk).key
    for bad in (f"{head}.{forged}.{signature}", f"{head}.{body}.{signature[:-4]}AAAA"):
        with pytest.raises(jwtlib.TokenError):
            jwtlib.verify(bad, public, alg, now=1_900_000_100)
    with pytest.raises(jwtlib.TokenError):
        jwtlib.verify(token, jwt.PyJWK.from_dict(other.public_jwk).key, alg,
                      now=1_900_000_100)
    with pytest.raises(jwtlib.TokenError) as expired:
        jwtlib.verify(token, public, alg, now=1_900_001_000)
    assert expired.value.expired


def test_new_ids_are_random_version_4_uuids_in_canonical_form():
    import uuid

    from authgate.crypto.tokens import new_id

    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value  # canonical: lowercase, hyphenated
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Every bit outside the version and variant fields varies.
    varied = 0
    for value in ids:
        varied |= uuid.UUID(value).int ^ uuid.UUID(ids[0]).int
    assert bin(varied).count("1") == 128 - 6


def test_ordered_ids_are_version_7_uuids_that_sort_by_when_they_were_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    from authgate.crypto import tokens

    start = 1_700_000_000_000  # ms
    clock = iter(range(start, start + 500))  # a millisecond apart, then...
    monkeypatch.setattr(tokens.time, "time_ns", lambda: next(clock) * 1_000_000)
    ids = [tokens.new_ordered_id() for _ in range(500)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for at, value in enumerate(ids):
        parsed = uuid.UUID(value)
        assert str(parsed) == value  # canonical: lowercase, hyphenated
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert parsed.int >> 80 == start + at  # the milliseconds, first
    monkeypatch.setattr(tokens.time, "time_ns", lambda: start * 1_000_000)
    same = [tokens.new_ordered_id() for _ in range(500)]  # ...all in one millisecond
    assert len(set(same)) == len(same)
    varied = 0
    for value in same:
        varied |= uuid.UUID(value).int ^ uuid.UUID(same[0]).int
    assert bin(varied).count("1") == 128 - 48 - 6  # every random bit varies


def test_a_header_type_matches_without_case_or_the_application_prefix():
    from authgate.crypto.jwt import has_type

    assert has_type({"typ": "at+jwt"}, "at+jwt")
    assert has_type({"typ": "application/AT+JWT"}, "at+jwt")
    assert not has_type({"typ": "JWT"}, "at+jwt")
    assert not has_type({}, "at+jwt")
    assert not has_type({"typ": 7}, "at+jwt")


@pytest.mark.parametrize("claims", [
    {"sub": "u", "phone": 123456789012345678901234567890},  # past 64 bits
    {"sub": "u", "name": "\ud800"},  # a lone surrogate
    {"sub": "u", "exp": float("nan")},  # would never expire
    {"sub": "u", "exp": float("inf")},
])
def test_a_customer_token_whose_claims_cannot_be_encoded_again_is_refused(claims):
    """PyJWT decodes with the standard json module, which accepts what Authgate can neither
    sign into its own tokens nor store: such a token is malformed, not a 500 later."""
    secret = b"s" * 32
    token = jwt.encode(claims, secret, algorithm="HS256")
    with pytest.raises(jwtlib.TokenError):
        jwtlib.verify_hs256(token, secret)
