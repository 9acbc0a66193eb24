"""Scopes: a sign-in gets only the scopes its realm grants, and the claims an ID token and
userinfo show follow the scope granted (OIDC Core §5.4)."""

from __future__ import annotations

import uuid

import jwt
import pytest

from authgate.core import audit as events
from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm
from tests.conftest import realm_url, unique_email
from tests.test_admin_and_cli import admin_token
from tests.test_native_api import bearer, password_grant, refresh, sign_up


async def _user(client, realm: Realm) -> str:
    email = unique_email()
    assert (await sign_up(client, realm, email)).status_code == 201
    return email


def _id_claims(tokens: dict) -> dict:
    return jwt.decode(tokens["id_token"], options={"verify_signature": False})


async def test_a_scope_the_realm_does_not_list_is_refused_before_the_password(client, core,
                                                                             realm):
    email = await _user(client, realm)
    for password in ("the right one is not needed", "a long passphrase indeed"):
        refused = await password_grant(client, realm, email, password, scope="openid admin")
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_scope"
        assert "admin" in refused.json()["error_description"]
    async with core.store.transaction() as tx:  # no sign-in was attempted
        attempts = await tx.audit.recent(realm.id, types=[events.SIGN_IN_FAILED, events.SIGN_IN])
    assert attempts == []


async def test_a_realm_grants_the_scopes_it_lists(client, core: Core, realm: Realm):
    await core.realms.update_settings(realm, {"scopes": ["openid", "payments:write"],
                                              "default_scope": "openid"})
    email = await _user(client, realm)
    granted = (await password_grant(client, realm, email, scope="openid payments:write")).json()
    assert granted["scope"] == "openid payments:write"
    claims = jwt.decode(granted["access_token"], options={"verify_signature": False})
    assert claims["scope"] == "openid payments:write"
    # "profile" is no longer listed: refused.
    refused = await password_grant(client, realm, email, scope="openid profile")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
    # No scope asked for: the realm's default.
    assert (await password_grant(client, realm, email)).json()["scope"] == "openid"


async def test_id_token_and_userinfo_show_the_claims_of_the_scope_granted(client, realm):
    email = await _user(client, realm)
    only_openid = (await password_grant(client, realm, email, scope="openid")).json()
    assert "email" not in _id_claims(only_openid)
    info = (await client.get(realm_url(realm, "/userinfo"), headers=bearer(only_openid))).json()
    assert set(info) == {"sub"}

    with_email = (await password_grant(client, realm, email, scope="openid email")).json()
    assert _id_claims(with_email)["email"] == email
    assert "updated_at" not in _id_claims(with_email)  # a profile claim
    info = (await client.get(realm_url(realm, "/userinfo"), headers=bearer(with_email))).json()
    assert set(info) == {"sub", "email", "email_verified"}

    default = (await password_grant(client, realm, email)).json()
    assert {"email", "email_verified", "updated_at"} <= set(_id_claims(default))

    # A refresh that narrows the scope narrows the claims too.
    narrowed = (await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": default["refresh_token"],
        "scope": "openid"})).json()
    assert "email" not in _id_claims(narrowed)
    info = (await client.get(realm_url(realm, "/userinfo"), headers=bearer(narrowed))).json()
    assert set(info) == {"sub"}
    # ...and the session keeps its grant: the next plain refresh shows them again.
    again = (await refresh(client, realm, narrowed["refresh_token"])).json()
    assert _id_claims(again)["email"] == email


async def test_a_session_with_no_recorded_grant_shows_every_claim(client, core: Core,
                                                                  realm: Realm):
    email = await _user(client, realm)
    user = await core.users.find(realm, email)
    started = await core.sessions.start(realm, user, amr=["pwd"])  # as a dialect does
    assert jwt.decode(started.id_token, options={"verify_signature": False})["email"] == email
    info = await client.get(realm_url(realm, "/userinfo"),
                            headers={"Authorization": f"Bearer {started.access_token}"})
    assert info.json()["email"] == email


