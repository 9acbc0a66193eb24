"""Organisation sign-in policies: who may sign in to an organisation account, and with what.

An organisation's policy lives in its ``settings`` under these names (surfaces translate their
own flags to them; the classroom dialect's ``mfaForStudents``/``mfaForTeachers`` become roles):

- ``mfa_required_roles``: roles whose holders must pass a second factor (an e-mailed PIN) to
  sign in to this organisation.
- ``max_failed_sign_in_attempts``: after this many consecutive failures (wrong password for the
  identity, wrong PIN for this account) the membership is locked in THIS organisation only.
- ``lockout_seconds``: how long such a lock lasts; absent or null, until an administrator
  unlocks it (``organisations.unlock``).

The organisation's own flags refuse every account in it: ``is_suspended`` and ``is_active``
(false). A membership refuses when it is inactive or locked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from authgate.core import audit as events
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Membership, Organisation
from authgate.core.organisations import Account
from authgate.core.ports import Tx

if TYPE_CHECKING:
    from authgate.core.engine import Core

MFA_REQUIRED_ROLES = "mfa_required_roles"
MAX_FAILED_SIGN_IN_ATTEMPTS = "max_failed_sign_in_attempts"
LOCKOUT_SECONDS = "lockout_seconds"

# A lock with no configured duration lasts until an administrator lifts it.
LOCKED_UNTIL_UNLOCKED = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class OrgPolicy:
    mfa_required_roles: frozenset[str] = frozenset()
    max_failed_sign_in_attempts: int | None = None
    lockout_seconds: int | None = None

    @classmethod
    def of(cls, org: Organisation) -> OrgPolicy:
        """Read the policy from the organisation's settings; malformed values count as unset."""
        settings = org.settings or {}
        roles = settings.get(MFA_REQUIRED_ROLES) or []
        if not isinstance(roles, list):
            roles = []
        return cls(
            mfa_required_roles=frozenset(r for r in roles if isinstance(r, str)),
            max_failed_sign_in_attempts=_positive_int(settings.get(MAX_FAILED_SIGN_IN_ATTEMPTS),
                                                      MAX_ATTEMPTS_LIMIT),
            lockout_seconds=_positive_int(settings.get(LOCKOUT_SECONDS), LOCKOUT_LIMIT),
        )

    def requires_mfa(self, role: str | None) -> bool:
        return role is not None and role in self.mfa_required_roles


# Beyond these, a setting is malformed (it would overflow a date or a stored integer).
MAX_ATTEMPTS_LIMIT = 1_000_000
LOCKOUT_LIMIT = 10 * 366 * 86_400  # ten years; none at all locks until an administrator unlocks


def _positive_int(value: Any, limit: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        return None
    return value


def policy_settings(*, mfa_required_roles: list[str] | None = None,
                    max_failed_sign_in_attempts: int | None = None,
                    lockout_seconds: int | None = None) -> dict[str, Any]:
    """The organisation settings that express a policy (for ``organisations.create``/``update``)."""
    for name, value, limit in (
            ("max_failed_sign_in_attempts", max_failed_sign_in_attempts, MAX_ATTEMPTS_LIMIT),
            ("lockout_seconds", lockout_seconds, LOCKOUT_LIMIT)):
        if value is not None and _positive_int(value, limit) is None:
            raise AuthError(ErrorCode.INVALID_REQUEST,
                            f"{name} must be a positive integer, at most {limit}.",
                            details={"field": name})
    return {MFA_REQUIRED_ROLES: sorted(set(mfa_required_roles or [])),
            MAX_FAILED_SIGN_IN_ATTEMPTS: max_failed_sign_in_attempts,
            LOCKOUT_SECONDS: lockout_seconds}


def is_locked(membership: Membership, now: datetime) -> bool:
    return membership.locked_until is not None and membership.locked_until > now


class OrgPolicies:
    def __init__(self, core: Core) -> None:
        self.core = core

    def policy(self, org: Organisation) -> OrgPolicy:
        return OrgPolicy.of(org)

    def refusal(self, account: Account) -> ErrorCode | None:
        """Why this account may not sign in now, or None when it may."""
        org, membership = account.organisation, account.membership
        if org.is_suspended:
            return ErrorCode.ORGANISATION_SUSPENDED
        if not org.is_active:
            return ErrorCode.ORGANISATION_INACTIVE
        if membership.status != "active":
            return ErrorCode.MEMBERSHIP_INACTIVE
        if is_locked(membership, self.core.now()):
            return ErrorCode.ACCOUNT_LOCKED
        return None

    def check(self, account: Account) -> None:
        """Raise the refusal as an AuthError, if there is one."""
        refusal = self.refusal(account)
        if refusal is not None:
            raise AuthError(refusal)

    def requires_mfa(self, account: Account, role: str | None) -> bool:
        return self.policy(account.organisation).requires_mfa(role)

    async def record_failure(self, tx: Tx, account: Account,
                             client: ClientInfo | None = None) -> Membership:
        """Count one failed sign-in to this account; lock it when the organisation says so."""
        now = self.core.now()
        membership = await tx.memberships.get(account.membership.id) or account.membership
        if membership.locked_until is not None and membership.locked_until <= now:
            # A lock that has run out: start counting afresh.
            membership.failed_attempts, membership.locked_until = 0, None
            membership.updated_at = now
            await tx.memberships.update(membership)
        account.membership = membership
        policy = self.policy(account.organisation)
        until = (now + timedelta(seconds=policy.lockout_seconds) if policy.lockout_seconds
                 else LOCKED_UNTIL_UNLOCKED)
        was_locked = is_locked(membership, now)
        updated = await tx.memberships.record_failure(
            membership.id, policy.max_failed_sign_in_attempts, until)
        if updated is None:
            return membership
        if not was_locked and is_locked(updated, now):
            await self.core.audit.record(tx, events.ACCOUNT_LOCKED, realm_id=updated.realm_id,
                                         user_id=updated.user_id, client=client,
                                         organisation_id=updated.organisation_id,
                                         failed_attempts=updated.failed_attempts)
        account.membership = updated
        return updated

    async def record_success(self, tx: Tx, account: Account) -> None:
        """Forget the failures of an account that is not locked (a lock stays until lifted)."""
        membership = await tx.memberships.get(account.membership.id) or account.membership
        now = self.core.now()
        if is_locked(membership, now):
            return
        if membership.failed_attempts or membership.locked_until is not None:
            membership.failed_attempts, membership.locked_until = 0, None
            membership.updated_at = now
            await tx.memberships.update(membership)
        account.membership = membership
