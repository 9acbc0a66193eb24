"""The Tiledesk dialect: seed 001 replayed, tiledesk-server's answers (routes/auth.js), custom
tokens signed by a customer backend with PyJWT, and e-mail flows through the real SMTP server.

The dialect serves ``settings.tiledesk_realm`` (the default realm), so every test uses e-mails of
its own; tests that change realm settings serve a realm of their own through an app of their own.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from authgate.api.app import create_app
from authgate.core.engine import Core
from authgate.core.models import Organisation, Realm
from authgate.mail.worker import OutboxWorker
from tests.conftest import PASSWORD, unique_email
from tests.tiledesk_helpers import admin_token, deliver_and_read, json_of, mailed_link

ISSUER = "http://authgate.test"
NEW_PASSWORD = "a different long passphrase"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": token}


def claims_of(token: str) -> dict[str, Any]:
    assert token.startswith("JWT ")
    return jwt.decode(token[4:], options={"verify_signature": False})


async def signup(client: httpx.AsyncClient, email: str, password: str = PASSWORD,
                 prefix: str = "/tiledesk/v2", **extra: Any) -> httpx.Response:
    return await client.post(f"{prefix}/auth/signup", json={
        "email": email, "password": password, "firstname": "Andrea", "lastname": "Leo",
        **extra})


async def signin(client: httpx.AsyncClient, email: str, password: str = PASSWORD,
                 prefix: str = "/tiledesk/v2") -> httpx.Response:
    return await client.post(f"{prefix}/auth/signin", json={"email": email,
                                                           "password": password})


async def signed_in(client: httpx.AsyncClient) -> tuple[str, str]:
    email = unique_email("td")
    assert (await signup(client, email, disableEmail=True)).status_code == 200
    response = await signin(client, email)
    assert response.status_code == 200, response.text
    return email, response.json()["token"]


async def project(core: Core, *, secret: bool = True) -> tuple[Organisation, str | None]:
    realm = await core.realms.require("default")
    org = await core.organisations.create(realm, f"project-{uuid.uuid4().hex[:12]}")
    return org, (await core.organisations.rotate_secret(realm, org) if secret else None)


def customer_token(org: Organisation, secret: str, **overrides: Any) -> str:
    """What a customer's backend does: sign its user with the project's secret (HS256)."""
    claims: dict[str, Any] = {"_id": f"ext-{uuid.uuid4().hex[:8]}", "firstname": "andrea",
                              "lastname": "leo", "email": "email2@email.com",
                              "customAttr": "c1", "sub": "userexternal",
                              "aud": f"{ISSUER}/projects/{org.id}"}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, secret, algorithm="HS256")


# Seed 001: /v2/auth/signin.

async def test_signin_replays_seed_and_answers_a_jwt_token_with_tiledesk_claims(client):
    email = unique_email("td")
    assert (await signup(client, email, disableEmail=True)).status_code == 200
    response = await signin(client, email.upper())
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["token"].startswith("JWT ")
    assert set(body["user"]) == {"_id", "email", "firstname", "lastname", "emailverified"}
    assert body["user"]["email"] == email
    assert body["user"]["firstname"] == "Andrea" and body["user"]["lastname"] == "Leo"
    assert "password" not in body["user"]
    claims = claims_of(body["token"])
    assert claims["sub"] == "user"
    assert claims["_id"] == body["user"]["_id"]
    assert claims["iss"] == ISSUER and claims["aud"] == ISSUER
    assert claims["jti"] and claims["sid"]
    assert claims["exp"] - claims["iat"] == 86_400  # Tiledesk's never expire; ours do


async def test_signin_is_served_under_auth_and_v2_auth(client):
    email, _ = await signed_in(client)
    for prefix in ("/tiledesk", "/tiledesk/v2"):
        response = await signin(client, email, prefix=prefix)
        assert response.status_code == 200, prefix


async def test_signin_without_fields_answers_express_validator_422(client):
    response = await client.post("/tiledesk/auth/signin", json={})
    assert response.status_code == 422
    assert response.json() == {"errors": [
        {"msg": "Invalid value", "param": "email", "location": "body"},
        {"msg": "Invalid value", "param": "password", "location": "body"}]}
    response = await client.post("/tiledesk/auth/signin", json={"email": "nope",
                                                                "password": "x"})
    assert response.status_code == 422
    assert response.json()["errors"] == [{"msg": "Invalid value", "param": "email",
                                          "location": "body", "value": "nope"}]


async def test_unknown_email_and_wrong_password_answer_alike_by_default(client):
    email, _ = await signed_in(client)
    unknown = await signin(client, unique_email("nobody"))
    wrong = await signin(client, email, "not the password at all")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json() == {
        "success": False, "msg": "Authentication failed. Wrong email or password."}


@pytest.fixture
async def revealing(core: Core, settings, realm: Realm) -> AsyncIterator[httpx.AsyncClient]:
    """The dialect serving a realm of this test's own that reveals unknown users."""
    await core.realms.update_settings(realm, {"reveal_unknown_users": True})
    app = create_app(settings.model_copy(update={"tiledesk_realm": realm.name}), core)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50001))
    async with httpx.AsyncClient(transport=transport, base_url="http://authgate.test") as c:
        yield c


