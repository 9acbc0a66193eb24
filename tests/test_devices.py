"""The device service of the core: device keys, re-authentication tokens, revocation."""

from __future__ import annotations

from datetime import timedelta

import pytest

from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm, User
from authgate.core.users import NewUser
from authgate.crypto.tokens import digest
from tests.conftest import PASSWORD, unique_email


@pytest.fixture
async def user(core: Core, realm: Realm) -> User:
    return await core.users.create(realm, NewUser(email=unique_email("device"),
                                                  password=PASSWORD))


async def test_first_sighting_issues_a_key_and_later_ones_remember_it(core, realm, user):
    first = await core.devices.sighting(realm, user, None, name="laptop")
    assert first.is_new
    assert first.device.device_key and first.device.device_group_key
    again = await core.devices.sighting(realm, user, first.device.device_key)
    assert not again.is_new
    assert again.device.id == first.device.id
    second = await core.devices.sighting(realm, user, "unknown-key")
    assert second.is_new
    assert second.device.device_group_key == first.device.device_group_key
    names = [d.name for d in await core.devices.list_for_user(realm, user.id)]
    assert names == ["laptop", None]


async def test_reauthentication_token_is_stored_only_as_a_digest(core, realm, user):
    device = await core.devices.named(realm, user, "phone")
    raw = await core.devices.issue_reauth_token(realm, device)
    async with core.store.transaction() as tx:
        assert await tx.reauth_tokens.by_hash(raw) is None
        stored = await tx.reauth_tokens.by_hash(digest(raw))
    assert stored is not None and stored.device_id == device.id
    ttl = stored.expires_at - stored.created_at
    assert ttl == timedelta(seconds=core.settings.reauth_token_ttl) == timedelta(days=30)


async def test_reauthentication_token_works_once_and_yields_its_successor(core, realm, user):
    device = await core.devices.named(realm, user, "phone")
    raw = await core.devices.issue_reauth_token(realm, device)
    used = await core.devices.reauthenticate(realm, raw)
    assert used.user.id == user.id and used.device.id == device.id
    assert used.token != raw
    with pytest.raises(AuthError) as refused:
        await core.devices.reauthenticate(realm, raw)
    assert refused.value.code is ErrorCode.INVALID_TOKEN
    assert (await core.devices.reauthenticate(realm, used.token)).user.id == user.id


async def test_reauthentication_token_is_refused_in_another_realm(core, realm, user):
    device = await core.devices.named(realm, user, "phone")
    raw = await core.devices.issue_reauth_token(realm, device)
    other = await core.realms.create(f"t-x{user.id[:12]}")
    with pytest.raises(AuthError):
        await core.devices.reauthenticate(other, raw)
    assert (await core.devices.reauthenticate(realm, raw)).user.id == user.id


async def test_revoking_a_device_ends_its_token_and_sessions(core, realm, user):
    device = await core.devices.named(realm, user, "tablet")
    raw = await core.devices.issue_reauth_token(realm, device)
    tokens = await core.sessions.start(realm, user, amr=["pwd"], device_id=device.id)
    elsewhere = await core.sessions.start(realm, user, amr=["pwd"])
    await core.devices.revoke(realm, device.id, user_id=user.id)
    with pytest.raises(AuthError):
        await core.devices.reauthenticate(realm, raw)
    with pytest.raises(AuthError) as ended:
        await core.sessions.authenticate(realm, tokens.access_token)
    assert ended.value.code is ErrorCode.SESSION_REVOKED
    assert (await core.sessions.authenticate(realm, elsewhere.access_token)).user_id == user.id
    assert await core.devices.list_for_user(realm, user.id) == []
    with pytest.raises(AuthError) as again:
        await core.devices.revoke(realm, device.id)
    assert again.value.code is ErrorCode.DEVICE_NOT_FOUND


async def test_a_user_cannot_revoke_someone_elses_device(core, realm, user):
    other = await core.users.create(realm, NewUser(email=unique_email("other"),
                                                   password=PASSWORD))
    device = await core.devices.named(realm, other, "theirs")
    with pytest.raises(AuthError) as refused:
        await core.devices.revoke(realm, device.id, user_id=user.id)
    assert refused.value.code is ErrorCode.DEVICE_NOT_FOUND


async def test_reauthentication_tokens_revoke_one_by_one_or_all_at_once(core, realm, user):
    phone = await core.devices.named(realm, user, "phone")
    tablet = await core.devices.named(realm, user, "tablet")
    watch = await core.devices.named(realm, user, "watch")
    tokens = {d.name: await core.devices.issue_reauth_token(realm, d)
              for d in (phone, tablet, watch)}
    assert await core.devices.revoke_reauth_token(realm, phone.id, user_id=user.id) == 1
    with pytest.raises(AuthError):
        await core.devices.reauthenticate(realm, tokens["phone"])
    assert await core.devices.revoke_all_reauth_tokens(realm, user.id) == 2
    for name in ("tablet", "watch"):
        with pytest.raises(AuthError):
            await core.devices.reauthenticate(realm, tokens[name])
    # The devices themselves are still remembered.
    assert len(await core.devices.list_for_user(realm, user.id)) == 3


async def test_disabled_user_cannot_reauthenticate(core, realm, user):
    device = await core.devices.named(realm, user, "phone")
    raw = await core.devices.issue_reauth_token(realm, device)
    await core.users.set_status(realm, user.id, "disabled")
    with pytest.raises(AuthError) as refused:
        await core.devices.reauthenticate(realm, raw)
    assert refused.value.code is ErrorCode.INVALID_TOKEN


async def test_remembered_device_keeps_its_owner_out_of_strangers_lockout(core, realm, user):
    from authgate.core.models import ClientInfo

    device = (await core.devices.sighting(realm, user, None)).device
    for _ in range(core.settings.throttle_free_attempts + 1):
        with pytest.raises(AuthError):
            await core.signin.password(realm, user.email, "wrong guess here", ClientInfo())
    with pytest.raises(AuthError) as locked:
        await core.signin.password(realm, user.email, PASSWORD, ClientInfo())
    assert locked.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    owner = ClientInfo(device_key=device.device_key)
    assert (await core.signin.password(realm, user.email, PASSWORD, owner)).user.id == user.id


async def test_reauthentication_token_expires_after_thirty_days(core, realm, user):
    from authgate.config import load_master_secret
    from authgate.core.models import utcnow

    device = await core.devices.named(realm, user, "phone")
    raw = await core.devices.issue_reauth_token(realm, device)
    # The same store, seen by a core whose clock is 30 days and a minute ahead.
    later = Core(core.settings, core.store, load_master_secret(core.settings),
                 clock=lambda: utcnow() + timedelta(days=30, minutes=1))
    try:
        with pytest.raises(AuthError) as expired:
            await later.devices.reauthenticate(realm, raw)
        assert expired.value.code is ErrorCode.INVALID_TOKEN
    finally:
        later.hasher.close()
    assert (await core.devices.reauthenticate(realm, raw)).user.id == user.id
