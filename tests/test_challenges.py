"""Login challenges in the core: handles and PINs at rest, single use, bounds, bindings."""

from __future__ import annotations

import asyncio

import pytest

from authgate.core.challenges import AccountChoice
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo
from authgate.crypto.tokens import digest
from tests.classroom_support import Identity, classroom_identity, clocked_core, delivered_pin
from tests.conftest import PASSWORD, unique_email

HERE = ClientInfo(ip="192.0.2.10", user_agent="classroom-tests/1")
NO_LOCKOUT = {"mfaForTeachers": True}


def handle(choice: AccountChoice, org_id: str, role: str) -> str:
    for option in choice.options:
        if option.account.organisation.id == org_id and option.role == role:
            assert option.login_token is not None
            return option.login_token
    raise AssertionError(f"no option for {role} in {org_id}")


async def pin_handle(core, mailbox, who: Identity, *, mails_before: int = 0) -> tuple[str, str]:
    choice = await core.challenges.begin(who.realm, who.email, PASSWORD, HERE)
    step = await core.challenges.choose(who.realm, handle(choice, who.university.id, "Teacher"),
                                        HERE)
    assert step.mfa_required and step.pin_token
    return step.pin_token, await delivered_pin(core, mailbox, who.email, after=mails_before)


def wrong(pin: str) -> str:
    return f"{(int(pin) + 1) % 1_000_000:06d}"


async def refused(code: ErrorCode, call) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await call
    assert caught.value.code is code, caught.value
    return caught.value


async def test_handles_and_pins_are_kept_only_as_digests(core, realm, smtp_server):
    who = await classroom_identity(core, unique_email(), realm=realm)
    token, pin = await pin_handle(core, smtp_server[0], who)
    async with core.store.transaction() as tx:
        stored = await tx.challenges.by_hash(digest(token))
    assert stored is not None and stored.kind == "email_pin"
    assert stored.token_hash != token and token not in str(stored.data)
    assert stored.pin_hash is not None and pin not in stored.pin_hash
    assert stored.pin_hash != digest(pin)  # keyed, so a stolen table cannot be brute-forced
    assert (stored.expires_at - stored.created_at).total_seconds() == 15 * 60
    assert stored.user_id == who.user.id and stored.client_ip == HERE.ip
    assert stored.membership_id == (await core.organisations.membership(
        who.university, who.user.id)).id


async def test_a_handle_works_once_even_when_presented_twice_at_the_same_time(core, realm):
    who = await classroom_identity(core, unique_email(), realm=realm)
    choice = await core.challenges.begin(realm, who.email, PASSWORD, HERE)
    token = handle(choice, who.university.id, "Student")
    results = await asyncio.gather(core.challenges.choose(realm, token, HERE),
                                   core.challenges.choose(realm, token, HERE),
                                   return_exceptions=True)
    signed = [r for r in results if not isinstance(r, Exception)]
    failed = [r for r in results if isinstance(r, AuthError)]
    assert len(signed) == 1 and signed[0].tokens is not None
    assert len(failed) == 1 and failed[0].code is ErrorCode.CHALLENGE_INVALID


async def test_pin_attempts_are_bounded(core, realm, smtp_server):
    who = await classroom_identity(core, unique_email(), realm=realm,
                                   university_settings=NO_LOCKOUT)
    token, pin = await pin_handle(core, smtp_server[0], who)
    for _ in range(5):
        await refused(ErrorCode.INVALID_MFA_CODE,
                      core.challenges.verify_pin(realm, token, wrong(pin), HERE))
    await refused(ErrorCode.CHALLENGE_INVALID, core.challenges.verify_pin(realm, token, pin, HERE))


async def test_pin_resends_are_bounded(core, realm, smtp_server):
    who = await classroom_identity(core, unique_email(), realm=realm)
    token, _ = await pin_handle(core, smtp_server[0], who)
    for _ in range(3):
        await core.challenges.resend_pin(realm, token, HERE)
    error = await refused(ErrorCode.TOO_MANY_ATTEMPTS,
                          core.challenges.resend_pin(realm, token, HERE))
    assert "sign in again" in error.message


