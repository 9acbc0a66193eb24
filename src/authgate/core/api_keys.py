"""API keys: credentials of an application (not of a user), belonging to a realm and optionally
to one organisation in it.

The web API's ``APIKey`` is one: it names the developer's app, and so its realm. A key is shown
once when created and stored as a SHA-256 digest (it has 192 bits of entropy, so a fast digest
is enough). Its first characters are kept in clear as a prefix, so an operator can tell keys
apart. Keys can be revoked; the time of last use is recorded (at most once a minute, so that a
busy key does not turn every request into a write).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ApiKey, Realm
from authgate.crypto.tokens import digest, new_id, new_token

if TYPE_CHECKING:
    from authgate.core.engine import Core

KEY_PREFIX = "agk_"
PREFIX_LENGTH = 12  # what is kept in clear: "agk_" and 8 random characters
TOUCH_EVERY = timedelta(seconds=60)
MAX_PRESENTED_KEY = 200

API_KEY_CREATED = "api_key.created"
API_KEY_REVOKED = "api_key.revoked"


@dataclass(slots=True)
class VerifiedKey:
    """A valid API key and the realm it belongs to."""

    realm: Realm
    key: ApiKey


class ApiKeys:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def create(self, realm: Realm, name: str, *,
                     organisation_id: str | None = None) -> tuple[ApiKey, str]:
        """Create a key; returns the record and the key itself, which is never shown again."""
        name = (name or "").strip()
        if not name or len(name) > 200:
            raise AuthError(ErrorCode.INVALID_REQUEST, "An API key needs a name of 1 to 200 "
                            "characters.", details={"field": "name"})
        if organisation_id is not None:
            async with self.core.store.transaction() as tx:
                org = await tx.organisations.get(organisation_id)
            if org is None or org.realm_id != realm.id:
                raise AuthError(ErrorCode.ORGANISATION_NOT_FOUND)
        raw = KEY_PREFIX + new_token(24)
        key = ApiKey(id=new_id(), realm_id=realm.id, name=name, prefix=raw[:PREFIX_LENGTH],
                     key_hash=digest(raw), created_at=self.core.now(),
                     organisation_id=organisation_id)
        async with self.core.store.transaction(write=True) as tx:
            await tx.api_keys.add(key)
            await self.core.audit.record(tx, API_KEY_CREATED, realm_id=realm.id,
                                         organisation_id=organisation_id, api_key_id=key.id,
                                         name=name)
        return key, raw

    async def verify(self, raw: str | None) -> VerifiedKey:
        """The live key ``raw`` is, with its realm; INVALID_API_KEY otherwise."""
        if not raw or len(raw) > MAX_PRESENTED_KEY:
            raise AuthError(ErrorCode.INVALID_API_KEY)
        async with self.core.store.transaction() as tx:
            key = await tx.api_keys.by_hash(digest(raw))
        if key is None or key.revoked_at is not None:
            raise AuthError(ErrorCode.INVALID_API_KEY)
        realm = await self.core.realms.get(key.realm_id)
        if realm is None:
            raise AuthError(ErrorCode.INVALID_API_KEY)
        now = self.core.now()
        if key.last_used_at is None or now - key.last_used_at >= TOUCH_EVERY:
            async with self.core.store.transaction(write=True) as tx:
                await tx.api_keys.touch(key.id, now)
            key.last_used_at = now
        return VerifiedKey(realm=realm, key=key)

    async def list(self, realm: Realm) -> list[ApiKey]:
        async with self.core.store.transaction() as tx:
            return await tx.api_keys.list(realm.id)

    async def revoke(self, realm: Realm, key_id: str, *, actor: str | None = None) -> ApiKey:
        """Revoke a key by its id or its prefix."""
        keys = [k for k in await self.list(realm) if key_id in (k.id, k.prefix)]
        if len(keys) != 1:
            raise AuthError(ErrorCode.NOT_FOUND, "No such API key.")
        key = keys[0]
        if key.revoked_at is not None:
            return key
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            await tx.api_keys.revoke(key.id, now)
            await self.core.audit.record(tx, API_KEY_REVOKED, realm_id=realm.id,
                                         organisation_id=key.organisation_id,
                                         api_key_id=key.id,
                                         **({"actor": actor} if actor else {}))
        key.revoked_at = now
        return key
