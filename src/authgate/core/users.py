"""Users and their password credentials: sign-up, creation, import, password changes, status."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from authgate.core import audit as events
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import (
    ClientInfo,
    Credential,
    Realm,
    User,
    has_nul,
    normalise_login_id,
)
from authgate.core.password_policy import PasswordPolicy
from authgate.core.ports import Conflict
from authgate.crypto.passwords import is_supported_hash
from authgate.crypto.tokens import new_id

if TYPE_CHECKING:
    from authgate.core.engine import Core

EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
PHONE = re.compile(r"^\+?[0-9][0-9 ().-]{5,30}$")
USERNAME = re.compile(r"^[^\s@]{1,200}$")
PROFILE_FIELDS = ("name", "given_name", "middle_name", "family_name", "picture")
TEXT_FIELDS = ("email", "username", "phone", "password", "password_hash", *PROFILE_FIELDS,
               "external_id", "status")
FLAG_FIELDS = ("email_verified", "phone_verified", "is_anonymous")
MAX_ATTRIBUTES_BYTES = 16 * 1024


@dataclass(slots=True)
class NewUser:
    email: str | None = None
    username: str | None = None
    phone: str | None = None
    password: str | None = None
    password_hash: str | None = None
    name: str | None = None
    given_name: str | None = None
    middle_name: str | None = None
    family_name: str | None = None
    picture: str | None = None
    custom_attributes: dict[str, Any] = field(default_factory=dict)
    roles: list[str] = field(default_factory=list)
    email_verified: bool = False
    phone_verified: bool = False
    is_anonymous: bool = False
    external_id: str | None = None
    status: str = "active"


@dataclass(slots=True)
class ImportReport:
    created: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)


def _check_types(new: NewUser) -> None:
    """Fields of the types they are declared with: records from a file or a client may hold
    anything. Text holds no NUL (no store keeps one)."""
    for name in TEXT_FIELDS:
        value = getattr(new, name)
        if value is not None and (not isinstance(value, str) or "\x00" in value):
            raise AuthError(ErrorCode.INVALID_REQUEST, f"The field {name} must be text.",
                            details={"field": name})
    for name in FLAG_FIELDS:
        if not isinstance(getattr(new, name), bool):
            raise AuthError(ErrorCode.INVALID_REQUEST, f"The field {name} must be true or "
                            "false.", details={"field": name})
    if not isinstance(new.roles, list) or not all(
            isinstance(role, str) and 0 < len(role) <= 100 and "\x00" not in role
            for role in new.roles):
        raise AuthError(ErrorCode.INVALID_REQUEST, "Roles must be a list of names.",
                        details={"field": "roles"})


def _validate(new: NewUser) -> None:
    _check_types(new)
    if new.email is not None:
        new.email = new.email.strip()
        if len(new.email) > 320 or not EMAIL.match(new.email):
            raise AuthError(ErrorCode.INVALID_REQUEST, "The e-mail address is not valid.",
                            details={"field": "email"})
    if new.phone is not None:
        new.phone = new.phone.strip()
        if not PHONE.match(new.phone):
            raise AuthError(ErrorCode.INVALID_REQUEST, "The phone number is not valid.",
                            details={"field": "phone"})
    if new.username is not None:
        new.username = new.username.strip()
        if not USERNAME.match(new.username):
            raise AuthError(ErrorCode.INVALID_REQUEST, "The username is not valid.",
                            details={"field": "username"})
    if not (new.email or new.username or new.phone or new.is_anonymous or new.external_id):
        raise AuthError(ErrorCode.INVALID_REQUEST, "A login id (e-mail, username or phone) "
                        "is required.", details={"field": "loginId"})
    for name in PROFILE_FIELDS:
        value = getattr(new, name)
        if value is not None and len(value) > (2048 if name == "picture" else 200):
            raise AuthError(ErrorCode.INVALID_REQUEST, f"The field {name} is too long.",
                            details={"field": name})
    if not isinstance(new.custom_attributes, dict) or len(repr(new.custom_attributes)) > \
            MAX_ATTRIBUTES_BYTES or has_nul(new.custom_attributes):
        raise AuthError(ErrorCode.INVALID_REQUEST, "Custom attributes must be a small object.",
                        details={"field": "customAttributes"})
    if new.status not in ("active", "disabled"):
        raise AuthError(ErrorCode.INVALID_REQUEST, "Unknown user status.",
                        details={"field": "status"})


class Users:
    def __init__(self, core: Core) -> None:
        self.core = core
        s = core.settings
        self.policy = PasswordPolicy(min_length=s.password_min_length,
                                     max_length=s.password_max_length,
                                     reject_common=s.password_reject_common)

    async def sign_up(self, realm: Realm, new: NewUser,
                      client: ClientInfo | None = None, *,
                      hooks: list[Any] | None = None) -> User:
        """Self-service sign-up: the realm must allow it, and a password is required.
        ``hooks`` commit with the user (e.g. ``core.verification.sign_up_hook``)."""
        if not realm.setting("allow_signup"):
            raise AuthError(ErrorCode.FORBIDDEN, "Sign-up is closed in this realm.")
        if not new.password:
            raise AuthError(ErrorCode.INVALID_REQUEST, "A password is required.",
                            details={"field": "password"})
        return await self.create(realm, new, client=client, event=events.SIGN_UP, hooks=hooks)

    async def create(self, realm: Realm, new: NewUser, *, client: ClientInfo | None = None,
                     event: str = "user.created", hooks: list[Any] | None = None) -> User:
        """Create a user and, if given, its password (checked against the policy) or an
        imported hash. ``hooks`` are awaited with the transaction and the user before commit,
        so that related rows (a membership, an outbox mail) commit together with the user."""
        _validate(new)
        secret = await self._password_secret(new)
        now = self.core.now()
        user = User(
            id=new_id(), realm_id=realm.id, email=new.email, username=new.username,
            phone=new.phone, email_verified=new.email_verified,
            phone_verified=new.phone_verified, name=new.name, given_name=new.given_name,
            middle_name=new.middle_name, family_name=new.family_name, picture=new.picture,
            custom_attributes=dict(new.custom_attributes), roles=list(new.roles),
            status=new.status, is_anonymous=new.is_anonymous, external_id=new.external_id,
            created_at=now, updated_at=now,
        )
        try:
            async with self.core.store.transaction(write=True) as tx:
                await tx.users.add(user)
                if secret is not None:
                    await tx.credentials.add(Credential(
                        id=new_id(), user_id=user.id, kind="password", secret=secret,
                        created_at=now, updated_at=now))
                await self.core.audit.record(tx, event, realm_id=realm.id, user_id=user.id,
                                             client=client)
                for hook in hooks or ():
                    await hook(tx, user)
        except Conflict:
            raise AuthError(ErrorCode.USER_ALREADY_EXISTS) from None
        return user

    async def _password_secret(self, new: NewUser) -> str | None:
        if new.password_hash is not None:
            if not is_supported_hash(new.password_hash):
                raise AuthError(ErrorCode.INVALID_REQUEST, "Unsupported password hash scheme.",
                                details={"field": "password_hash"})
            return new.password_hash
        if new.password is None:
            return None
        self.policy.check(new.password, related=(new.email, new.username, new.phone))
        return await self.core.hasher.hash(new.password)

    async def import_records(self, realm: Realm, records: list[dict[str, Any]]) -> ImportReport:
        """Import users from dicts (JSON lines): login ids, profile, and a password hash."""
        report = ImportReport()
        allowed = set(NewUser.__dataclass_fields__) - {"password"}
        for number, record in enumerate(records, start=1):
            unknown = set(record) - allowed
            if unknown:
                report.failed.append((number, f"unknown fields {sorted(unknown)}"))
                continue
            try:
                await self.create(realm, NewUser(**record), event="user.imported")
            except AuthError as exc:
                report.failed.append((number, exc.message))
            else:
                report.created += 1
        return report

    async def get(self, realm: Realm, user_id: str) -> User:
        async with self.core.store.transaction() as tx:
            user = await tx.users.get(user_id)
        if user is None or user.realm_id != realm.id:
            raise AuthError(ErrorCode.USER_NOT_FOUND)
        return user

    async def find(self, realm: Realm, login_id: str) -> User | None:
        async with self.core.store.transaction() as tx:
            return await tx.users.by_login_id(realm.id, login_id)

    async def list(self, realm: Realm, *, limit: int = 100, offset: int = 0) -> list[User]:
        async with self.core.store.transaction() as tx:
            return await tx.users.list(realm.id, limit=limit, offset=offset)

    async def update_profile(self, realm: Realm, user_id: str, changes: dict[str, Any]) -> User:
        user = await self.get(realm, user_id)
        allowed = {*PROFILE_FIELDS, "custom_attributes", "email", "phone", "username"}
        unknown = set(changes) - allowed
        if unknown:
            raise AuthError(ErrorCode.INVALID_REQUEST, f"Unknown fields {sorted(unknown)}.")
        check = NewUser(**{k: getattr(user, k) for k in allowed}, is_anonymous=user.is_anonymous,
                        external_id=user.external_id)
        for key, value in changes.items():
            setattr(check, key, value)
        _validate(check)
        for key in changes:
            setattr(user, key, getattr(check, key))
            if key == "email":
                user.email_verified = False
            if key == "phone":
                user.phone_verified = False
        user.updated_at = self.core.now()
        try:
            async with self.core.store.transaction(write=True) as tx:
                await tx.users.update(user)
                await self.core.audit.record(tx, "user.updated", realm_id=realm.id,
                                             user_id=user.id, fields=sorted(changes))
        except Conflict:
            raise AuthError(ErrorCode.USER_ALREADY_EXISTS) from None
        return user

    async def set_status(self, realm: Realm, user_id: str, status: str, *,
                         actor: str | None = None) -> User:
        if status not in ("active", "disabled"):
            raise AuthError(ErrorCode.INVALID_REQUEST, "Unknown user status.")
        user = await self.get(realm, user_id)
        user.status = status
        user.updated_at = now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            # The status alone, with a new stamp: before the revocation, so that no sign-in
            # in flight opens a session after it.
            user.security_stamp = await tx.users.set_status(user.id, status, now)
            if status == "disabled":
                await tx.sessions.revoke_for_user(user.id, now, "user_disabled")
                await self.core.devices.revoke_reauth_tokens_in(tx, realm, user.id, now)
            await self.core.audit.record(tx, events.ADMIN_ACTION, realm_id=realm.id,
                                         user_id=user.id, action=f"user.{status}",
                                         **({"actor": actor} if actor else {}))
        return user

    async def set_password(self, realm: Realm, user_id: str, password: str, *,
                           keep_session_id: str | None = None,
                           client: ClientInfo | None = None) -> str:
        """Replace the password and end every other session of the user. Returns the user's
        new security stamp: a sign-in that read the user before opens no session after this,
        so a caller that signs the user in again gives the session this stamp."""
        user = await self.get(realm, user_id)
        self.policy.check(password, related=(user.email, user.username, user.phone))
        secret = await self.core.hasher.hash(password)
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            stamp = await tx.users.new_stamp(user.id)  # first: see SessionRepo.open
            await tx.credentials.delete_for_user(user.id, "password")
            await tx.credentials.add(Credential(id=new_id(), user_id=user.id, kind="password",
                                                secret=secret, created_at=now, updated_at=now))
            await tx.sessions.revoke_for_user(user.id, now, "password_changed",
                                              except_session_id=keep_session_id)
            await self.core.devices.revoke_reauth_tokens_in(tx, realm, user.id, now)
            await self.core.audit.record(tx, events.PASSWORD_CHANGED, realm_id=realm.id,
                                         user_id=user.id, client=client)
        return stamp

    async def change_password(self, realm: Realm, user_id: str, old: str, new: str, *,
                              keep_session_id: str | None = None,
                              client: ClientInfo | None = None) -> None:
        """Change the password after proving the old one."""
        user = await self.get(realm, user_id)
        if old == new:
            raise AuthError(ErrorCode.WEAK_PASSWORD, "The new password must be different from "
                            "the current one.", details={"reason": "same_password"})
        throttle = self.core.throttle
        key = throttle.scoped_key("reauth", user.id, self.core.settings.throttle_free_attempts)
        async with throttle.attempting([key]) as attempt:
            right = await self.core.signin.check_password(user, old)
            await attempt.ended(right)
        if not right:
            raise AuthError(ErrorCode.WRONG_PASSWORD, "The current password is wrong.")
        await self.set_password(realm, user_id, new, keep_session_id=keep_session_id,
                                client=client)

    async def credential_kinds(self, user_id: str) -> set[str]:
        """Which kinds of confirmed credential (password, totp) a user has."""
        found = set()
        async with self.core.store.transaction() as tx:
            for kind in ("password", "totp"):
                if any(c.confirmed for c in await tx.credentials.for_user(user_id, kind)):
                    found.add(kind)
        return found

    async def update_password(self, realm: Realm, user_id: str, login_id: str, new: str, *,
                              keep_session_id: str | None = None,
                              client: ClientInfo | None = None) -> None:
        """Set a new password for the holder of a live session, who names one of their own
        login ids (a session of one user cannot change another user's password)."""
        user = await self.get(realm, user_id)
        wanted = normalise_login_id(login_id)
        if wanted not in {normalise_login_id(value) for value in user.login_ids}:
            raise AuthError(ErrorCode.FORBIDDEN, "The login id is not the session user's.")
        await self.set_password(realm, user_id, new, keep_session_id=keep_session_id,
                                client=client)
