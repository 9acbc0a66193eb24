"""The API key service of the core: shown once, stored hashed, realm-naming, revocable."""

from __future__ import annotations

import pytest

from authgate.core.errors import AuthError, ErrorCode
from authgate.crypto.tokens import digest


async def test_created_key_verifies_to_its_realm_and_is_stored_hashed(core, realm):
    key, raw = await core.api_keys.create(realm, "reporting app")
    assert raw.startswith(key.prefix) and len(raw) > len(key.prefix) + 20
    assert key.key_hash == digest(raw) and raw not in key.key_hash
    verified = await core.api_keys.verify(raw)
    assert verified.realm.id == realm.id
    assert verified.key.id == key.id
    assert verified.key.last_used_at is not None
    listed = await core.api_keys.list(realm)
    assert [(k.id, k.last_used_at is not None) for k in listed] == [(key.id, True)]


async def test_unknown_and_revoked_keys_are_refused(core, realm):
    key, raw = await core.api_keys.create(realm, "old app")
    for bad in ("", None, "agk_" + "x" * 32, raw + "x", "y" * 1000):
        with pytest.raises(AuthError) as refused:
            await core.api_keys.verify(bad)
        assert refused.value.code is ErrorCode.INVALID_API_KEY
    revoked = await core.api_keys.revoke(realm, key.prefix)
    assert revoked.revoked_at is not None
    with pytest.raises(AuthError) as refused:
        await core.api_keys.verify(raw)
    assert refused.value.code is ErrorCode.INVALID_API_KEY


async def test_key_may_belong_to_an_organisation_of_its_realm(core, realm):
    org = await core.organisations.create(realm, "acme")
    key, raw = await core.api_keys.create(realm, "acme app", organisation_id=org.id)
    assert (await core.api_keys.verify(raw)).key.organisation_id == org.id
    other = await core.realms.create(f"t-o{key.id[:12]}")
    with pytest.raises(AuthError) as refused:
        await core.api_keys.create(other, "wrong realm", organisation_id=org.id)
    assert refused.value.code is ErrorCode.ORGANISATION_NOT_FOUND


async def test_keys_of_another_realm_cannot_be_revoked(core, realm):
    key, raw = await core.api_keys.create(realm, "app")
    other = await core.realms.create(f"t-r{key.id[:12]}")
    with pytest.raises(AuthError) as refused:
        await core.api_keys.revoke(other, key.id)
    assert refused.value.code is ErrorCode.NOT_FOUND
    assert (await core.api_keys.verify(raw)).realm.id == realm.id
