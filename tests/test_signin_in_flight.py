"""A sign-in whose password check is in flight when the password changes, the user is
disabled or signs out everywhere opens no session afterwards: what it proved no longer holds.
(Without this, an attacker with a stolen password keeps a session past the owner's reset.)"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from authgate.core.engine import Core
from authgate.core.models import Realm
from tests.conftest import PASSWORD, realm_url, unique_email


@pytest.mark.parametrize("change", ["new password", "disabled", "signed out everywhere"])
async def test_a_sign_in_in_flight_opens_no_session_after_the_user_changes(
        client: httpx.AsyncClient, core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch,
        change: str) -> None:
    email = unique_email()
    signed_up = await client.post(realm_url(realm, "/signup"),
                                  json={"email": email, "password": PASSWORD})
    assert signed_up.status_code == 201, signed_up.text
    user = await core.users.find(realm, email)
    assert user is not None
    checked, release = asyncio.Event(), asyncio.Event()
    verify = core.hasher.verify

    async def held(secret: str, password: str) -> Any:
        """The password check, held open once done: the window a real Argon2id leaves."""
        result = await verify(secret, password)
        checked.set()
        await release.wait()
        return result

    monkeypatch.setattr(core.hasher, "verify", held)
    in_flight = asyncio.create_task(client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "password", "username": email, "password": PASSWORD}))
    await asyncio.wait_for(checked.wait(), 10)
    monkeypatch.setattr(core.hasher, "verify", verify)
    if change == "new password":
        await core.users.set_password(realm, user.id, "another long passphrase 42")
    elif change == "disabled":
        await core.users.set_status(realm, user.id, "disabled")
    else:
        await core.sessions.revoke_all(realm, user.id)
    release.set()
    answer = await in_flight
    assert answer.status_code == 400, answer.text
    assert answer.json()["error_code"] == "invalid_credentials"
    assert await core.sessions.list_for_user(realm, user.id) == []
    if change == "signed out everywhere":  # the user signs in again as usual
        again = await client.post(realm_url(realm, "/oauth/token"), data={
            "grant_type": "password", "username": email, "password": PASSWORD})
        assert again.status_code == 200, again.text