async def test_wrong_pins_lock_the_account_in_that_organisation_only(core, realm, smtp_server):
    who = await classroom_identity(core, unique_email(), realm=realm,
                                   company_settings={"maxFailedSignInAttempts": 3})
    token, pin = await pin_handle(core, smtp_server[0], who)
    for _ in range(3):
        await refused(ErrorCode.INVALID_MFA_CODE,
                      core.challenges.verify_pin(realm, token, wrong(pin), HERE))
    await refused(ErrorCode.ACCOUNT_LOCKED, core.challenges.verify_pin(realm, token, pin, HERE))
    university = await core.organisations.membership(who.university, who.user.id)
    company = await core.organisations.membership(who.company, who.user.id)
    assert university.locked_until is not None and university.failed_attempts == 3
    assert company.locked_until is None and company.failed_attempts == 0
    events = await core.audit.recent(realm.id, user_id=who.user.id)
    assert [e.organisation_id for e in events if e.type == "membership.locked"] == [
        who.university.id]


async def test_a_handle_is_bound_to_its_client_and_its_realm(core, realm):
    who = await classroom_identity(core, unique_email(), realm=realm)
    choice = await core.challenges.begin(realm, who.email, PASSWORD, HERE)
    token = handle(choice, who.company.id, "Account Admin")
    other_realm = await core.realms.create(f"t-other-{who.user.id[:8]}")
    await refused(ErrorCode.CHALLENGE_INVALID, core.challenges.choose(
        realm, token, ClientInfo(ip="198.51.100.7", user_agent=HERE.user_agent)))
    await refused(ErrorCode.CHALLENGE_INVALID, core.challenges.choose(
        realm, token, ClientInfo(ip=HERE.ip, user_agent="another-browser")))
    await refused(ErrorCode.CHALLENGE_INVALID, core.challenges.choose(other_realm, token, HERE))
    await refused(ErrorCode.CHALLENGE_INVALID, core.challenges.verify_pin(
        realm, token, "000000", HERE))  # a choose-account handle is not a PIN handle
    assert (await core.challenges.choose(realm, token, HERE)).tokens is not None


async def test_a_role_taken_away_meanwhile_voids_its_handle(core, realm):
    who = await classroom_identity(core, unique_email(), realm=realm)
    choice = await core.challenges.begin(realm, who.email, PASSWORD, HERE)
    teacher = handle(choice, who.university.id, "Teacher")
    await core.organisations.add_member(realm, who.university, who.user.id, roles=["Student"])
    await refused(ErrorCode.CHALLENGE_INVALID, core.challenges.choose(realm, teacher, HERE))


async def test_an_account_choice_expires(settings, core, realm):
    async with clocked_core(settings, core) as (clocked, clock):
        who = await classroom_identity(clocked, unique_email(), realm=realm)
        choice = await clocked.challenges.begin(realm, who.email, PASSWORD, HERE)
        clock.advance(minutes=10, seconds=1)
        await refused(ErrorCode.CHALLENGE_EXPIRED, clocked.challenges.choose(
            realm, handle(choice, who.company.id, "Account Admin"), HERE))


async def test_a_lock_with_a_duration_lifts_itself(settings, core, realm):
    async with clocked_core(settings, core) as (clocked, clock):
        who = await classroom_identity(clocked, unique_email(), realm=realm)
        await clocked.organisations.update(realm, who.university.id, {"settings": {
            "max_failed_sign_in_attempts": 2, "lockout_seconds": 600}})
        for _ in range(2):
            await refused(ErrorCode.INVALID_CREDENTIALS,
                          clocked.challenges.begin(realm, who.email, "wrong password", HERE))
        choice = await clocked.challenges.begin(realm, who.email, PASSWORD, HERE)
        locked = {o.role: o for o in choice.options
                  if o.account.organisation.id == who.university.id}
        assert all(o.refusal is ErrorCode.ACCOUNT_LOCKED for o in locked.values())
        assert choice.locked

        clock.advance(seconds=601)
        choice = await clocked.challenges.begin(realm, who.email, PASSWORD, HERE)
        assert not choice.locked
        assert all(o.login_token for o in choice.options)
        membership = await clocked.organisations.membership(who.university, who.user.id)
        assert membership.failed_attempts == 0 and membership.locked_until is None


async def test_a_correct_password_forgets_earlier_failures(core, realm):
    who = await classroom_identity(core, unique_email(), realm=realm)
    for _ in range(2):
        await refused(ErrorCode.INVALID_CREDENTIALS,
                      core.challenges.begin(realm, who.email, "wrong password", HERE))
    await core.challenges.begin(realm, who.email, PASSWORD, HERE)
    await refused(ErrorCode.INVALID_CREDENTIALS,
                  core.challenges.begin(realm, who.email, "wrong password", HERE))
    membership = await core.organisations.membership(who.university, who.user.id)
    assert membership.failed_attempts == 1 and membership.locked_until is None

