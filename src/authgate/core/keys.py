"""Signing keys per realm: creation, rotation, the published JWKS, and token verification keys.

Private keys are stored encrypted under the master secret, bound to their ``kid``. Rotation makes
a new active key and retires the old one, which stays in the JWKS until every token it could have
signed has expired. Parsed keys are cached for ``key_cache_seconds``: after a rotation on one
node, another may sign with the previous key for that long, which is harmless because the
previous key is still published, for that long more than the longest token lifetime. Public keys
and verified tokens are cached for the same time, so a key withdrawn from the JWKS stops
verifying on every node within ``key_cache_seconds``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm, SigningKey
from authgate.core.ports import Tx
from authgate.core.recent import Recent
from authgate.crypto import jwt as jwtlib

if TYPE_CHECKING:
    from authgate.core.engine import Core

_PURPOSE = "signing-key"
KID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # RFC 7638 thumbprints, base64url
_LEEWAY = 30  # seconds of clock skew tolerated on exp / iat
_VERIFIED_CACHE_SIZE = 8192


class Keys:
    def __init__(self, core: Core) -> None:
        self.core = core
        seconds = core.settings.key_cache_seconds
        self._signers: Recent[str, jwtlib.Signer] = Recent(seconds)  # by realm id
        self._jwks: Recent[str, bytes] = Recent(seconds)  # by realm id
        # kid -> (realm_id, alg, key, publish_until)
        self._public: Recent[str, tuple[str, str, Any, datetime | None]] = Recent(seconds)
        # (token, realm, issuer, audience, require, typ) -> claims
        self._verified: Recent[tuple[Any, ...], dict[str, Any]] = Recent(
            seconds, _VERIFIED_CACHE_SIZE)

    @property
    def max_token_lifetime(self) -> timedelta:
        """How long a retired key stays published: the longest lifetime of a token it signs,
        after the other nodes' cached signers (``key_cache_seconds``) stop using it."""
        s = self.core.settings
        longest = max(s.access_token_ttl, s.id_token_ttl, s.refresh_token_ttl,
                      s.tiledesk_token_ttl, s.deskera_token_ttl)
        return timedelta(seconds=longest + s.key_cache_seconds + 60)

    def _new_record(self, realm: Realm, alg: str) -> SigningKey:
        material = jwtlib.generate_key(alg)
        return SigningKey(
            kid=material.kid, realm_id=realm.id, alg=alg, public_jwk=material.public_jwk,
            private_enc=self.core.box.encrypt(_PURPOSE, material.private_pem, material.kid),
            status="active", created_at=self.core.now(),
        )

    async def create_first(self, tx: Tx, realm: Realm) -> SigningKey:
        key = self._new_record(realm, self.core.settings.signing_alg)
        await tx.signing_keys.add(key)
        return key

    async def rotate(self, realm: Realm, alg: str | None = None) -> SigningKey:
        alg = alg or self.core.settings.signing_alg
        if alg not in jwtlib.ALGORITHMS:
            raise AuthError(ErrorCode.INVALID_REQUEST, f"Unsupported algorithm {alg!r}.")
        now = self.core.now()
        key = self._new_record(realm, alg)
        async with self.core.store.transaction(write=True) as tx:
            # Rotations of one realm wait for each other: each then retires the key the one
            # before it made (two at once had both retired the same key, leaving two active).
            await tx.realms.lock(realm.id)
            previous = await tx.signing_keys.active(realm.id)
            if previous is not None:
                await tx.signing_keys.retire(previous.kid, now, now + self.max_token_lifetime)
            await tx.signing_keys.add(key)
            await self.core.audit.record(tx, "keys.rotated", realm_id=realm.id, kid=key.kid,
                                         previous=previous.kid if previous else None)
        self._signers.pop(realm.id)
        self._jwks.pop(realm.id)
        if previous is not None:
            self._public.pop(previous.kid)
        return key

    async def list(self, realm: Realm) -> list[SigningKey]:
        async with self.core.store.transaction() as tx:
            return await tx.signing_keys.list(realm.id)

    async def signer(self, realm: Realm) -> jwtlib.Signer:
        cached = self._signers.get(realm.id)
        if cached is not None:
            return cached
        async with self.core.store.transaction() as tx:
            key = await tx.signing_keys.active(realm.id)
        if key is None:  # a realm made by an older version, or keys deleted by hand
            async with self.core.store.transaction(write=True) as tx:
                await tx.realms.lock(realm.id)  # one first key, whatever the nodes racing
                key = await tx.signing_keys.active(realm.id) or await self.create_first(tx, realm)
            self._jwks.pop(realm.id)  # a JWKS cached while the realm had no key is stale
        pem = self.core.box.decrypt(_PURPOSE, key.private_enc, key.kid)
        return self._signers.put(realm.id, jwtlib.Signer(key.kid, key.alg, pem))

    async def sign(self, realm: Realm, claims: dict[str, Any], *, typ: str = "JWT") -> str:
        return (await self.signer(realm)).sign(claims, typ=typ)

    async def jwks(self, realm: Realm) -> bytes:
        """The realm's published public keys, serialised once per cache period."""
        cached = self._jwks.get(realm.id)
        if cached is not None:
            return cached
        async with self.core.store.transaction() as tx:
            keys = await tx.signing_keys.published(realm.id, self.core.now())
        return self._jwks.put(realm.id, orjson.dumps({"keys": [key.public_jwk for key in keys]}))

    async def public_key(self, kid: str) -> tuple[str, str, Any]:
        """(realm id, alg, key) for a kid we issued; INVALID_TOKEN for anything else."""
        found = self._public.get(kid)
        if found is None:  # read again after key_cache_seconds: another node may retire it
            async with self.core.store.transaction() as tx:
                record = await tx.signing_keys.get(kid)
            if record is None:
                raise AuthError(ErrorCode.INVALID_TOKEN)
            found = self._public.put(kid, (record.realm_id, record.alg,
                                           jwtlib.load_public_jwk(record.public_jwk),
                                           record.publish_until))
        realm_id, alg, key, publish_until = found
        if publish_until is not None and publish_until <= self.core.now():
            raise AuthError(ErrorCode.INVALID_TOKEN)  # a key withdrawn from the JWKS
        return realm_id, alg, key

    async def verify(self, realm: Realm, token: str, *, issuer: str | None,
                     audience: str | list[str] | None,
                     require: tuple[str, ...] = ("exp", "iat", "sub"),
                     typ: str | None = None) -> dict[str, Any]:
        """Verify a JWT that this realm signed; the token's header never picks the algorithm.
        ``typ``, when given, is the token type the header must declare (RFC 8725 §3.11): an
        access token is ``at+jwt`` (RFC 9068), so an ID token is never taken for one.

        A token is immutable, so its signature is checked once: later presentations of the same
        token (for the same realm, issuer, audience and type) are answered from a bounded cache
        for ``key_cache_seconds``, with the expiry checked again each time. Revocation is the
        session's business, not this cache's: callers check the session on every request.
        """
        cache_key = (token, realm.id, issuer, repr(audience), require, typ)
        claims = self._verified.get(cache_key)
        if claims is not None:
            if claims.get("exp", 0) + _LEEWAY > self.core.now().timestamp():
                return claims
            self._verified.pop(cache_key)
            raise AuthError(ErrorCode.TOKEN_EXPIRED)
        claims = await self._verify_uncached(realm, token, issuer=issuer, audience=audience,
                                             require=require, typ=typ)
        return self._verified.put(cache_key, claims)

    async def _verify_uncached(self, realm: Realm, token: str, *, issuer: str | None,
                               audience: str | list[str] | None, require: tuple[str, ...],
                               typ: str | None) -> dict[str, Any]:
        try:
            header = jwtlib.unverified_header(token)
            kid = header.get("kid")
            if not isinstance(kid, str) or not KID.fullmatch(kid):
                raise AuthError(ErrorCode.INVALID_TOKEN)  # not one of ours: not looked up
            if typ is not None and not jwtlib.has_type(header, typ):
                raise AuthError(ErrorCode.INVALID_TOKEN)
            realm_id, alg, key = await self.public_key(kid)
            if realm_id != realm.id or header.get("alg") != alg:
                raise AuthError(ErrorCode.INVALID_TOKEN)
            return jwtlib.verify(token, key, alg, issuer=issuer, audience=audience,
                                 require=require, leeway=_LEEWAY,
                                 now=self.core.now().timestamp())
        except jwtlib.TokenError as exc:
            code = ErrorCode.TOKEN_EXPIRED if exc.expired else ErrorCode.INVALID_TOKEN
            raise AuthError(code) from None
