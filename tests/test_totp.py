"""TOTP in the core and on the native API: enrolment, confirmation, replay, recovery codes,
disabling, and the second step of the password grant."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, unquote, urlparse

import pyotp
import pytest

from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm, User
from authgate.core.users import NewUser
from tests.conftest import PASSWORD, realm_url, unique_email


@pytest.fixture
async def user(core: Core, realm: Realm) -> User:
    return await core.users.create(realm, NewUser(email=unique_email("totp"), password=PASSWORD))


def next_code(totp: pyotp.TOTP) -> str:
    """The code of the next time step (the current one may already be spent)."""
    return totp.at(time.time() + 30)


async def enrolled(core: Core, realm: Realm, user: User) -> tuple[pyotp.TOTP, list[str]]:
    enrolment = await core.totp.enrol(realm, user)
    totp = pyotp.TOTP(enrolment.secret)
    return totp, await core.totp.confirm(realm, user, totp.now())


async def test_enrolment_gives_an_otpauth_uri_and_keeps_the_secret_encrypted(core, realm, user):
    enrolment = await core.totp.enrol(realm, user)
    uri = urlparse(enrolment.uri)
    assert uri.scheme == "otpauth" and uri.netloc == "totp"
    assert parse_qs(uri.query)["secret"] == [enrolment.secret]
    assert user.email in unquote(uri.path)
    async with core.store.transaction() as tx:
        stored = await tx.credentials.for_user(user.id, "totp")
    assert len(stored) == 1 and not stored[0].confirmed
    assert enrolment.secret not in stored[0].secret
    assert (await core.totp.status(user)).pending
    assert not await core.totp.is_enabled(user)


async def test_confirmation_needs_a_valid_code_and_returns_recovery_codes(core, realm, user):
    enrolment = await core.totp.enrol(realm, user)
    with pytest.raises(AuthError) as wrong:
        await core.totp.confirm(realm, user, "12345x")
    assert wrong.value.code is ErrorCode.INVALID_MFA_CODE
    codes = await core.totp.confirm(realm, user, pyotp.TOTP(enrolment.secret).now())
    assert len(codes) == len(set(codes)) == 10
    status = await core.totp.status(user)
    assert status.enabled and not status.pending and status.recovery_codes_left == 10
    async with core.store.transaction() as tx:
        stored = {c.secret for c in await tx.credentials.for_user(user.id, "recovery_code")}
    assert not stored & set(codes)


async def test_a_used_code_cannot_be_replayed(core, realm, user):
    totp, _ = await enrolled(core, realm, user)
    code = next_code(totp)
    assert await core.totp.verify(realm, user, code) == "otp"
    with pytest.raises(AuthError) as replay:
        await core.totp.verify(realm, user, code)
    assert replay.value.code is ErrorCode.INVALID_MFA_CODE
    # The step used at confirmation is also spent.
    with pytest.raises(AuthError):
        await core.totp.verify(realm, user, totp.at(time.time() - 30))


async def test_recovery_code_works_once(core, realm, user):
    _, codes = await enrolled(core, realm, user)
    assert await core.totp.verify(realm, user, codes[0].upper()) == "recovery_code"
    with pytest.raises(AuthError):
        await core.totp.verify(realm, user, codes[0])
    assert (await core.totp.status(user)).recovery_codes_left == 9


async def test_wrong_codes_are_throttled(core, realm, user):
    totp, _ = await enrolled(core, realm, user)
    wrong = "000000" if next_code(totp) != "000000" else "111111"
    for _ in range(core.settings.throttle_free_attempts):
        with pytest.raises(AuthError):
            await core.totp.verify(realm, user, wrong)
    with pytest.raises(AuthError) as blocked:
        await core.totp.verify(realm, user, next_code(totp))
    assert blocked.value.code is ErrorCode.TOO_MANY_ATTEMPTS


async def test_a_wrong_code_cancelled_while_its_failure_is_written_is_counted(
        core, realm, user, monkeypatch):
    """A wrong code whose client goes away while the failure is being written is counted all
    the same, and its attempt ends: cancelling does not make a guess free or leave it pending."""
    import asyncio

    from authgate.core.totp import MFA_FAILED

    totp, _ = await enrolled(core, realm, user)
    wrong = "000000" if next_code(totp) != "000000" else "111111"
    writing = asyncio.Event()
    record = core.audit.record

    async def slow_record(tx, kind, **kwargs):
        await record(tx, kind, **kwargs)
        if kind == MFA_FAILED:
            writing.set()
            await asyncio.sleep(0.3)

    monkeypatch.setattr(core.audit, "record", slow_record)
    task = asyncio.create_task(core.totp.verify(realm, user, wrong))
    await asyncio.wait_for(writing.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    key = core.throttle.scoped_key("mfa", user.id, core.settings.throttle_free_attempts)
    async with core.store.transaction() as tx:
        counter = await tx.throttle.get(key.key)
    assert (counter.failures, counter.pending) == (1, 0)


async def test_second_factor_is_required_only_when_enabled(core, realm, user):
    assert await core.totp.second_factor(realm, user, None) == ["pwd"]
    totp, _ = await enrolled(core, realm, user)
    with pytest.raises(AuthError) as required:
        await core.totp.second_factor(realm, user, None)
    assert required.value.code is ErrorCode.MFA_REQUIRED
    assert await core.totp.second_factor(realm, user, next_code(totp)) == ["pwd", "otp", "mfa"]


async def test_disable_and_regenerate_need_a_code(core, realm, user):
    totp, codes = await enrolled(core, realm, user)
    new_codes = await core.totp.regenerate_recovery_codes(realm, user, next_code(totp))
    assert set(new_codes).isdisjoint(codes)
    with pytest.raises(AuthError):
        await core.totp.verify(realm, user, codes[1])
    with pytest.raises(AuthError):
        await core.totp.enrol(realm, user)
    await core.totp.disable(realm, user, new_codes[0])
    status = await core.totp.status(user)
    assert not status.enabled and status.recovery_codes_left == 0


async def test_native_password_grant_asks_for_the_totp_code(client, realm):
    email = unique_email("native")
    assert (await client.post(realm_url(realm, "/signup"),
                              json={"email": email, "password": PASSWORD})).status_code == 201
    grant = {"grant_type": "password", "username": email, "password": PASSWORD}
    token = (await client.post(realm_url(realm, "/oauth/token"), data=grant)).json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    enrolment = (await client.post(realm_url(realm, "/mfa/totp"), headers=headers)).json()
    totp = pyotp.TOTP(enrolment["secret"])
    confirmed = await client.post(realm_url(realm, "/mfa/totp/confirm"),
                                  json={"code": totp.now()}, headers=headers)
    assert confirmed.status_code == 200
    status = (await client.get(realm_url(realm, "/mfa"), headers=headers)).json()
    assert status == {"totp": {"enabled": True, "pending": False}, "recovery_codes_left": 10}

    required = await client.post(realm_url(realm, "/oauth/token"), data=grant)
    assert required.status_code == 401
    assert required.json()["error"] == "mfa_required"
    done = await client.post(realm_url(realm, "/oauth/token"),
                             data={**grant, "mfa_code": next_code(totp)})
    assert done.status_code == 200, done.text
    recovery = confirmed.json()["recovery_codes"][0]
    disabled = await client.post(realm_url(realm, "/mfa/totp/disable"), json={"code": recovery},
                                 headers={"Authorization": f"Bearer {done.json()['access_token']}"})
    assert disabled.status_code == 204
    assert (await client.post(realm_url(realm, "/oauth/token"), data=grant)).status_code == 200
