"""The deskera dialect (seed 000): replays of its documented requests, remembered devices, the
MFA branch with a real TOTP code, refresh, status, logout, sign-up, verification and reset.

Deskera serves the default realm, so every test uses e-mails of its own.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pyotp
import pytest

from authgate.core.engine import Core
from authgate.core.users import NewUser
from tests.conftest import PASSWORD, unique_email

BASE = "/deskera/v1/iam/auth"
SIGN_IN = f"{BASE}/sign-in/web/sign-in"
MFA_SIGN_IN = f"{BASE}/sign-in/web/mfa-signin"
FAILED = "Failed to authenticate user credentials."


async def deskera_user(core: Core, **profile: Any) -> str:
    realm = await core.realms.require(core.settings.deskera_realm)
    email = unique_email("deskera")
    await core.users.create(realm, NewUser(email=email, password=PASSWORD, **profile))
    return email


async def sign_in(client: httpx.AsyncClient, email: str, password: str = PASSWORD,
                  **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", None)
    return await client.post(SIGN_IN, json={"userName": email, "password": password, **extra},
                             headers=headers)


def unverified_claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


async def test_documented_web_sign_in_returns_the_authentication_result_type(client, core):
    email = await deskera_user(core)
    # The seed's WebSignInRequest: {password, userName}.
    response = await client.post(SIGN_IN, json={"password": PASSWORD, "userName": email})
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"accessToken", "expiresIn", "idToken", "newDeviceMetadata",
                         "refreshToken", "tokenType", "emailVerified", "isTrialUser",
                         "isMFAEnabled", "guid"}
    assert body["expiresIn"] == 3600
    assert body["tokenType"] == "Bearer"
    assert body["isMFAEnabled"] is False
    assert body["isTrialUser"] is False
    assert body["emailVerified"] is False
    metadata = body["newDeviceMetadata"]
    assert set(metadata) == {"deviceGroupKey", "deviceKey"}
    assert metadata["deviceKey"] and metadata["deviceGroupKey"]
    access = unverified_claims(body["accessToken"])
    assert access["exp"] - access["iat"] == 3600
    assert access["sub"] == body["guid"]
    assert unverified_claims(body["idToken"])["email"] == email
    assert response.headers["cache-control"] == "no-store"


async def test_optional_sign_in_fields_are_accepted(client, core):
    email = await deskera_user(core)
    response = await sign_in(client, email, isMobile=True, inviteCode="abc",
                             referer="https://example.com")
    assert response.status_code == 200
    assert response.json()["accessToken"]


async def test_remembered_device_gets_no_new_device_metadata(client, core):
    email = await deskera_user(core)
    first = (await sign_in(client, email)).json()["newDeviceMetadata"]
    second = await sign_in(client, email, deviceKey=first["deviceKey"])
    assert second.status_code == 200
    assert "newDeviceMetadata" not in second.json()
    # The x-device-key header is the other way to present the key.
    third = await sign_in(client, email, headers={"x-device-key": first["deviceKey"]})
    assert "newDeviceMetadata" not in third.json()
    # A sign-in without the key is a new device, in the same device group.
    other = (await sign_in(client, email)).json()["newDeviceMetadata"]
    assert other["deviceKey"] != first["deviceKey"]
    assert other["deviceGroupKey"] == first["deviceGroupKey"]


async def test_someone_elses_device_key_is_not_remembered(client, core):
    owner, stranger = await deskera_user(core), await deskera_user(core)
    key = (await sign_in(client, owner)).json()["newDeviceMetadata"]["deviceKey"]
    response = await sign_in(client, stranger, deviceKey=key)
    assert response.json()["newDeviceMetadata"]["deviceKey"] != key


async def test_revoked_device_is_no_longer_remembered(client, core):
    email = await deskera_user(core)
    body = (await sign_in(client, email)).json()
    key = body["newDeviceMetadata"]["deviceKey"]
    headers = {"Authorization": f"Bearer {body['accessToken']}"}
    devices = (await client.get("/devices", headers=headers)).json()["devices"]
    assert [d["current"] for d in devices] == [True]
    assert (await client.delete(f"/devices/{devices[0]['id']}", headers=headers)).status_code == 204
    # Revoking the device ended its session, and its key now gets a new device.
    status = await client.get(f"{BASE}/sign-in/login/status",
                              headers={"x-access-token": body["accessToken"]})
    assert status.status_code == 404
    again = await sign_in(client, email, deviceKey=key)
    assert again.json()["newDeviceMetadata"]["deviceKey"] != key


async def test_wrong_password_and_unknown_user_fail_alike(client, core):
    email = await deskera_user(core)
    wrong = await sign_in(client, email, "not the password at all")
    unknown = await sign_in(client, unique_email("nobody"))
    for response in (wrong, unknown):
        assert response.status_code == 400
        assert response.json() == {"errorMessage": FAILED}


async def test_malformed_sign_in_requests_get_error_messages_not_500s(client):
    missing = await client.post(SIGN_IN, json={"userName": "someone@example.com"})
    assert missing.status_code == 400
    assert "password" in missing.json()["errorMessage"]
    broken = await client.post(SIGN_IN, content=b"{not json",
                               headers={"content-type": "application/json"})
    assert broken.status_code == 400
    assert "errorMessage" in broken.json()
    typed = await client.post(SIGN_IN, json={"userName": 5, "password": ["x"]})
    assert typed.status_code == 400


@pytest.fixture
async def own_address_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client from an address of its own, so the per-address failure counter of the shared
    default realm is not spent by other tests."""
    address = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    transport = httpx.ASGITransport(app=app, client=(address, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://authgate.test") as c:
        yield c


async def test_failed_attempts_lock_the_login_out(own_address_client, core):
    client = own_address_client
    email = await deskera_user(core)
    statuses = [(await sign_in(client, email, "wrong password number x")).status_code
                for _ in range(core.settings.throttle_free_attempts + 1)]
    assert statuses[0] == 400
    locked = await sign_in(client, email, "wrong password number x")
    assert locked.status_code == 403
    assert "locked" in locked.json()["errorMessage"]
    assert int(locked.headers["retry-after"]) >= 1


async def test_remembered_device_is_not_locked_out_by_strangers(own_address_client, core):
    client = own_address_client
    email = await deskera_user(core)
    key = (await sign_in(client, email)).json()["newDeviceMetadata"]["deviceKey"]
    for _ in range(core.settings.throttle_free_attempts + 2):
        await sign_in(client, email, "a stranger's guess")
    assert (await sign_in(client, email)).status_code == 403
    owner = await sign_in(client, email, deviceKey=key)
    assert owner.status_code == 200


async def test_refresh_token_endpoints_rotate_tokens(client, core):
    email = await deskera_user(core)
    body = (await sign_in(client, email)).json()
    token = body["refreshToken"]
    for kind in ("web", "mobile", "app"):
        response = await client.post(f"{BASE}/{kind}/getrefreshtoken",
                                     json={"refreshToken": token, "tenantId": "1",
                                           "userName": email})
        assert response.status_code == 200, response.text
        refreshed = response.json()
        assert refreshed["expiresIn"] == 3600
        assert refreshed["tokenType"] == "Bearer"
        assert refreshed["guid"] == body["guid"]
        assert "newDeviceMetadata" not in refreshed
        assert refreshed["refreshToken"] != token
        token = refreshed["refreshToken"]
    bad = await client.post(f"{BASE}/web/getrefreshtoken", json={"refreshToken": "nope"})
    assert bad.status_code == 401
    assert "errorMessage" in bad.json()


async def test_login_status_and_logout_use_the_x_access_token(client, core):
    email = await deskera_user(core)
    body = (await sign_in(client, email)).json()
    headers = {"x-access-token": body["accessToken"]}
    status = await client.get(f"{BASE}/sign-in/login/status", headers=headers)
    assert status.status_code == 200
    assert status.json()["accessToken"] == body["accessToken"]
    assert status.json()["guid"] == body["guid"]
    assert 0 < status.json()["expiresIn"] <= 3600
    assert (await client.get(f"{BASE}/logout", headers=headers)).status_code == 200
    after = await client.get(f"{BASE}/sign-in/login/status", headers=headers)
    assert after.status_code == 404
    assert "errorMessage" in after.json()
    assert (await client.get(f"{BASE}/logout", headers=headers)).status_code == 401
    refreshed = await client.post(f"{BASE}/web/getrefreshtoken",
                                  json={"refreshToken": body["refreshToken"]})
    assert refreshed.status_code == 401


async def test_login_status_without_a_token_is_404(client):
    response = await client.get(f"{BASE}/sign-in/login/status")
    assert response.status_code == 404
    assert response.json()["errorMessage"]


async def enrol_totp(client: httpx.AsyncClient, access_token: str) -> pyotp.TOTP:
    headers = {"Authorization": f"Bearer {access_token}"}
    enrolment = await client.post("/mfa/totp", headers=headers)
    assert enrolment.status_code == 200
    assert enrolment.json()["otpauth_uri"].startswith("otpauth://totp/")
    totp = pyotp.TOTP(enrolment.json()["secret"])
    confirmed = await client.post("/mfa/totp/confirm", json={"code": totp.now()},
                                  headers=headers)
    assert confirmed.status_code == 200, confirmed.text
    assert len(confirmed.json()["recovery_codes"]) == 10
    return totp


async def test_mfa_branch_answers_only_is_mfa_enabled_then_signs_in_with_a_totp_code(client,
                                                                                    core):
    email = await deskera_user(core)
    first = (await sign_in(client, email)).json()
    totp = await enrol_totp(client, first["accessToken"])

    branch = await sign_in(client, email)
    assert branch.status_code == 200
    assert branch.json() == {"isMFAEnabled": True}

    code = totp.at(time.time() + 30)  # the next step: the current one was spent confirming
    response = await client.post(MFA_SIGN_IN, json={"userName": email, "password": PASSWORD,
                                                     "mfaCode": code})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["isMFAEnabled"] is True
    assert body["accessToken"] and body["refreshToken"] and body["idToken"]
    assert unverified_claims(body["accessToken"])["amr"] == ["pwd", "otp", "mfa"]

    replay = await client.post(MFA_SIGN_IN, json={"userName": email, "password": PASSWORD,
                                                   "mfaCode": code})
    assert replay.status_code == 400
    assert replay.json() == {"errorMessage": "Invalid MFA code."}


async def test_mfa_sign_in_refuses_a_wrong_code_and_a_wrong_password(client, core):
    email = await deskera_user(core)
    first = (await sign_in(client, email)).json()
    totp = await enrol_totp(client, first["accessToken"])
    wrong_code = await client.post(MFA_SIGN_IN, json={"userName": email, "password": PASSWORD,
                                                       "mfaCode": "000000" if totp.now() !=
                                                       "000000" else "111111"})
    assert wrong_code.status_code == 400
    wrong_password = await client.post(MFA_SIGN_IN, json={
        "userName": email, "password": "wrong password here", "mfaCode": totp.now()})
    assert wrong_password.json() == {"errorMessage": FAILED}


async def test_sign_up_sends_a_verification_link_that_verifies_once(live_server, smtp_server):
    mailbox, _ = smtp_server
    email = unique_email("signup")
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        created = await http.post(f"{BASE}/sign-up/web", json={
            "userName": email, "password": PASSWORD, "firstName": "Ada", "lastName": "Byron"})
        assert created.status_code == 200, created.text
        assert created.json()["emailVerified"] is False
        guid = created.json()["guid"]
        again = await http.post(f"{BASE}/sign-up/web", json={"userName": email,
                                                             "password": PASSWORD})
        assert again.status_code == 400
        assert again.json() == {"errorMessage": "User with same username is already exist."}

        message = await mailbox.wait_for(email)
        text = message.get_payload(decode=True).decode()
        link = re.search(r"(http\S+/deskera/v1/iam/auth/email/verification\?\S+)", text)
        assert link, text
        url = httpx.URL(link.group(1))
        assert url.params["user"] == guid
        verified = await http.get(url.path, params=dict(url.params))
        assert verified.status_code == 200
        assert verified.json()["emailVerified"] is True
        signed_in = await http.post(SIGN_IN, json={"userName": email, "password": PASSWORD})
        assert signed_in.json()["emailVerified"] is True

        used = await http.get(url.path, params=dict(url.params))
        assert used.status_code == 404
        forged = await http.get(url.path, params={"token": "forged", "user": guid})
        assert forged.status_code == 404
        assert forged.json()["errorMessage"]


async def test_password_forgot_and_confirm_reset_the_password(live_server, smtp_server, core):
    mailbox, _ = smtp_server
    email = await deskera_user(core)
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        old = (await http.post(SIGN_IN, json={"userName": email, "password": PASSWORD})).json()
        forgot = await http.post(f"{BASE}/password/forgot", json={"userName": email})
        assert forgot.status_code == 200
        unknown = await http.post(f"{BASE}/password/forgot",
                                  json={"userName": unique_email("nobody")})
        assert unknown.status_code == 200
        assert unknown.json() == forgot.json()

        message = await mailbox.wait_for(email)
        code = re.search(r"password: (\d{6})", message.get_payload(decode=True).decode())
        assert code
        new_password = "a brand new passphrase 42"
        wrong = await http.post(f"{BASE}/password/confirm", json={
            "userName": email, "confirmationCode": "000000" if code.group(1) != "000000"
            else "111111", "password": new_password})
        assert wrong.status_code == 400
        confirmed = await http.post(f"{BASE}/password/confirm", json={
            "userName": email, "confirmationCode": code.group(1), "password": new_password})
        assert confirmed.status_code == 200, confirmed.text
        assert (await http.post(SIGN_IN, json={"userName": email, "password": PASSWORD})
                ).status_code == 400
        assert (await http.post(SIGN_IN, json={"userName": email, "password": new_password})
                ).status_code == 200
        # The reset ended the sessions started with the old password.
        status = await http.get(f"{BASE}/sign-in/login/status",
                                headers={"x-access-token": old["accessToken"]})
        assert status.status_code == 404
        reused = await http.post(f"{BASE}/password/confirm", json={
            "userName": email, "confirmationCode": code.group(1), "password": new_password})
        assert reused.status_code == 400


async def test_expired_verification_link_is_410(core, settings, live_server, smtp_server):
    from datetime import timedelta

    from authgate.api.app import create_app
    from authgate.config import load_master_secret
    from authgate.core.models import utcnow

    mailbox, _ = smtp_server
    email = unique_email("late")
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        created = await http.post(f"{BASE}/sign-up/web", json={"userName": email,
                                                               "password": PASSWORD})
    assert created.status_code == 200
    text = (await mailbox.wait_for(email)).get_payload(decode=True).decode()
    token = re.search(r"token=([^&\s]+)", text).group(1)
    realm = await core.realms.require(core.settings.deskera_realm)
    # The same store, seen through a core whose clock is a day and a minute ahead.
    later = Core(settings, core.store, load_master_secret(settings),
                 clock=lambda: utcnow() + timedelta(days=1, minutes=1))
    try:
        transport = httpx.ASGITransport(app=create_app(settings, later))
        async with httpx.AsyncClient(transport=transport, base_url="http://authgate.test") as c:
            response = await c.get(f"{BASE}/email/verification",
                                   params={"token": token, "user": created.json()["guid"]})
        assert response.status_code == 410
        assert response.json() == {"errorMessage": "Verification link expired."}
    finally:
        later.hasher.close()
    assert (await core.users.get(realm, created.json()["guid"])).email_verified is False


async def test_mfa_is_still_asked_on_a_remembered_device(client, core):
    email = await deskera_user(core)
    first = (await sign_in(client, email)).json()
    key = first["newDeviceMetadata"]["deviceKey"]
    totp = await enrol_totp(client, first["accessToken"])
    branch = await sign_in(client, email, deviceKey=key)
    assert branch.json() == {"isMFAEnabled": True}
    done = await client.post(MFA_SIGN_IN, json={"userName": email, "password": PASSWORD,
                                                 "mfaCode": totp.at(time.time() + 30),
                                                 "deviceKey": key})
    assert done.status_code == 200
    assert "newDeviceMetadata" not in done.json()
