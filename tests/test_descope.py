"""The Descope dialect, driven by Descope's own Python SDK against a real server.

The SDK is synchronous: it runs in a worker thread (``asyncio.to_thread``) while the live server
answers from its own thread and event loop, on the same database as the ``core`` fixture. The
SDK verifies Authgate's JWTs itself, with the keys it fetches from ``/v2/keys/<ProjectID>``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from descope import AuthException, DescopeClient, RateLimitException

from authgate.core.engine import Core
from authgate.core.models import Realm
from authgate.core.users import NewUser
from authgate.crypto.tokens import digest
from authgate.dialects import descope as dialect
from tests.conftest import PASSWORD, unique_email

NEW_PASSWORD = "a brand new passphrase 42"


def sdk(live_server: Any, realm: Realm) -> DescopeClient:
    return DescopeClient(project_id=realm.project_id, base_url=live_server.url + "/descope")


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def error_of(exc: AuthException) -> dict[str, Any]:
    """The Descope error body the SDK keeps, as text, in ``error_message``."""
    return json.loads(exc.error_message)


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def sdk_error(fn: Any, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(AuthException) as raised:
        await call(fn, *args, **kwargs)
    return raised.value.status_code, error_of(raised.value)


def auth(realm: Realm, token: str | None = None) -> dict[str, str]:
    bearer = realm.project_id if token is None else f"{realm.project_id}:{token}"
    return {"Authorization": f"Bearer {bearer}"}


async def signed_up(live_server: Any, realm: Realm) -> tuple[DescopeClient, str, dict[str, Any]]:
    client = sdk(live_server, realm)
    email = unique_email("descope")
    result = await call(client.password.sign_up, email, PASSWORD, {"name": "Ada Lovelace"})
    return client, email, result


# The SDK end to end.

async def test_sdk_signs_up_signs_in_and_verifies_the_jwts_with_the_published_keys(
        live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    assert up["firstSeen"] is True
    assert up["user"]["email"] == email and up["user"]["loginIds"] == [email]
    assert up["user"]["name"] == "Ada Lovelace" and up["user"]["password"] is True
    assert up["projectId"] == realm.project_id
    assert client._auth.public_keys, "the SDK fetched /v2/keys/<ProjectID> to verify the JWTs"

    result = await call(client.password.sign_in, email, PASSWORD)
    session = result["sessionToken"]
    assert session["sub"] == result["userId"] == up["userId"]
    assert session["iss"].endswith("/" + realm.project_id)
    assert session["aud"] == realm.project_id and session["amr"] == ["pwd"]
    assert result["firstSeen"] is False
    refresh = result["refreshSessionToken"]
    assert refresh["sid"] == session["sid"] and refresh["drn"] == "DSR"

    validated = await call(client.validate_session, session["jwt"])
    assert validated["userId"] == up["userId"]
    assert validated["projectId"] == realm.project_id


async def test_user_object_and_jwt_carry_roles_and_tenants(live_server, core: Core, realm):
    email = unique_email("tenant")
    user = await core.users.create(realm, NewUser(email=email, password=PASSWORD,
                                                  roles=["viewer"], given_name="Grace",
                                                  family_name="Hopper"))
    acme = await core.organisations.create(realm, "acme", display_name="Acme Inc")
    globex = await core.organisations.create(realm, "globex")
    await core.organisations.add_member(realm, acme, user.id, roles=["admin", "billing"])
    await core.organisations.add_member(realm, globex, user.id, roles=["member"])
    client = sdk(live_server, realm)

    result = await call(client.password.sign_in, email, PASSWORD)
    person = result["user"]
    expected_fields = {"userId", "loginIds", "name", "givenName", "middleName", "familyName",
                       "email", "phone", "verifiedEmail", "verifiedPhone", "roleNames",
                       "userTenants", "status", "picture", "test", "customAttributes",
                       "createdTime", "TOTP", "webauthn", "password", "SAML", "OAuth",
                       "ssoAppIds", "externalIds", "editable"}
    assert expected_fields <= set(person)
    assert person["roleNames"] == ["viewer"] and person["status"] == "enabled"
    assert person["name"] == "Grace Hopper" and person["givenName"] == "Grace"
    assert abs(person["createdTime"] - int(user.created_at.timestamp())) <= 1
    tenants = {t["tenantId"]: t for t in person["userTenants"]}
    assert tenants[acme.id]["tenantName"] == "Acme Inc"
    assert tenants[acme.id]["roleNames"] == ["admin", "billing"]
    assert result["roles"] == ["viewer"]
    assert result["tenants"][acme.id]["roles"] == ["admin", "billing"]
    assert client.validate_tenant_roles(result, acme.id, ["admin"])
    assert not client.validate_tenant_roles(result, globex.id, ["admin"])

    refresh = result["refreshSessionToken"]["jwt"]
    mine = await call(client.my_tenants, refresh, ids=[globex.id, "not-a-tenant"])
    assert mine == {"tenants": [{"id": globex.id, "name": "globex", "customAttributes": {}}]}
    assert await call(client.my_tenants, refresh, dct=True) == {"tenants": []}

    selected = await call(client.select_tenant, acme.id, refresh)
    assert selected["sessionToken"]["dct"] == acme.id
    refresh = selected["refreshSessionToken"]["jwt"]
    assert await call(client.my_tenants, refresh, dct=True) == {
        "tenants": [{"id": acme.id, "name": "Acme Inc", "customAttributes": {}}]}
    refreshed = await call(client.refresh_session, refresh)
    assert refreshed["sessionToken"]["dct"] == acme.id, "the selection survives a refresh"

    outsider = await core.organisations.create(realm, "initech")
    status, body = await sdk_error(client.select_tenant, outsider.id,
                                   refreshed["refreshSessionToken"]["jwt"])
    assert (status, body["errorCode"]) == (400, "E063101")


async def test_refresh_session_rotates_the_refresh_jwt(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    first = up["refreshSessionToken"]["jwt"]
    refreshed = await call(client.refresh_session, first)
    second = refreshed["refreshSessionToken"]["jwt"]
    assert second != first
    assert refreshed["sessionToken"]["sid"] == up["sessionToken"]["sid"]
    assert refreshed["userId"] == up["userId"]
    again = await call(client.refresh_session, second)
    assert again["sessionToken"]["jwt"] != refreshed["sessionToken"]["jwt"]


async def test_validate_and_refresh_session_refreshes_an_expired_session_jwt(
        live_server, core: Core, realm):
    client, email, up = await signed_up(live_server, realm)
    session_jwt, refresh_jwt = up["sessionToken"]["jwt"], up["refreshSessionToken"]["jwt"]
    kept = await call(client.validate_and_refresh_session, session_jwt, refresh_jwt)
    assert kept["sessionToken"]["jwt"] == session_jwt, "a valid session JWT is kept"

    expired_claims = {**claims_of(session_jwt), "exp": int(time.time()) - 3600}
    expired = await core.keys.sign(realm, expired_claims)
    renewed = await call(client.validate_and_refresh_session, expired, refresh_jwt)
    assert renewed["sessionToken"]["jwt"] not in (session_jwt, expired)
    assert renewed["sessionToken"]["sub"] == up["userId"]
    assert renewed["refreshSessionToken"]["jwt"] != refresh_jwt


async def test_reused_refresh_jwt_revokes_the_session(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    first = up["refreshSessionToken"]["jwt"]
    second = (await call(client.refresh_session, first))["refreshSessionToken"]["jwt"]
    third = (await call(client.refresh_session, second))["refreshSessionToken"]["jwt"]

    status, body = await sdk_error(client.refresh_session, first)
    assert (status, body["errorCode"]) == (401, "E061203")
    assert set(body) == {"errorCode", "errorDescription", "errorMessage"}
    status, body = await sdk_error(client.refresh_session, third)
    assert (status, body["errorCode"]) == (401, "E061204"), "the whole family is revoked"


async def test_logout_revokes_the_refresh_jwt(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    refresh = up["refreshSessionToken"]["jwt"]
    response = await call(client.logout, refresh)
    assert response.status_code == 200
    assert 'DSR=""' in response.headers["set-cookie"] or "DSR=;" in response.headers[
        "set-cookie"] or "Max-Age=0" in response.headers["set-cookie"]
    status, body = await sdk_error(client.refresh_session, refresh)
    assert (status, body["errorCode"]) == (401, "E061204")
    status, body = await sdk_error(client.me, refresh)
    assert (status, body["errorCode"]) == (401, "E061204")


async def test_logout_all_ends_every_session_of_the_user(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    other = await call(client.password.sign_in, email, PASSWORD)
    await call(client.logout_all, other["refreshSessionToken"]["jwt"])
    for refresh in (up["refreshSessionToken"]["jwt"], other["refreshSessionToken"]["jwt"]):
        status, body = await sdk_error(client.refresh_session, refresh)
        assert (status, body["errorCode"]) == (401, "E061204")


async def test_me_and_history_describe_the_session_user(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    second = await call(client.password.sign_in, email, PASSWORD)
    refresh = second["refreshSessionToken"]["jwt"]
    me = await call(client.me, refresh)
    assert me["userId"] == up["userId"] and me["email"] == email
    assert me["verifiedEmail"] is False and me["TOTP"] is False
    history = await call(client.history, refresh)
    assert len(history) == 2
    assert {entry["userId"] for entry in history} == {up["userId"]}
    assert all(entry["ip"] == "127.0.0.1" and entry["loginTime"] > 0 for entry in history)


async def test_password_update_and_replace_change_the_password(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    refresh = up["refreshSessionToken"]["jwt"]
    await call(client.password.update, email, NEW_PASSWORD, refresh)
    assert (await call(client.me, refresh))["userId"] == up["userId"], "this session stays"
    status, body = await sdk_error(client.password.sign_in, email, PASSWORD)
    assert (status, body["errorCode"]) == (401, "E061101")

    replaced = await call(client.password.replace, email, NEW_PASSWORD, PASSWORD)
    assert replaced["userId"] == up["userId"]
    assert replaced["sessionToken"]["sid"] != up["sessionToken"]["sid"]
    status, body = await sdk_error(client.refresh_session, refresh)
    assert (status, body["errorCode"]) == (401, "E061204"), "replace ends other sessions"
    signed_in = await call(client.password.sign_in, email, PASSWORD)
    assert signed_in["userId"] == up["userId"]

    status, body = await sdk_error(client.password.replace, email, "wrong password!", "x" * 12)
    assert (status, body["errorCode"]) == (401, "E061101")
    other = await signed_up(live_server, realm)
    status, body = await sdk_error(client.password.update, other[1], NEW_PASSWORD,
                                   signed_in["refreshSessionToken"]["jwt"])
    assert (status, body["errorCode"]) == (403, "E011007"), "not another user's password"
    status, body = await sdk_error(client.password.update, email, "short",
                                   signed_in["refreshSessionToken"]["jwt"])
    assert (status, body["errorCode"]) == (400, "E062110")


async def test_wrong_password_and_unknown_user_answer_alike(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    wrong = await sdk_error(client.password.sign_in, email, "not the password")
    unknown = await sdk_error(client.password.sign_in, unique_email("nobody"), PASSWORD)
    assert wrong[0] == unknown[0] == 401
    assert wrong[1]["errorCode"] == unknown[1]["errorCode"] == "E061101"
    assert wrong[1]["errorMessage"] == unknown[1]["errorMessage"]


async def test_unknown_user_is_told_apart_when_the_realm_allows_it(live_server, core: Core):
    realm = await core.realms.create(f"t-reveal-{uuid.uuid4().hex[:12]}",
                                     settings={"reveal_unknown_users": True})
    client = sdk(live_server, realm)
    user = await core.users.create(realm, NewUser(email=unique_email(), password=PASSWORD))
    status, body = await sdk_error(client.password.sign_in, user.email, "not the password")
    assert (status, body["errorCode"]) == (401, "E061101")
    status, body = await sdk_error(client.password.sign_in, unique_email("nobody"), PASSWORD)
    assert (status, body["errorCode"]) == (401, "E062108")


async def test_duplicate_sign_up_is_user_already_exists(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    status, body = await sdk_error(client.password.sign_up, email, PASSWORD)
    assert (status, body["errorCode"]) == (400, "E062107")


async def test_repeated_failures_answer_429_with_retry_after(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    for _ in range(5):
        await sdk_error(client.password.sign_in, email, "not the password")
    with pytest.raises(RateLimitException) as raised:
        await call(client.password.sign_in, email, PASSWORD)
    assert raised.value.status_code == "E061103"
    assert raised.value.rate_limit_parameters["Retry-After"] >= 1


async def test_disabled_user_is_refused_with_the_documented_code(live_server, core: Core,
                                                                 realm):
    client, email, up = await signed_up(live_server, realm)
    await core.users.set_status(realm, up["userId"], "disabled")
    status, body = await sdk_error(client.password.sign_in, email, PASSWORD)
    assert (status, body["errorCode"]) == (403, "E062109")
    status, body = await sdk_error(client.refresh_session, up["refreshSessionToken"]["jwt"])
    assert (status, body["errorCode"]) == (401, "E061204"), "disabling ends the sessions"


async def test_sign_up_maps_the_login_id_and_contacts(live_server, realm):
    client = sdk(live_server, realm)
    email = unique_email("phone")
    result = await call(client.password.sign_up, "+44 20 7946 0018", PASSWORD,
                        {"email": email, "givenName": "Alan", "familyName": "Turing"})
    person = result["user"]
    assert person["phone"] == "+44 20 7946 0018" and person["email"] == email
    assert set(person["loginIds"]) == {email, "+44 20 7946 0018"}
    assert person["name"] == "Alan Turing"
    by_email = await call(client.password.sign_in, email, PASSWORD)
    assert by_email["userId"] == person["userId"]
    status, body = await sdk_error(client.password.sign_up, unique_email(), PASSWORD,
                                   {"email": unique_email()})
    assert (status, body["errorCode"]) == (400, "E011004")


async def test_inactive_tenants_are_neither_listed_nor_selectable(live_server, core: Core,
                                                                  realm):
    client, email, up = await signed_up(live_server, realm)
    paused = await core.organisations.create(realm, "paused")
    await core.organisations.add_member(realm, paused, up["userId"], roles=["admin"],
                                        status="inactive")
    closed = await core.organisations.create(realm, "closed", is_active=False)
    await core.organisations.add_member(realm, closed, up["userId"], roles=["admin"])
    result = await call(client.password.sign_in, email, PASSWORD)
    assert result["user"]["userTenants"] == [] and result["tenants"] == {}
    refresh = result["refreshSessionToken"]["jwt"]
    status, body = await sdk_error(client.select_tenant, paused.id, refresh)
    assert (status, body["errorCode"]) == (403, "E063104")
    status, body = await sdk_error(client.select_tenant, closed.id, refresh)
    assert (status, body["errorCode"]) == (403, "E063102")


async def test_a_refresh_jwt_is_refused_by_another_project(live_server, core: Core, realm):
    client, email, up = await signed_up(live_server, realm)
    other = await core.realms.create(f"t-other-{uuid.uuid4().hex[:12]}")
    async with httpx.AsyncClient(base_url=live_server.url + "/descope") as http:
        response = await http.post(
            "/v1/auth/refresh", headers=auth(other, up["refreshSessionToken"]["jwt"]), json={})
        assert (response.status_code, response.json()["errorCode"]) == (401, "E061201")
        listed = await http.get("/v1/auth/me/tenants",
                                headers=auth(realm, up["refreshSessionToken"]["jwt"]))
        assert listed.status_code == 200 and listed.json() == {"tenants": []}


# Login options, sent as the SDK sends them (body loginOptions, Bearer <ProjectID>:<refresh>).

async def test_custom_claims_are_signed_into_the_jwt_and_survive_refresh(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    async with httpx.AsyncClient(base_url=live_server.url + "/descope") as http:
        response = await http.post("/v1/auth/password/signin", headers=auth(realm), json={
            "loginId": email, "password": PASSWORD,
            "loginOptions": {"customClaims": {"plan": "gold", "seats": 3}}})
        assert response.status_code == 200
        body = response.json()
        validated = await call(client.validate_session, body["sessionJwt"])
        assert validated["plan"] == "gold" and validated["seats"] == 3
        refreshed = await call(client.refresh_session, body["refreshJwt"])
        assert refreshed["sessionToken"]["plan"] == "gold"

        for reserved in ("sub", "roles", "tenants", "exp", "rt"):
            refused = await http.post("/v1/auth/password/signin", headers=auth(realm), json={
                "loginId": email, "password": PASSWORD,
                "loginOptions": {"customClaims": {reserved: "x"}}})
            assert refused.status_code == 400
            assert refused.json()["errorCode"] == "E011004"
            assert reserved in refused.json()["errorMessage"]


async def test_revoke_other_sessions_keeps_only_the_new_one(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    async with httpx.AsyncClient(base_url=live_server.url + "/descope") as http:
        response = await http.post("/v1/auth/password/signin", headers=auth(realm), json={
            "loginId": email, "password": PASSWORD,
            "loginOptions": {"revokeOtherSessions": True}})
        assert response.status_code == 200
    status, body = await sdk_error(client.refresh_session, up["refreshSessionToken"]["jwt"])
    assert (status, body["errorCode"]) == (401, "E061204")
    assert (await call(client.me, response.json()["refreshJwt"]))["email"] == email


async def test_stepup_reauthenticates_the_same_session(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    refresh = up["refreshSessionToken"]["jwt"]
    async with httpx.AsyncClient(base_url=live_server.url + "/descope") as http:
        response = await http.post("/v1/auth/password/signin", headers=auth(realm, refresh),
                                   json={"loginId": email, "password": PASSWORD,
                                         "loginOptions": {"stepup": True, "mfa": False}})
        assert response.status_code == 200, response.text
        stepped = await call(client.validate_session, response.json()["sessionJwt"])
        assert stepped["su"] is True and stepped["sid"] == up["sessionToken"]["sid"]
        refreshed = await call(client.refresh_session, response.json()["refreshJwt"])
        assert refreshed["sessionToken"]["su"] is True

        http.cookies.clear()  # the DSR cookie would stand in for the refresh token
        missing = await http.post("/v1/auth/password/signin", headers=auth(realm), json={
            "loginId": email, "password": PASSWORD, "loginOptions": {"stepup": True}})
        assert (missing.status_code, missing.json()["errorCode"]) == (400, "E011002")

        other_client, other_email, other = await signed_up(live_server, realm)
        foreign = await http.post(
            "/v1/auth/password/signin",
            headers=auth(realm, other["refreshSessionToken"]["jwt"]),
            json={"loginId": email, "password": PASSWORD, "loginOptions": {"stepup": True}})
        assert (foreign.status_code, foreign.json()["errorCode"]) == (403, "E011007")


async def test_mfa_needs_a_factor_the_session_lacks(live_server, core: Core, realm):
    client, email, up = await signed_up(live_server, realm)
    async with httpx.AsyncClient(base_url=live_server.url + "/descope") as http:
        same = await http.post(
            "/v1/auth/password/signin", headers=auth(realm, up["refreshSessionToken"]["jwt"]),
            json={"loginId": email, "password": PASSWORD, "loginOptions": {"mfa": True}})
        assert (same.status_code, same.json()["errorCode"]) == (400, "E011004")

        # A session begun with another method (a one-time code), then a password as the second
        # factor.
        user = await core.users.find(realm, email)
        tokens = await core.sessions.start(realm, user, amr=["otp"], with_id_token=False)
        _, otp_refresh, _ = await dialect.issue(core, realm, tokens)
        second = await http.post(
            "/v1/auth/password/signin", headers=auth(realm, otp_refresh),
            json={"loginId": email, "password": PASSWORD, "loginOptions": {"mfa": True}})
        assert second.status_code == 200, second.text
        claims = (await call(client.validate_session, second.json()["sessionJwt"]))
        assert claims["amr"] == ["otp", "pwd", "mfa"]
        assert claims["sid"] == tokens.session.id


# Cookies.

async def test_ds_and_dsr_cookies_are_set_and_accepted(live_server, realm):
    client, email, up = await signed_up(live_server, realm)
    async with httpx.AsyncClient(base_url=live_server.url + "/descope") as http:
        response = await http.post("/v1/auth/password/signin", headers=auth(realm),
                                   json={"loginId": email, "password": PASSWORD})
        body = response.json()
        assert response.cookies["DS"] == body["sessionJwt"]
        assert response.cookies["DSR"] == body["refreshJwt"]
        assert "httponly" in [c for c in response.headers.get_list("set-cookie")
                              if c.startswith("DSR=")][0].lower()
        assert body["cookiePath"] == "/" and body["cookieMaxAge"] > 0
        assert body["cookieExpiration"] > time.time()

    base = live_server.url + "/descope"
    async with httpx.AsyncClient(base_url=base, cookies={"DSR": body["refreshJwt"]}) as http:
        by_refresh = await http.get("/v1/auth/me", headers=auth(realm))
        assert by_refresh.status_code == 200 and by_refresh.json()["email"] == email
        refreshed = await http.post("/v1/auth/refresh", headers=auth(realm), json={})
        assert refreshed.status_code == 200
        assert refreshed.cookies["DSR"] == refreshed.json()["refreshJwt"] != body["refreshJwt"]
    async with httpx.AsyncClient(base_url=base, cookies={"DS": body["sessionJwt"]}) as http:
        by_session = await http.get("/v1/auth/me", headers=auth(realm))
        assert by_session.status_code == 200 and by_session.json()["email"] == email
        session_as_refresh = await http.post("/v1/auth/refresh",
                                             headers=auth(realm, body["sessionJwt"]), json={})
        assert (session_as_refresh.status_code,
                session_as_refresh.json()["errorCode"]) == (401, "E061201")


# Password reset and policy.

async def test_password_reset_mails_a_code_and_answers_alike_for_unknown_users(
        live_server, core: Core, realm, smtp_server):
    mailbox, _ = smtp_server
    client, email, up = await signed_up(live_server, realm)
    sent = await call(client.password.send_reset, email, "https://app.example/reset")
    assert sent["maskedEmail"] == email[0] + "***@e***"
    message = await mailbox.wait_for(email)
    assert "reset" in message["Subject"].lower()
    text = message.get_payload(decode=True).decode()
    found = re.search(r"[?&]token=([A-Za-z0-9_-]{20,})", text)
    assert found and "app.example" not in text
    async with core.store.transaction() as tx:
        code = await tx.codes.by_hash(digest(found.group(1)))
    assert code is not None and code.purpose == "reset_password"
    assert code.user_id == up["userId"] and code.consumed_at is None
    nobody = unique_email("nobody")
    unknown = await call(client.password.send_reset, nobody)
    assert unknown["resetMethod"] == sent["resetMethod"]
    await asyncio.sleep(0.5)
    assert mailbox.count_to(nobody) == 0


async def test_password_policy_describes_the_core_policy(live_server, core, realm):
    policy = await call(sdk(live_server, realm).password.get_policy)
    assert policy["minLength"] == core.settings.password_min_length
    assert policy["lowercase"] is False and policy["nonAlphanumeric"] is False


# Malformed input, over raw HTTP: never a 500, always Descope's envelope.

async def test_malformed_requests_get_descope_error_codes(client, realm):
    signin = "/descope/v1/auth/password/signin"
    cases = [
        (client.post(signin, headers={**auth(realm), "Content-Type": "application/json"},
                     content=b"{not json"), 400, "E011001"),
        (client.post(signin, headers=auth(realm), json=[1, 2]), 400, "E011001"),
        (client.post(signin, headers={**auth(realm), "Content-Type": "text/html"},
                     content=b"<p>hi</p>"), 415, "E011001"),
        (client.post(signin, json={"loginId": "a@b.co", "password": "x"}), 400, "E011002"),
        (client.post(signin, headers={"Authorization": "Bearer "},
                     json={"loginId": "a@b.co", "password": "x"}), 400, "E011002"),
        (client.post(signin, headers={"Authorization": "Bearer Pnosuchproject000000000000000"},
                     json={"loginId": "a@b.co", "password": "x"}), 400, "E011005"),
        (client.post(signin, headers={"Authorization": "Bearer ../../etc"},
                     json={"loginId": "a@b.co", "password": "x"}), 400, "E011005"),
        (client.post(signin, headers=auth(realm), json={"loginId": 5, "password": "x"}),
         400, "E011004"),
        (client.post(signin, headers=auth(realm), json={"loginId": "a@b.co"}), 400, "E011002"),
        (client.post(signin, headers=auth(realm),
                     json={"loginId": "a@b.co", "password": "x", "loginOptions": "yes"}),
         400, "E011004"),
        (client.post(signin, headers=auth(realm), json={
            "loginId": "a@b.co", "password": "x", "loginOptions": {"customClaims": [1]}}),
         400, "E011004"),
        (client.post("/descope/v1/auth/password/signup", headers=auth(realm),
                     json={"loginId": "a@b.co", "password": PASSWORD, "user": "me"}),
         400, "E011004"),
        (client.post("/descope/v1/auth/password/signup", headers=auth(realm),
                     json={"loginId": "not an email@", "password": PASSWORD}), 400, "E011004"),
        (client.post("/descope/v1/auth/refresh", headers=auth(realm), json={}),
         400, "E011002"),
        (client.post("/descope/v1/auth/refresh", headers=auth(realm, "garbage"), json={}),
         401, "E061201"),
        (client.post("/descope/v1/auth/refresh", headers=auth(realm, "a.b.c"), json={}),
         401, "E061201"),
        (client.get("/descope/v1/auth/me", headers=auth(realm, "x" * 5000)), 401, "E061201"),
        (client.post("/descope/v1/auth/me/tenants", headers=auth(realm, "x.y.z"),
                     json={"ids": "acme"}), 400, "E011004"),
        (client.post("/descope/v1/auth/tenant/select", headers=auth(realm, "x.y.z"),
                     json={}), 400, "E011002"),
        (client.get("/descope/v2/keys/Pnosuchproject000000000000000"), 400, "E011005"),
        (client.get("/descope/v1/auth/no/such/route", headers=auth(realm)), 404, "E011003"),
        (client.get(signin, headers=auth(realm)), 405, "E011003"),
    ]
    for request, status, code in cases:
        response = await request
        assert response.status_code == status, (code, response.text)
        body = response.json()
        assert body["errorCode"] == code, body
        assert isinstance(body["errorDescription"], str) and body["errorMessage"]


async def test_keys_endpoint_publishes_the_realm_jwks(client, core, realm):
    response = await client.get(f"/descope/v2/keys/{realm.project_id}")
    assert response.status_code == 200
    keys = response.json()["keys"]
    active = (await core.keys.signer(realm)).kid
    assert active in {key["kid"] for key in keys}
    assert all("alg" in key and "d" not in key for key in keys)