@pytest.mark.parametrize(("bad", "named"), [
    ({"allow_signup": "no"}, "allow_signup"),
    ({"reveal_unknown_users": 1}, "reveal_unknown_users"),
    ({"audience": ["a", "b"]}, "audience"),
    ({"scopes": "openid profile"}, "scopes"),
    ({"scopes": ["openid", "has space"]}, "scopes"),
    ({"scopes": ["openid", 'quote"d']}, "scopes"),
    ({"default_scope": "openid admin"}, "default_scope"),
    ({"scopes": ["openid"], "default_scope": "openid email"}, "default_scope"),
    ({"no_such_setting": True}, "no_such_setting"),
    # Longer than a session can keep (its scope column): every sign-in asking for none failed.
    ({"scopes": [f"s{i:02d}" + "x" * 97 for i in range(11)],
      "default_scope": " ".join(f"s{i:02d}" + "x" * 97 for i in range(11))}, "default_scope"),
])
async def test_realm_settings_of_the_wrong_shape_are_refused(core: Core, realm: Realm,
                                                              bad, named):
    with pytest.raises(AuthError) as refused:
        await core.realms.update_settings(realm, bad)
    assert refused.value.code is ErrorCode.INVALID_REQUEST and named in refused.value.message
    with pytest.raises(AuthError):
        await core.realms.create(f"x-{uuid.uuid4().hex[:8]}", settings=bad)
    assert (await core.realms.require(realm.name)).settings == {}


async def test_the_admin_api_refuses_bad_realm_settings(client, core: Core):
    headers = {"Authorization": f"Bearer {await admin_token(client, core)}"}
    response = await client.post("/admin/realms", headers=headers, json={
        "name": f"bad-{uuid.uuid4().hex[:8]}", "settings": {"scopes": "openid"}})
    assert response.status_code == 400
    assert "scopes" in response.json()["error_description"]


async def test_a_session_loses_on_refresh_the_scopes_its_realm_no_longer_lists(client, core,
                                                                              realm):
    """A grant recorded before the realm stopped listing a scope (or before scopes were
    checked) does not carry it into new tokens."""
    await core.realms.update_settings(realm, {"scopes": ["openid", "email", "admin"],
                                              "default_scope": "openid"})
    email = await _user(client, realm)
    granted = (await password_grant(client, realm, email, scope="openid admin")).json()
    assert granted["scope"] == "openid admin"
    await core.realms.update_settings(realm, {"scopes": ["openid", "email"]})
    refreshed = (await refresh(client, realm, granted["refresh_token"])).json()
    assert refreshed["scope"] == "openid"
    claims = jwt.decode(refreshed["access_token"], options={"verify_signature": False})
    assert claims["scope"] == "openid"
    # Nothing of the grant left: the session must sign in again.
    await core.realms.update_settings(realm, {"scopes": ["email"], "default_scope": "email"})
    gone = await refresh(client, realm, refreshed["refresh_token"])
    assert gone.status_code == 400 and gone.json()["error"] == "invalid_scope"


async def test_invalid_scope_repeats_only_what_could_be_a_scope_name(client, realm):
    email = await _user(client, realm)
    refused = await password_grant(client, realm, email, scope='openid adm\u00efn"x\\ admin')
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
    description = refused.json()["error_description"]
    assert description.isascii() and '"' not in description and "\\" not in description
    assert description.endswith(": admin.")


async def test_scope_names_are_separated_by_spaces_only(client, realm):
    email = await _user(client, realm)
    tabbed = await password_grant(client, realm, email, scope="openid\temail")
    assert tabbed.status_code == 400 and tabbed.json()["error"] == "invalid_scope"
    spaced = await password_grant(client, realm, email, scope="  openid   email ")
    assert spaced.status_code == 200 and spaced.json()["scope"] == "openid email"


async def test_custom_claims_cannot_set_a_scope(client, realm):
    from authgate.core.sessions import check_custom_claims

    with pytest.raises(AuthError) as refused:
        check_custom_claims({"scope": "admin"})
    assert refused.value.code is ErrorCode.INVALID_REQUEST


async def test_a_default_scope_stored_too_long_is_refused_not_a_server_error(client, core,
                                                                            realm):
    """A realm whose default scope was stored before its length was checked: sign-ins asking
    for none are told invalid_scope, and the realm still signs in those that ask."""
    from authgate.store import tables as t

    names = [f"s{i:02d}" + "x" * 97 for i in range(11)]
    async with core.store.transaction(write=True) as tx:
        await tx.realms.update_settings(realm.id, {"scopes": ["openid", *names],
                                                   "default_scope": " ".join(names)})
    core.realms._cache.clear()
    email = await _user(client, realm)
    refused = await password_grant(client, realm, email)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
    assert (await password_grant(client, realm, email, scope="openid")).status_code == 200
    assert t.sessions.c.scope.type.length == 1000  # what the limit protects


async def test_the_admin_api_refuses_settings_that_are_not_an_object(client, core):
    headers = {"Authorization": f"Bearer {await admin_token(client, core)}"}
    for settings in ([], "x", 5, [1]):
        response = await client.post("/admin/realms", headers=headers, json={
            "name": f"bad-{uuid.uuid4().hex[:8]}", "settings": settings})
        assert response.status_code == 400, settings
