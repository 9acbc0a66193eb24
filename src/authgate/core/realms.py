"""Realms: the isolation boundary. Each has its own users, keys, settings and issuer URL."""

from __future__ import annotations

import re
import secrets
import string
from typing import TYPE_CHECKING, Any

from authgate.core import scopes
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import REALM_DEFAULTS, Realm
from authgate.core.ports import Conflict
from authgate.core.recent import Recent
from authgate.crypto.tokens import new_id

if TYPE_CHECKING:
    from authgate.core.engine import Core

DEFAULT_REALM = "default"
REALM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # whole names: fullmatch
_PROJECT_ALPHABET = string.ascii_letters + string.digits
PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # whole ids: fullmatch


def new_project_id() -> str:
    """A Descope-style project id: ``P`` and 27 letters or digits."""
    return "P" + "".join(secrets.choice(_PROJECT_ALPHABET) for _ in range(27))


def check_settings(settings: dict[str, Any], *, changed: dict[str, Any] | None = None) -> None:
    """INVALID_REQUEST naming what is wrong with a realm's ``settings`` (or the ``changed``
    part of them): a name the core does not read, a value of the wrong type, a default scope
    the realm does not grant. Stored unchecked, such values broke every sign-in later."""
    unknown = set(changed if changed is not None else settings) - set(REALM_DEFAULTS)
    if unknown:
        raise AuthError(ErrorCode.INVALID_REQUEST, f"Unknown realm settings: {sorted(unknown)}")
    problems: list[str] = []
    for name, value in settings.items():
        if name in ("reveal_unknown_users", "allow_signup") and not isinstance(value, bool):
            problems.append(f"{name} must be true or false.")
        elif name == "audience" and not (isinstance(value, str) and len(value) <= 1000):
            problems.append("audience must be a string of at most 1000 characters.")
    problems += scopes.check_settings(settings)
    if problems:
        raise AuthError(ErrorCode.INVALID_REQUEST, " ".join(problems))


class Realms:
    def __init__(self, core: Core) -> None:
        self.core = core
        # "name:..." or "project:..." -> realm; settings changes reach other nodes within
        # key_cache_seconds.
        self._cache: Recent[str, Realm] = Recent(core.settings.key_cache_seconds)

    def issuer(self, realm: Realm) -> str:
        base = self.core.settings.issuer
        return base if realm.name == DEFAULT_REALM else f"{base}/realms/{realm.name}"

    def audience(self, realm: Realm) -> str:
        return realm.setting("audience") or self.issuer(realm)

    async def create(self, name: str, *, display_name: str | None = None,
                     settings: dict[str, Any] | None = None) -> Realm:
        if not REALM_NAME.fullmatch(name):
            raise AuthError(ErrorCode.INVALID_REQUEST,
                            "A realm name is 1-63 lowercase letters, digits, '-' or '_'.")
        check_settings(dict(settings or {}))
        realm = Realm(id=new_id(), name=name, display_name=display_name or name,
                      project_id=new_project_id(), settings=dict(settings or {}),
                      created_at=self.core.now())
        try:
            async with self.core.store.transaction(write=True) as tx:
                await tx.realms.add(realm)
                await self.core.keys.create_first(tx, realm)
                await self.core.audit.record(tx, "realm.created", realm_id=realm.id, name=name)
        except Conflict:
            raise AuthError(ErrorCode.INVALID_REQUEST, f"Realm {name!r} already exists.") from None
        return realm

    async def ensure_default(self) -> Realm:
        realm = await self.by_name(DEFAULT_REALM)
        if realm is not None:
            return realm
        try:
            return await self.create(DEFAULT_REALM, display_name="Default")
        except AuthError:  # another node created it first
            realm = await self.by_name(DEFAULT_REALM)
            assert realm is not None
            return realm

    async def by_name(self, name: str) -> Realm | None:
        async with self.core.store.transaction() as tx:
            return await tx.realms.by_name(name)

    async def require(self, name: str) -> Realm:
        """The realm of this name (cached briefly), or REALM_NOT_FOUND. A name no realm can
        have (from a URL: any text) is not looked up."""
        realm = self._cache.get("name:" + name)
        if realm is None:
            if not REALM_NAME.fullmatch(name):
                raise AuthError(ErrorCode.REALM_NOT_FOUND)
            realm = await self.by_name(name)
            if realm is None:
                raise AuthError(ErrorCode.REALM_NOT_FOUND)
            self._cache.put("name:" + name, realm)
        return realm

    async def require_project(self, project_id: str) -> Realm:
        """The realm a Descope-style project id names (cached briefly), or REALM_NOT_FOUND."""
        realm = self._cache.get("project:" + project_id)
        if realm is None:
            if not PROJECT_ID.fullmatch(project_id):
                raise AuthError(ErrorCode.REALM_NOT_FOUND)
            realm = await self.by_project_id(project_id)
            if realm is None:
                raise AuthError(ErrorCode.REALM_NOT_FOUND)
            self._cache.put("project:" + project_id, realm)
        return realm

    async def by_project_id(self, project_id: str) -> Realm | None:
        async with self.core.store.transaction() as tx:
            return await tx.realms.by_project_id(project_id)

    async def get(self, realm_id: str) -> Realm | None:
        async with self.core.store.transaction() as tx:
            return await tx.realms.get(realm_id)

    async def list(self) -> list[Realm]:
        async with self.core.store.transaction() as tx:
            return await tx.realms.list()

    async def update_settings(self, realm: Realm, changes: dict[str, Any]) -> Realm:
        async with self.core.store.transaction(write=True) as tx:
            # Merged into the settings as stored now, not as a cached copy has them: two
            # changes made at once both stay.
            current = await tx.realms.lock(realm.id)
            if current is None:
                raise AuthError(ErrorCode.REALM_NOT_FOUND)
            merged = {**current.settings, **changes}
            check_settings(merged, changed=changes)
            await tx.realms.update_settings(realm.id, merged)
            await self.core.audit.record(tx, "realm.settings_changed", realm_id=realm.id,
                                         changes=sorted(changes))
        realm.settings = merged
        self._cache.clear()
        return realm
