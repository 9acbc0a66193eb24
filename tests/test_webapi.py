"""The web-API dialect (seed 003): Login and TokenLogin as documented, the APIKey that names the
realm, fields selection, suppressResponseCodes, re-authentication tokens per device, logout."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import pyotp
import pytest

from authgate.core.engine import Core
from authgate.core.models import Realm
from authgate.core.users import NewUser
from tests.conftest import PASSWORD, realm_url, unique_email

LOGIN = "/webapi/api/v1/Authentication/Login"
TOKEN_LOGIN = "/webapi/api/v1/Authentication/TokenLogin"
LOGOUT = "/webapi/api/v1/Authentication/Logout"


@pytest.fixture
async def api_key(core: Core, realm: Realm) -> str:
    _, raw = await core.api_keys.create(realm, "4DX mobile app")
    return raw


@pytest.fixture
async def member(core: Core, realm: Realm) -> dict[str, Any]:
    email = unique_email("webapi")
    user = await core.users.create(realm, NewUser(
        email=email, password=PASSWORD, given_name="Grace", family_name="Hopper",
        picture="https://example.com/grace.png"))
    return {"email": email, "id": user.id}


def login_body(email: str, **extra: Any) -> dict[str, Any]:
    return {"userName": email, "password": PASSWORD, **extra}


async def test_documented_login_request_returns_login_data(client, api_key, member):
    # The seed's sample body, with this test's credentials.
    response = await client.post(LOGIN, params={"APIKey": api_key}, json={
        "userName": member["email"], "password": PASSWORD, "deviceName": "sample phone",
        "generateReAuthenticationToken": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["Authenticated", "ReAuthenticationToken", "Me", "SessionToken"]
    assert body["Authenticated"] is True
    assert body["ReAuthenticationToken"]
    assert body["Me"] == {"ID": member["id"], "FirstName": "Grace", "LastName": "Hopper",
                          "ImageURL": "https://example.com/grace.png"}
    assert body["SessionToken"]


async def test_form_urlencoded_login_is_accepted(client, api_key, member):
    response = await client.post(
        LOGIN, params={"APIKey": api_key},
        content=urlencode(login_body(member["email"])),
        headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    assert response.json()["Authenticated"] is True
    assert response.json()["ReAuthenticationToken"] is None


async def test_query_and_body_names_and_path_bind_case_insensitively(client, api_key, member):
    response = await client.post(
        "/webapi/api/v1/authentication/login?apikey=" + api_key + "&FIELDS=me",
        json={"USERNAME": member["email"], "Password": PASSWORD})
    assert response.status_code == 200, response.text
    assert response.json() == {"Me": {"ID": member["id"], "FirstName": "Grace",
                                      "LastName": "Hopper",
                                      "ImageURL": "https://example.com/grace.png"}}


async def test_session_token_authorises_a_logout_in_the_same_style(client, api_key, member):
    body = (await client.post(LOGIN, params={"APIKey": api_key},
                              json=login_body(member["email"]))).json()
    out = await client.post(LOGOUT, params={"APIKey": api_key, "APIToken": body["SessionToken"]})
    assert out.status_code == 200
    assert out.json() == {"Authenticated": False, "LoggedOut": True}
    again = await client.post(LOGOUT, params={"APIKey": api_key,
                                              "APIToken": body["SessionToken"]})
    assert again.status_code == 401
    assert again.json() == {"Message": "Authorization has been denied for this request."}


async def test_fields_selects_only_the_named_members(client, api_key, member):
    response = await client.post(LOGIN, params={"APIKey": api_key, "fields": "Me,SessionToken"},
                                 json=login_body(member["email"]))
    assert set(response.json()) == {"Me", "SessionToken"}
    repeated = await client.post(
        LOGIN, params=[("APIKey", api_key), ("fields", "Me"), ("fields", "SessionToken")],
        json=login_body(member["email"]))
    assert set(repeated.json()) == {"Me", "SessionToken"}
    with_unknown = await client.post(
        LOGIN, params={"APIKey": api_key, "fields": "Authenticated,NoSuchField"},
        json=login_body(member["email"]))
    assert with_unknown.json() == {"Authenticated": True}


async def test_fields_with_no_known_name_return_the_full_object(client, api_key, member):
    response = await client.post(LOGIN, params={"APIKey": api_key, "fields": "Nothing,Else"},
                                 json=login_body(member["email"]))
    assert set(response.json()) == {"Authenticated", "ReAuthenticationToken", "Me",
                                    "SessionToken"}


async def test_wrong_password_is_401_in_the_aspnet_error_shape(client, api_key, member):
    response = await client.post(LOGIN, params={"APIKey": api_key},
                                 json={"userName": member["email"], "password": "not it at all"})
    assert response.status_code == 401
    assert response.json() == {"Message": "The user name or password is incorrect."}


async def test_suppress_response_codes_turns_a_401_into_a_200(client, api_key, member):
    response = await client.post(
        LOGIN, params={"APIKey": api_key, "suppressResponseCodes": "true"},
        json={"userName": member["email"], "password": "not it at all"})
    assert response.status_code == 200
    assert response.json()["Authenticated"] is False
    assert response.json()["Message"] == "The user name or password is incorrect."
    bad_key = await client.post(LOGIN, params={"APIKey": "agk_nope",
                                               "suppressResponseCodes": "True"},
                                json=login_body(member["email"]))
    assert bad_key.status_code == 200
    assert bad_key.json()["Authenticated"] is False
    not_suppressed = await client.post(
        LOGIN, params={"APIKey": api_key, "suppressResponseCodes": "false"},
        json={"userName": member["email"], "password": "not it at all"})
    assert not_suppressed.status_code == 401


async def test_missing_invalid_and_revoked_api_keys_are_refused(client, core, realm, member):
    for params in ({}, {"APIKey": "agk_not-a-real-key"}, {"APIKey": ""}):
        response = await client.post(LOGIN, params=params, json=login_body(member["email"]))
        assert response.status_code == 401, params
        assert "APIKey" in response.json()["Message"]
    key, raw = await core.api_keys.create(realm, "soon revoked")
    assert (await client.post(LOGIN, params={"APIKey": raw},
                              json=login_body(member["email"]))).status_code == 200
    await core.api_keys.revoke(realm, key.id)
    revoked = await client.post(LOGIN, params={"APIKey": raw}, json=login_body(member["email"]))
    assert revoked.status_code == 401
    token_login = await client.post(TOKEN_LOGIN, params={"APIKey": raw},
                                    json={"reAuthenticationToken": "x"})
    assert token_login.status_code == 401


async def test_api_key_of_another_realm_does_not_sign_its_users_in(client, core, member):
    other = await core.realms.create(f"t-other-{member['id'][:8]}")
    _, raw = await core.api_keys.create(other, "other app")
    response = await client.post(LOGIN, params={"APIKey": raw}, json=login_body(member["email"]))
    assert response.status_code == 401
    assert response.json() == {"Message": "The user name or password is incorrect."}


async def test_device_name_is_required_to_generate_a_reauthentication_token(client, api_key,
                                                                            member):
    response = await client.post(LOGIN, params={"APIKey": api_key}, json=login_body(
        member["email"], generateReAuthenticationToken=True))
    assert response.status_code == 400
    assert "deviceName" in response.json()["Message"]


async def test_reauthentication_token_signs_in_once_and_is_rotated(client, api_key, member):
    first = (await client.post(LOGIN, params={"APIKey": api_key}, json=login_body(
        member["email"], deviceName="pixel", generateReAuthenticationToken=True))).json()
    token = first["ReAuthenticationToken"]
    used = await client.post(TOKEN_LOGIN, params={"APIKey": api_key},
                             json={"reAuthenticationToken": token})
    assert used.status_code == 200, used.text
    body = used.json()
    assert body["Authenticated"] is True
    assert body["Me"]["ID"] == member["id"]
    assert body["SessionToken"] and body["SessionToken"] != first["SessionToken"]
    successor = body["ReAuthenticationToken"]
    assert successor and successor != token
    old = await client.post(TOKEN_LOGIN, params={"APIKey": api_key},
                            json={"reAuthenticationToken": token})
    assert old.status_code == 401
    assert (await client.post(TOKEN_LOGIN, params={"APIKey": api_key},
                              json={"reAuthenticationToken": successor})).status_code == 200


async def test_one_live_reauthentication_token_per_device(client, api_key, member):
    def login(device: str) -> Any:
        return client.post(LOGIN, params={"APIKey": api_key}, json=login_body(
            member["email"], deviceName=device, generateReAuthenticationToken=True))

    phone_first = (await login("phone")).json()["ReAuthenticationToken"]
    tablet = (await login("tablet")).json()["ReAuthenticationToken"]
    phone_second = (await login("phone")).json()["ReAuthenticationToken"]
    refused = await client.post(TOKEN_LOGIN, params={"APIKey": api_key},
                                json={"reAuthenticationToken": phone_first})
    assert refused.status_code == 401
    for live in (tablet, phone_second):
        assert (await client.post(TOKEN_LOGIN, params={"APIKey": api_key},
                                  json={"reAuthenticationToken": live})).status_code == 200


async def test_revoked_device_token_is_refused(client, realm, api_key, member):
    login = (await client.post(LOGIN, params={"APIKey": api_key}, json=login_body(
        member["email"], deviceName="lost phone", generateReAuthenticationToken=True))).json()
    # The owner forgets the device through the native API of the key's realm.
    headers = {"Authorization": f"Bearer {login['SessionToken']}"}
    devices = (await client.get(realm_url(realm, "/devices"), headers=headers)).json()["devices"]
    assert [d["name"] for d in devices] == ["lost phone"]
    revoked = await client.delete(realm_url(realm, f"/devices/{devices[0]['id']}"),
                                  headers=headers)
    assert revoked.status_code == 204
    refused = await client.post(TOKEN_LOGIN, params={"APIKey": api_key},
                                json={"reAuthenticationToken": login["ReAuthenticationToken"]})
    assert refused.status_code == 401
    assert refused.json() == {"Message": "Authorization has been denied for this request."}
    # Revoking the device also ended the session it was signed in with.
    out = await client.post(LOGOUT, params={"APIKey": api_key,
                                            "APIToken": login["SessionToken"]})
    assert out.status_code == 401


async def test_user_with_totp_needs_mfa_code(client, core, realm, api_key, member):
    user = await core.users.get(realm, member["id"])
    enrolment = await core.totp.enrol(realm, user)
    totp = pyotp.TOTP(enrolment.secret)
    await core.totp.confirm(realm, user, totp.now())
    missing = await client.post(LOGIN, params={"APIKey": api_key},
                                json=login_body(member["email"]))
    assert missing.status_code == 401
    assert "mfaCode" in missing.json()["Message"]
    ok = await client.post(LOGIN, params={"APIKey": api_key}, json=login_body(
        member["email"], mfaCode=totp.at(time.time() + 30)))
    assert ok.status_code == 200, ok.text


async def test_malformed_requests_get_messages_not_500s(client, api_key):
    for content, ctype in ((b"{broken", "application/json"), (b"[1, 2]", "application/json"),
                           (b"", "application/json"), (b"<x/>", "application/xml")):
        response = await client.post(LOGIN, params={"APIKey": api_key}, content=content,
                                     headers={"content-type": ctype})
        assert 400 <= response.status_code < 500, (content, response.status_code)
        assert "Message" in response.json()
    typed = await client.post(LOGIN, params={"APIKey": api_key},
                              json={"userName": ["x"], "password": 1})
    assert typed.status_code == 400
    wrong_method = await client.get(LOGIN, params={"APIKey": api_key})
    assert wrong_method.status_code == 405
    assert "Message" in wrong_method.json()


@pytest.mark.parametrize("ending", ["password", "disabled"])
async def test_a_new_password_or_a_disabled_account_ends_reauthentication_tokens(
        client, core, realm, api_key, member, ending):
    """A re-authentication token signs in without the password: a password reset (the usual
    recovery from a stolen one) or disabling the account must end it, not only the sessions."""
    stolen = (await client.post(LOGIN, params={"APIKey": api_key}, json=login_body(
        member["email"], deviceName="pixel", generateReAuthenticationToken=True))).json()
    if ending == "password":
        await core.users.set_password(realm, member["id"], "a brand new passphrase")
    else:
        await core.users.set_status(realm, member["id"], "disabled")
        await core.users.set_status(realm, member["id"], "active")  # and back again
    replayed = await client.post(TOKEN_LOGIN, params={"APIKey": api_key},
                                 json={"reAuthenticationToken": stolen["ReAuthenticationToken"]})
    assert replayed.status_code == 401, replayed.text
