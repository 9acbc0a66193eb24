"""Organisations (tenants) inside a realm, and the memberships that give users roles in them.

An organisation may hold a secret for tokens its own backend signs (HS256). The secret is shown
once when created or rotated, and kept encrypted under the master secret, bound to the
organisation's id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authgate.core import audit as events
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Membership, Organisation, Realm
from authgate.core.ports import Conflict, Tx
from authgate.crypto.secretbox import DecryptionError
from authgate.crypto.tokens import new_id, new_token

if TYPE_CHECKING:
    from authgate.core.engine import Core

ORG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ROLE = re.compile(r"^[^\x00-\x1f]{1,100}$")
_SECRET = "org-secret"
MEMBERSHIP_STATUSES = ("active", "inactive")


@dataclass(slots=True)
class Account:
    """One membership with its organisation: what a user can sign in to."""

    membership: Membership
    organisation: Organisation


def _check_roles(roles: list[str]) -> list[str]:
    if not isinstance(roles, list) or not all(isinstance(r, str) and ROLE.match(r)
                                              for r in roles):
        raise AuthError(ErrorCode.INVALID_REQUEST, "Roles must be a list of short strings.",
                        details={"field": "roles"})
    return list(dict.fromkeys(roles))


class Organisations:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def create(self, realm: Realm, name: str, *, display_name: str | None = None,
                     account_name: str | None = None, settings: dict[str, Any] | None = None,
                     is_active: bool = True, is_suspended: bool = False,
                     is_paid: bool = False, org_id: str | None = None) -> Organisation:
        if not ORG_NAME.match(name):
            raise AuthError(ErrorCode.INVALID_REQUEST, "An organisation name is 1-100 letters, "
                            "digits, '.', '-' or '_'.", details={"field": "name"})
        now = self.core.now()
        org = Organisation(id=org_id or new_id(), realm_id=realm.id, name=name,
                           display_name=display_name or name, account_name=account_name,
                           is_active=is_active, is_suspended=is_suspended, is_paid=is_paid,
                           settings=dict(settings or {}), created_at=now, updated_at=now)
        try:
            async with self.core.store.transaction(write=True) as tx:
                await tx.organisations.add(org)
                await self.core.audit.record(tx, events.ADMIN_ACTION, realm_id=realm.id,
                                             organisation_id=org.id,
                                             action="organisation.created")
        except Conflict:
            raise AuthError(ErrorCode.INVALID_REQUEST,
                            f"Organisation {name!r} already exists.") from None
        return org

    async def get(self, realm: Realm, org_id: str) -> Organisation:
        async with self.core.store.transaction() as tx:
            org = await tx.organisations.get(org_id)
        if org is None or org.realm_id != realm.id:
            raise AuthError(ErrorCode.ORGANISATION_NOT_FOUND)
        return org

    async def find(self, realm: Realm, id_or_name: str) -> Organisation:
        """By id, or else by name."""
        async with self.core.store.transaction() as tx:
            org = await tx.organisations.get(id_or_name)
            if org is None or org.realm_id != realm.id:
                org = await tx.organisations.by_name(realm.id, id_or_name)
        if org is None:
            raise AuthError(ErrorCode.ORGANISATION_NOT_FOUND)
        return org

    async def list(self, realm: Realm) -> list[Organisation]:
        async with self.core.store.transaction() as tx:
            return await tx.organisations.list(realm.id)

    async def update(self, realm: Realm, org_id: str, changes: dict[str, Any]) -> Organisation:
        allowed = {"display_name", "account_name", "is_active", "is_suspended", "is_paid",
                   "settings"}
        unknown = set(changes) - allowed
        if unknown:
            raise AuthError(ErrorCode.INVALID_REQUEST, f"Unknown fields {sorted(unknown)}.")
        org = await self.get(realm, org_id)
        for key, value in changes.items():
            if key == "settings":
                if not isinstance(value, dict):
                    raise AuthError(ErrorCode.INVALID_REQUEST, "settings must be an object.")
                value = {**org.settings, **value}
            setattr(org, key, value)
        org.updated_at = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            await tx.organisations.update(org)
            await self.core.audit.record(tx, events.ADMIN_ACTION, realm_id=realm.id,
                                         organisation_id=org.id, action="organisation.updated",
                                         fields=sorted(changes))
        return org

    # Memberships.

    async def add_member(self, realm: Realm, org: Organisation, user_id: str, *,
                         roles: list[str], status: str = "active",
                         tx: Tx | None = None) -> Membership:
        """Add a user to an organisation, or update the roles and status of their membership."""
        if status not in MEMBERSHIP_STATUSES:
            raise AuthError(ErrorCode.INVALID_REQUEST, "Unknown membership status.")
        roles = _check_roles(roles)
        if tx is None:
            async with self.core.store.transaction(write=True) as own:
                return await self._add_member(own, realm, org, user_id, roles, status)
        return await self._add_member(tx, realm, org, user_id, roles, status)

    async def _add_member(self, tx: Tx, realm: Realm, org: Organisation, user_id: str,
                          roles: list[str], status: str) -> Membership:
        now = self.core.now()
        existing = await tx.memberships.find(org.id, user_id)
        if existing is None:
            membership = Membership(id=new_id(), realm_id=realm.id, organisation_id=org.id,
                                    user_id=user_id, roles=roles, status=status,
                                    created_at=now, updated_at=now)
            if await tx.memberships.add_if_absent(membership):
                await self.core.audit.record(tx, "membership.created", realm_id=realm.id,
                                             user_id=user_id, organisation_id=org.id,
                                             roles=roles)
                return membership
            # Made by a request running at the same time: this one changes it.
            existing = await tx.memberships.find(org.id, user_id)
            assert existing is not None
        before = {"roles": existing.roles, "status": existing.status}
        existing.roles, existing.status, existing.updated_at = roles, status, now
        await tx.memberships.update(existing)
        if before != {"roles": roles, "status": status}:
            await self.core.audit.record(tx, "membership.updated", realm_id=realm.id,
                                         user_id=user_id, organisation_id=org.id,
                                         before=before, roles=roles, status=status)
        return existing

    async def membership(self, org: Organisation, user_id: str) -> Membership | None:
        async with self.core.store.transaction() as tx:
            return await tx.memberships.find(org.id, user_id)

    async def accounts(self, user_id: str) -> list[Account]:
        """Every membership of a user, with its organisation, oldest first."""
        async with self.core.store.transaction() as tx:
            memberships = await tx.memberships.for_user(user_id)
            found = []
            for membership in memberships:
                org = await tx.organisations.get(membership.organisation_id)
                if org is not None:
                    found.append(Account(membership, org))
        return found

    async def members(self, org: Organisation) -> list[Membership]:
        async with self.core.store.transaction() as tx:
            return await tx.memberships.for_organisation(org.id)

    async def unlock(self, realm: Realm, org: Organisation, user_id: str) -> Membership:
        """Clear a membership's failed attempts and lock (an administrator's action)."""
        async with self.core.store.transaction(write=True) as tx:
            membership = await tx.memberships.find(org.id, user_id)
            if membership is None:
                raise AuthError(ErrorCode.NOT_FOUND, "No such membership.")
            membership.failed_attempts, membership.locked_until = 0, None
            membership.updated_at = self.core.now()
            await tx.memberships.update(membership)
            await self.core.audit.record(tx, events.ADMIN_ACTION, realm_id=realm.id,
                                         user_id=user_id, organisation_id=org.id,
                                         action="membership.unlocked")
        return membership

    async def tenancy(self, realm: Realm, user_id: str) -> list[Account]:
        """The accounts a user can act in now: active memberships of this realm's active,
        unsuspended organisations, oldest first."""
        return [account for account in await self.accounts(user_id)
                if account.organisation.realm_id == realm.id
                and account.membership.status == "active"
                and account.organisation.is_active and not account.organisation.is_suspended]

    async def select_for_session(self, realm: Realm, session_id: str, user_id: str,
                                 org_id: str, client: ClientInfo | None = None) -> Account:
        """Make an organisation the session's selected one, after checking that the user is an
        active, unlocked member of it and that it is active. An organisation the user is not a
        member of answers as unknown."""
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            org = await tx.organisations.get(org_id)
            membership = await tx.memberships.find(org_id, user_id) if org else None
            if org is None or org.realm_id != realm.id or membership is None:
                raise AuthError(ErrorCode.ORGANISATION_NOT_FOUND)
            if membership.status != "active":
                raise AuthError(ErrorCode.MEMBERSHIP_INACTIVE)
            if membership.locked_until is not None and membership.locked_until > now:
                raise AuthError(ErrorCode.ACCOUNT_LOCKED)
            if not org.is_active:
                raise AuthError(ErrorCode.ORGANISATION_INACTIVE)
            if org.is_suspended:
                raise AuthError(ErrorCode.ORGANISATION_SUSPENDED)
            await tx.sessions.set_organisation(session_id, org.id)
            await self.core.audit.record(tx, events.ORGANISATION_SELECTED, realm_id=realm.id,
                                         user_id=user_id, session_id=session_id,
                                         organisation_id=org.id, client=client)
        return Account(membership, org)

    # The organisation's secret for customer-signed tokens.

    async def rotate_secret(self, realm: Realm, org: Organisation) -> str:
        """Create or replace the secret; returns it in clear, the only time it is shown."""
        secret = new_token(32)
        org.secret_enc = self.core.box.encrypt(_SECRET, secret.encode(), org.id)
        org.updated_at = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            await tx.organisations.update(org)
            await self.core.audit.record(tx, events.ADMIN_ACTION, realm_id=realm.id,
                                         organisation_id=org.id,
                                         action="organisation.secret_rotated")
        return secret

    def secret(self, org: Organisation) -> bytes | None:
        """The secret for verifying the organisation's own tokens, or None if it has none."""
        if org.secret_enc is None:
            return None
        try:
            return self.core.box.decrypt(_SECRET, org.secret_enc, org.id)
        except DecryptionError:
            return None