async def test_a_realm_that_reveals_unknown_users_gets_tiledesks_two_messages(revealing):
    email, _ = await signed_in(revealing)
    unknown = await signin(revealing, unique_email("nobody"))
    assert unknown.status_code == 401
    assert unknown.json() == {"success": False, "msg": "Authentication failed. User not found."}
    wrong = await signin(revealing, email, "not the password at all")
    assert wrong.status_code == 401
    assert wrong.json() == {"success": False, "msg": "Authentication failed. Wrong password."}
    forgot = await revealing.put("/tiledesk/auth/requestresetpsw",
                                 json={"email": unique_email("nobody")})
    assert forgot.status_code == 200
    assert forgot.json() == {"success": False, "msg": "User not found."}


async def test_there_is_no_super_password(client):
    email, _ = await signed_in(client)
    for backdoor in ("superadmin", "SUPER_PASSWORD"):
        response = await signin(client, email, backdoor)
        assert response.status_code == 401
        assert response.json()["success"] is False


async def test_malformed_json_is_a_tiledesk_error_not_a_500(client):
    response = await client.post("/tiledesk/auth/signin", content=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["success"] is False


# Seed 001: /v2/auth/signup, and the verification mail it sends.

async def test_signup_replays_seed_and_mails_a_verification_link_that_verifies(
        client, core, smtp_server):
    box, _ = smtp_server
    email = unique_email("TdSignup")
    response = await signup(client, email)
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["msg"] == "Successfully created new user."
    user = body["user"]
    assert user["email"] == email.lower()  # tiledesk-server stores e-mails in lower case
    assert user["emailverified"] is False
    assert user["status"] == 100 and user["__v"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", user["createdAt"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", user["updatedAt"])
    assert {"_id", "firstname", "lastname"} <= set(user) and "password" not in user

    link = mailed_link(await deliver_and_read(core, box, email.lower()))
    found = re.search(r"/#/verify/email/([^/]+)/(\S+)$", link)
    assert found, link
    user_id, code = found.groups()
    assert user_id == user["_id"]

    other = await client.put(f"/tiledesk/auth/verifyemail/{uuid.uuid4()}/{code}")
    assert other.status_code == 401
    assert other.json() == {"success": False, "error": "Trying to use a verification code "
                            "from another user.", "error_code": 10006}

    verified = await client.put(f"/tiledesk/v2/auth/verifyemail/{user_id}/{code}",
                                json={"emailverified": True})
    assert verified.status_code == 200
    assert verified.json()["emailverified"] is True
    assert verified.json()["_id"] == user_id

    again = await client.put(f"/tiledesk/auth/verifyemail/{user_id}/{code}")
    assert again.status_code == 401
    assert again.json() == {"success": False, "error": "Unable to verify email: the "
                            "verification code is expired or invalid.", "error_code": 10005}
    fresh = (await signin(client, email)).json()["token"]
    me = await client.get("/tiledesk/users", headers=auth(fresh))
    assert me.json()["emailverified"] is True


async def test_signup_with_disable_email_sends_no_mail(client, core, smtp_server):
    box, _ = smtp_server
    email = unique_email("quiet")
    assert (await signup(client, email, disableEmail=True)).status_code == 200
    await OutboxWorker(core).run_once()
    assert box.count_to(email) == 0


async def test_signup_refusals_have_tiledesks_statuses_and_bodies(client):
    bad_email = await signup(client, "not-an-email")
    assert bad_email.status_code == 422
    assert bad_email.json()["errors"] == [{"msg": "Invalid value", "param": "email",
                                           "location": "body", "value": "not-an-email"}]

    no_names = await client.post("/tiledesk/auth/signup", json={
        "email": unique_email(), "password": PASSWORD, "firstname": "", "lastname": None})
    assert no_names.status_code == 422
    assert [e["param"] for e in no_names.json()["errors"]] == ["firstname", "lastname"]

    no_password = await client.post("/tiledesk/auth/signup", json={
        "email": unique_email(), "firstname": "a", "lastname": "b"})
    assert no_password.status_code == 200
    assert no_password.json() == {"success": False, "msg": "Please pass email and password."}

    email = unique_email("dup")
    assert (await signup(client, email, disableEmail=True)).status_code == 200
    duplicate = await signup(client, email.upper(), disableEmail=True)
    assert duplicate.status_code == 403
    assert duplicate.json() == {"success": False, "message": "Email already registered"}

    weak = await signup(client, unique_email(), password="short")
    assert weak.status_code == 403
    assert weak.json()["message"] == ("The password does not meet the minimum vulnerability "
                                      "requirements")

    bad_phone = await signup(client, unique_email(), phone="call me maybe")
    assert bad_phone.status_code == 422
    assert bad_phone.json()["errors"][0]["param"] == "phone"


# Tokens: Authorization: JWT <jwt>, expiring and revocable.

async def test_get_users_answers_me_with_a_jwt_token(client):
    email, token = await signed_in(client)
    for path in ("/tiledesk/users", "/tiledesk/users/", "/tiledesk/v2/users"):
        response = await client.get(path, headers=auth(token))
        assert response.status_code == 200, path
        assert response.json()["email"] == email
        assert set(response.json()) == {"_id", "email", "firstname", "lastname",
                                        "emailverified"}


async def test_missing_forged_or_bearer_tokens_are_unauthorized(client):
    _, token = await signed_in(client)
    forged_claims = {**claims_of(token)}
    guessed = "a guessed secret of thirty-two bytes!"
    forged = "JWT " + jwt.encode(forged_claims, guessed, algorithm="HS256")
    unsigned = "JWT " + jwt.encode(forged_claims, None, algorithm="none")
    for headers in ({}, {"Authorization": "Bearer " + token[4:]}, auth(forged),
                    auth(unsigned), auth("JWT garbage")):
        response = await client.get("/tiledesk/users", headers=headers)
        assert response.status_code == 401, headers
        assert response.text == "Unauthorized"


async def test_tiledesk_and_native_tokens_are_not_interchangeable(client, core):
    email, token = await signed_in(client)
    native = await client.get("/userinfo", headers={"Authorization": "Bearer " + token[4:]})
    assert native.status_code == 401
    grant = await client.post("/oauth/token", data={
        "grant_type": "password", "username": email, "password": PASSWORD})
    assert grant.status_code == 200
    access = grant.json()["access_token"]
    response = await client.get("/tiledesk/users", headers=auth("JWT " + access))
    assert response.status_code == 401


async def test_a_revoked_session_ends_its_token(client, core):
    _, token = await signed_in(client)
    realm = await core.realms.require("default")
    assert await core.sessions.revoke(realm, claims_of(token)["sid"])
    response = await client.get("/tiledesk/users", headers=auth(token))
    assert response.status_code == 401


async def test_change_password_checks_the_old_one_and_ends_other_sessions(client):
    email, token = await signed_in(client)
    other = (await signin(client, email)).json()["token"]

    wrong = await client.put("/tiledesk/users/changepsw", headers=auth(token),
                             json={"oldpsw": "not it at all", "newpsw": NEW_PASSWORD})
    assert wrong.status_code == 401
    assert wrong.json() == {"success": False, "msg": "Current password is invalid."}

    same = await client.put("/tiledesk/users/changepsw", headers=auth(token),
                            json={"oldpsw": PASSWORD, "newpsw": PASSWORD})
    assert same.status_code == 403
    assert same.json() == {"success": False, "message": "The new password must be different "
                           "from the previous one."}

    missing = await client.put("/tiledesk/users/changepsw", headers=auth(token), json={})
    assert missing.status_code == 422

    changed = await client.put("/tiledesk/v2/users/changepsw", headers=auth(token),
                               json={"oldpsw": PASSWORD, "newpsw": NEW_PASSWORD})
    assert changed.status_code == 200
    assert changed.json() == {"message": "Password change successful"}
    assert (await client.get("/tiledesk/users", headers=auth(token))).status_code == 200
    assert (await client.get("/tiledesk/users", headers=auth(other))).status_code == 401
    assert (await signin(client, email)).status_code == 401
    assert (await signin(client, email, NEW_PASSWORD)).status_code == 200


# Seed 001: /v2/auth/signinAnonymously.

async def test_signin_anonymously_replays_seed_and_makes_a_guest_member(client, core):
    org, _ = await project(core, secret=False)
    response = await client.post("/tiledesk/v2/auth/signinAnonymously", json={
        "id_project": org.id, "email": "email@email.com", "attributes": {"plan": "free"}})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    user = body["user"]
    assert {"_id", "email", "emailverified", "createdAt", "updatedAt", "__v"} <= set(user)
    assert user["email"] == "email@email.com"
    assert user["emailverified"] is False and user["__v"] == 0
    assert re.fullmatch(r"guest#[0-9a-f]{4}", user["firstname"])
    assert user["attributes"] == {"plan": "free"}
    claims = claims_of(body["token"])
    assert claims["sub"] == "guest" and claims["_id"] == user["_id"]
    membership = await core.organisations.membership(org, user["_id"])
    assert membership is not None and membership.roles == ["guest"]

    me = await client.get("/tiledesk/users", headers=auth(body["token"]))
    assert me.status_code == 200 and me.json()["_id"] == user["_id"]

    # A guest's e-mail is contact data, not a login id: a second guest may give the same one.
    again = await client.post("/tiledesk/auth/signinAnonymously", json={
        "id_project": org.id, "email": "email@email.com", "firstname": "Ann"})
    assert again.status_code == 200
    assert again.json()["user"]["firstname"] == "Ann"
    assert again.json()["user"]["_id"] != user["_id"]


async def test_signin_anonymously_refusals(client, core):
    missing = await client.post("/tiledesk/auth/signinAnonymously", json={})
    assert missing.status_code == 422
    assert missing.json() == {"errors": [{"msg": "Invalid value", "param": "id_project",
                                          "location": "body"}]}
    for id_project in (str(uuid.uuid4()), "5ab11c6b83dc240014d46095", 42):
        unknown = await client.post("/tiledesk/auth/signinAnonymously",
                                    json={"id_project": id_project})
        assert unknown.status_code == 404
        assert unknown.json() == {"success": False, "msg": "Project not found.",
                                  "error_code": 11001}
    org, _ = await project(core, secret=False)
    bad_attributes = await client.post("/tiledesk/auth/signinAnonymously", json={
        "id_project": org.id, "attributes": "not an object"})
    assert bad_attributes.status_code == 422
    assert bad_attributes.json()["errors"][0]["param"] == "attributes"
    realm = await core.realms.require("default")
    await core.organisations.update(realm, org.id, {"is_active": False})
    inactive = await client.post("/tiledesk/auth/signinAnonymously",
                                 json={"id_project": org.id})
    assert inactive.status_code == 403
    assert inactive.json()["success"] is False


# Seed 001: /v2/auth/signinWithCustomToken.

async def test_a_customer_signed_token_signs_its_user_in_as_a_member(client, core):
    headers = await admin_token(client, core)
    created = await client.post("/admin/realms/default/organisations", headers=headers,
                                json={"name": f"customer-{uuid.uuid4().hex[:10]}"})
    assert created.status_code == 201
    org_id = created.json()["id"]
    rotated = await client.post(f"/admin/realms/default/organisations/{org_id}/secret",
                                headers=headers)
    assert rotated.status_code == 200
    secret = rotated.json()["secret"]
    org = await core.organisations.get(await core.realms.require("default"), org_id)

    external_id = f"customer-user-{uuid.uuid4().hex[:6]}"
    token = customer_token(org, secret, _id=external_id)
    response = await client.post("/tiledesk/v2/auth/signinWithCustomToken",
                                 headers=auth("JWT " + token))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert body["user"]["email"] == "email2@email.com"
    assert body["user"]["firstname"] == "andrea"
    assert body["user"]["customAttr"] == "c1"
    assert body["user"]["externalId"] == external_id
    assert body["token"].startswith("JWT ") and body["token"] != "JWT " + token
    claims = claims_of(body["token"])
    assert claims["sub"] == "userexternal" and claims["_id"] == body["user"]["_id"]
    assert claims["id_project"] == org.id and claims["role"] == "user"
    membership = await core.organisations.membership(org, body["user"]["_id"])
    assert membership is not None and membership.roles == ["user"]
    me = await client.get("/tiledesk/users", headers=auth(body["token"]))
    assert me.status_code == 200 and me.json()["_id"] == body["user"]["_id"]

    # The same customer token again: the same user, a new session.
    again = await client.post("/tiledesk/auth/signinWithCustomToken",
                              headers=auth("JWT " + token))
    assert again.status_code == 200
    assert again.json()["user"]["_id"] == body["user"]["_id"]
    assert claims_of(again.json()["token"])["sid"] != claims["sid"]


async def test_a_customer_token_role_becomes_the_membership_role(client, core):
    org, secret = await project(core)
    assert secret is not None
    response = await client.post("/tiledesk/auth/signinWithCustomToken", headers=auth(
        "JWT " + customer_token(org, secret, role="admin")))
    assert response.status_code == 200
    membership = await core.organisations.membership(org, response.json()["user"]["_id"])
    assert membership is not None and membership.roles == ["admin"]


async def test_the_same_external_id_in_two_projects_is_two_users(client, core):
    first, first_secret = await project(core)
    second, second_secret = await project(core)
    assert first_secret and second_secret
    one = await client.post("/tiledesk/auth/signinWithCustomToken", headers=auth(
        "JWT " + customer_token(first, first_secret, _id="123")))
    two = await client.post("/tiledesk/auth/signinWithCustomToken", headers=auth(
        "JWT " + customer_token(second, second_secret, _id="123")))
    assert one.status_code == two.status_code == 200
    assert one.json()["user"]["_id"] != two.json()["user"]["_id"]


async def test_customer_tokens_that_must_be_refused(client, core):
    org, secret = await project(core)
    other, other_secret = await project(core)
    assert secret and other_secret
    now = int(time.time())
    refused = {
        "wrong secret": customer_token(org, secret + "1234567KOOOOOOO"),
        "expired": customer_token(org, secret, iat=now - 7200, exp=now - 3600),
        "alg none": jwt.encode({"_id": "1", "sub": "userexternal",
                                "aud": f"{ISSUER}/projects/{org.id}"}, None, algorithm="none"),
        "no _id": customer_token(org, secret, _id=None),
        "another project's secret": customer_token(org, other_secret),
        "no secret yet": customer_token((await project(core, secret=False))[0], secret),
        "unknown project": customer_token(org, secret,
                                          aud=f"{ISSUER}/projects/{uuid.uuid4()}"),
        "foreign issuer": customer_token(org, secret,
                                         aud=f"https://tiledesk.example/projects/{org.id}"),
        "garbage": "not.a.jwt",
    }
    for name, token in refused.items():
        response = await client.post("/tiledesk/auth/signinWithCustomToken",
                                     headers=auth("JWT " + token))
        assert response.status_code == 401, name
        assert response.text == "Unauthorized", name
    no_header = await client.post("/tiledesk/auth/signinWithCustomToken")
    assert no_header.status_code == 401

    for claims, message in (({"role": "superuser"}, "Unknown role."),
                            ({"email": "not-an-email"}, "The token's email claim is invalid.")):
        response = await client.post("/tiledesk/auth/signinWithCustomToken", headers=auth(
            "JWT " + customer_token(org, secret, **claims)))
        assert response.status_code == 400
        assert response.json() == {"success": False, "msg": message}

    no_aud = await client.post("/tiledesk/auth/signinWithCustomToken", headers=auth(
        "JWT " + customer_token(org, secret, aud=None)))
    assert no_aud.status_code == 400
    assert no_aud.json() == {"success": False, "msg": "JWT Aud field is required"}


async def test_an_inactive_membership_is_refused(client, core):
    org, secret = await project(core)
    assert secret
    token = "JWT " + customer_token(org, secret, _id="blocked-user")
    first = await client.post("/tiledesk/auth/signinWithCustomToken", headers=auth(token))
    assert first.status_code == 200
    realm = await core.realms.require("default")
    await core.organisations.add_member(realm, org, first.json()["user"]["_id"],
                                        roles=["user"], status="inactive")
    response = await client.post("/tiledesk/auth/signinWithCustomToken", headers=auth(token))
    assert response.status_code == 401
    assert response.json() == {"success": False,
                               "msg": "Authentication failed. Project_user not active."}


# Password reset through the real SMTP server.

async def test_password_reset_by_mailed_key_ends_sessions_and_is_single_use(
        client, core, smtp_server):
    box, _ = smtp_server
    email, token = await signed_in(client)
    requested = await client.put("/tiledesk/auth/requestresetpsw", json={"email": email})
    assert requested.status_code == 200
    assert requested.json() == {"success": True,
                                "message": "An email has been sent to reset your password"}
    link = mailed_link(await deliver_and_read(core, box, email))
    found = re.search(r"/#/resetpassword/(\S+)$", link)
    assert found, link
    key = found.group(1)

    checked = await client.get(f"/tiledesk/auth/checkpswresetkey/{key}")
    assert checked.status_code == 200
    assert checked.json()["message"] == "Valid password reset key"
    assert checked.json()["user"]["email"] == email

    weak = await client.put(f"/tiledesk/auth/resetpsw/{key}", json={"password": "short"})
    assert weak.status_code == 403  # a refused password does not use the key up
    missing = await client.put(f"/tiledesk/auth/resetpsw/{key}", json={})
    assert missing.status_code == 422

    reset = await client.put(f"/tiledesk/v2/auth/resetpsw/{key}",
                             json={"password": NEW_PASSWORD})
    assert reset.status_code == 200
    assert reset.json()["message"] == "Password change successful"
    assert reset.json()["user"]["email"] == email
    assert (await client.get("/tiledesk/users", headers=auth(token))).status_code == 401
    assert (await signin(client, email)).status_code == 401
    assert (await signin(client, email, NEW_PASSWORD)).status_code == 200

    for response in (await client.put(f"/tiledesk/auth/resetpsw/{key}",
                                      json={"password": "yet another passphrase"}),
                     await client.get(f"/tiledesk/auth/checkpswresetkey/{key}")):
        assert response.status_code == 404
        assert response.json() == {"success": False, "msg": "Invalid password reset key"}


async def test_reset_request_for_an_unknown_email_looks_the_same_and_mails_nothing(
        client, core, smtp_server):
    box, _ = smtp_server
    email = unique_email("ghost")
    response = await client.put("/tiledesk/auth/requestresetpsw", json={"email": email})
    assert response.status_code == 200
    assert response.json() == {"success": True,
                               "message": "An email has been sent to reset your password"}
    await OutboxWorker(core).run_once()
    assert box.count_to(email) == 0
    missing = await client.put("/tiledesk/auth/requestresetpsw", json={})
    assert missing.status_code == 422


async def test_an_unknown_reset_key_is_invalid(client):
    response = await client.get("/tiledesk/auth/checkpswresetkey/not-a-key")
    assert response.status_code == 404
    assert response.json() == {"success": False, "msg": "Invalid password reset key"}


# Mounting.

async def test_the_dialect_can_be_served_at_the_root(core, settings):
    app = create_app(settings.model_copy(update={"dialects_at_root": ["tiledesk"]}), core)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50002))
    async with httpx.AsyncClient(transport=transport, base_url="http://authgate.test") as c:
        email = unique_email("root")
        assert (await signup(c, email, prefix="", disableEmail=True)).status_code == 200
        response = await signin(c, email, prefix="/v2")
        assert response.status_code == 200
        assert json_of(response)["success"] is True
        unknown = await c.get("/tiledesk/auth/no-such-route")
        assert unknown.status_code == 404
        assert unknown.json()["success"] is False


async def test_concurrent_first_sign_ins_with_one_customer_token_make_one_user(core):
    org, secret = await project(core)
    realm = await core.realms.require("default")
    token = customer_token(org, secret, _id=f"race-{uuid.uuid4().hex[:8]}")
    results = await asyncio.gather(*(core.org_access.customer_token(realm, token)
                                     for _ in range(4)))
    assert len({r.user.id for r in results}) == 1
    assert len(await core.organisations.members(org)) == 1
