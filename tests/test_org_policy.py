"""Organisation sign-in policies: reading them from settings, and which account refuses why."""

from __future__ import annotations

import pytest

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Membership, Organisation
from authgate.core.org_policy import OrgPolicy, policy_settings
from authgate.core.organisations import Account
from authgate.core.users import NewUser
from authgate.dialects.classroom import organisation_settings
from tests.classroom_support import org_name
from tests.conftest import PASSWORD, unique_email


def org(**settings) -> Organisation:
    return Organisation(id="o", realm_id="r", name="o", display_name="o", settings=settings)


def test_policy_is_read_from_settings_and_ignores_malformed_values():
    policy = OrgPolicy.of(org(mfa_required_roles=["Teacher", 7],
                              max_failed_sign_in_attempts=3, lockout_seconds=600))
    assert policy.mfa_required_roles == frozenset({"Teacher"})
    assert policy.max_failed_sign_in_attempts == 3 and policy.lockout_seconds == 600
    assert policy.requires_mfa("Teacher") and not policy.requires_mfa("Student")
    assert not policy.requires_mfa(None)
    odd = OrgPolicy.of(org(mfa_required_roles="Teacher", max_failed_sign_in_attempts=True,
                           lockout_seconds=-5))
    assert odd == OrgPolicy()
    # Values a date or a stored integer cannot hold (they made every wrong password a 500).
    huge = OrgPolicy.of(org(max_failed_sign_in_attempts=18446744073709551615,
                            lockout_seconds=100000000000000))
    assert huge == OrgPolicy()


def test_policy_settings_refuse_a_limit_that_is_not_a_positive_integer():
    for limits in ({"max_failed_sign_in_attempts": 0}, {"lockout_seconds": 10 ** 14}):
        with pytest.raises(AuthError) as caught:
            policy_settings(**limits)
        assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_classroom_mfa_flags_translate_to_roles():
    stored = organisation_settings({"mfaForStudents": True, "mfaForTeachers": False,
                                    "maxFailedSignInAttempts": 4, "enableLti": True})
    assert stored["mfa_required_roles"] == ["Student"]
    assert stored["max_failed_sign_in_attempts"] == 4 and stored["enableLti"] is True
    both = OrgPolicy.of(org(**organisation_settings({"mfaForStudents": True,
                                                      "mfaForTeachers": True})))
    assert both.mfa_required_roles == frozenset({"Student", "Teacher"})


def test_the_organisation_refuses_before_the_membership_does(core):
    now = core.now()
    membership = Membership(id="m", realm_id="r", organisation_id="o", user_id="u",
                            roles=["Student"], status="inactive", failed_attempts=9,
                            locked_until=now.replace(year=now.year + 1))
    organisation = org()
    policies = core.org_policy
    organisation.is_suspended, organisation.is_active = True, False
    assert policies.refusal(Account(membership, organisation)) is \
        ErrorCode.ORGANISATION_SUSPENDED
    organisation.is_suspended = False
    assert policies.refusal(Account(membership, organisation)) is \
        ErrorCode.ORGANISATION_INACTIVE
    organisation.is_active = True
    assert policies.refusal(Account(membership, organisation)) is ErrorCode.MEMBERSHIP_INACTIVE
    membership.status = "active"
    assert policies.refusal(Account(membership, organisation)) is ErrorCode.ACCOUNT_LOCKED
    membership.locked_until = now
    assert policies.refusal(Account(membership, organisation)) is None


async def test_without_a_limit_failures_are_counted_but_never_lock(core, realm):
    user = await core.users.create(realm, NewUser(email=unique_email(), password=PASSWORD))
    organisation = await core.organisations.create(realm, org_name())
    membership = await core.organisations.add_member(realm, organisation, user.id,
                                                     roles=["Student"])
    account = Account(membership, organisation)
    async with core.store.transaction(write=True) as tx:
        for _ in range(20):
            await core.org_policy.record_failure(tx, account)
    stored = await core.organisations.membership(organisation, user.id)
    assert stored.failed_attempts == 20 and stored.locked_until is None
