"""The classroom dialect: one identity, many organisation accounts, e-mailed PIN 2FA.

Requests and answers follow seed 004 (InteDashboard's documents); the PINs travel through the
outbox to the real SMTP server of the test harness and are read out of the delivered mail.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from authgate.api.app import create_app
from authgate.core.engine import Core
from authgate.core.users import NewUser
from tests.classroom_support import (
    PIN_LINE,
    RESET_CODE,
    Identity,
    body_of,
    classroom_identity,
    clocked_core,
    delivered_body,
    delivered_pin,
)
from tests.conftest import PASSWORD, unique_email

BASE = "/classroom"
ORGANISATION_KEYS = {"uuid", "accountName", "organisationName", "isActive", "isSuspended",
                     "settings", "isPaid"}


def random_ip() -> str:
    """Each test speaks from an address of its own, so per-address throttling in the shared
    default realm never couples tests."""
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


def classroom_client(app: Any, ip: str | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip or random_ip(), 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://authgate.test")


@pytest.fixture
async def http(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with classroom_client(app) as client:
        yield client


@pytest.fixture
async def identity(core: Core) -> Identity:
    return await classroom_identity(core, unique_email("cy"))


async def verify(http: httpx.AsyncClient, identity: str,
                 password: str = PASSWORD) -> httpx.Response:
    return await http.post(f"{BASE}/auth/sign-in-verify",
                           json={"identity": identity, "password": password})


def entries(body: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(organisation uuid, role) -> entry."""
    return {(entry["organisation"]["uuid"], entry["role"]): entry
            for group in body["result"] for entry in group}


async def login_token(http: httpx.AsyncClient, who: Identity, org_id: str, role: str) -> str:
    response = await verify(http, who.email)
    assert response.status_code == 200, response.text
    return entries(response.json())[(org_id, role)]["loginToken"]


async def pin_step(http: httpx.AsyncClient, core: Core, mailbox: Any,
                   who: Identity, *, mails_before: int = 0) -> tuple[str, str]:
    """Choose the teacher account (PIN required): the PIN handle and the e-mailed PIN."""
    token = await login_token(http, who, who.university.id, "Teacher")
    chosen = await http.post(f"{BASE}/auth/sign-in",
                             json={"loginToken": token, "is2FAEnabled": True})
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["is2FAEnabled"] is True
    pin = await delivered_pin(core, mailbox, who.email, after=mails_before)
    return chosen.json()["loginToken"], pin


def wrong(pin: str) -> str:
    return f"{(int(pin) + 1) % 1_000_000:06d}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# Sign-in verify.

async def test_sign_in_verify_lists_one_group_per_organisation_and_one_entry_per_role(
        http, identity):
    response = await verify(http, identity.email)
    assert response.status_code == 200
    body = response.json()
    assert body["status_code"] == 200 and body["message"] == "OK" and body["isLocked"] == 0
    groups = body["result"]
    assert [sorted(e["role"] for e in group) for group in groups] == [
        ["Student", "Teacher"], ["Account Admin"]]
    found = entries(body)
    student = found[(identity.university.id, "Student")]
    teacher = found[(identity.university.id, "Teacher")]
    admin = found[(identity.company.id, "Account Admin")]
    assert student["is2FAEnabled"] is False and teacher["is2FAEnabled"] is True
    assert admin["is2FAEnabled"] is False
    tokens = {student["loginToken"], teacher["loginToken"], admin["loginToken"]}
    assert len(tokens) == 3 and all(isinstance(t, str) and len(t) >= 40 for t in tokens)
    assert all("message" not in e for e in (student, teacher, admin))
    assert set(student["organisation"]) == ORGANISATION_KEYS
    assert student["organisation"] == {
        "uuid": identity.university.id, "accountName": None,
        "organisationName": "Cy's University", "isActive": 1, "isSuspended": 0,
        "settings": {"enableLti": False, "mfaForStudents": False, "mfaForTeachers": True,
                     "allowGenericUsers": False, "defaultTratSettings": [5, 3, 1, 0],
                     "maxFailedSignInAttempts": 3},
        "isPaid": 0}
    assert admin["organisation"]["settings"] is None
    assert admin["organisation"]["organisationName"] == "Cy"


async def test_sign_in_verify_refuses_a_wrong_password_and_an_unknown_identity_alike(
        http, identity):
    wrong_password = await verify(http, identity.email, "not the password at all")
    unknown = await verify(http, unique_email("nobody"))
    for response in (wrong_password, unknown):
        assert response.status_code == 401
        assert response.json() == {"status_code": 401, "message": "Password is invalid."}


async def test_sign_in_verify_says_no_users_found_for_an_identity_without_accounts(
        http, core):
    email = unique_email("loner")
    realm = await core.realms.require(core.settings.classroom_realm)
    await core.users.create(realm, NewUser(email=email, password=PASSWORD))
    response = await verify(http, email)
    assert response.status_code == 401
    assert response.json() == {"status_code": 401, "message": "No user(s) found."}


async def test_bad_input_gets_the_422_shape_and_never_a_500(http):
    missing = await http.post(f"{BASE}/auth/sign-in-verify", json={"password": "x"})
    assert missing.status_code == 422
    assert missing.json() == {"message": "422 Unprocessable Entity",
                              "errors": {"identity": ["The identity field is required."]},
                              "status_code": 422}
    typed = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                            json={"loginToken": "abc", "pin": 123456})
    assert typed.status_code == 422
    assert typed.json()["errors"] == {"pin": ["The pin must be a string."]}
    flag = await http.post(f"{BASE}/auth/sign-in", json={"loginToken": "abc",
                                                          "is2FAEnabled": "maybe"})
    assert flag.status_code == 422 and "is2FAEnabled" in flag.json()["errors"]
    for path in ("/auth/sign-in-verify", "/auth/sign-in", "/auth/resend-2fa",
                 "/password/send-token", "/password/reset"):
        broken = await http.post(f"{BASE}{path}", content=b"{not json",
                                 headers={"content-type": "application/json"})
        assert broken.status_code == 400, path
        assert broken.json()["status_code"] == 400
        listed = await http.post(f"{BASE}{path}", json=["a", "b"])
        assert listed.status_code == 400, path
    unknown_route = await http.get(f"{BASE}/no-such-route")
    assert unknown_route.status_code == 404
    assert unknown_route.json() == {"status_code": 404, "message": "404 Not Found"}


async def test_form_bodies_are_read_and_wrong_methods_get_the_classroom_shape(http, identity):
    form = await http.post(f"{BASE}/auth/sign-in-verify",
                           data={"identity": identity.email, "password": PASSWORD})
    assert form.status_code == 200 and len(form.json()["result"]) == 2
    wrong_method = await http.get(f"{BASE}/auth/sign-in")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"status_code": 405, "message": "405 Method Not Allowed"}


async def test_the_dialect_can_also_be_served_at_the_root(settings, core, identity):
    rooted = create_app(settings.model_copy(update={"dialects_at_root": ["classroom"]}), core)
    async with classroom_client(rooted) as http:
        response = await http.post("/auth/sign-in-verify",
                                   json={"identity": identity.email, "password": "nope-nope"})
        assert response.status_code == 401
        assert response.json() == {"status_code": 401, "message": "Password is invalid."}
        prefixed = await verify(http, identity.email)
        assert prefixed.status_code == 200
        # /password is used by both surfaces at the root: the dialect's routes answer in its
        # shape (its /password/reset too, a path the native API also has), and the native
        # routes beside them are still reached.
        dialect = await http.post("/password/send-token", json={"email": identity.email})
        assert dialect.json() == {"status_code": 200, "message": "OK"}
        reset = await http.post("/password/reset", json={"token": "x" * 20, "password": "y"})
        assert reset.status_code == 422 and {"status_code", "message"} <= set(reset.json())
        native = await http.post("/password/forgot", json={"email": identity.email})
        assert native.status_code == 202


# Choosing an account.

async def test_choosing_an_account_without_mfa_returns_a_bearer_token_bound_to_a_session(
        http, core, identity):
    token = await login_token(http, identity, identity.university.id, "Student")
    response = await http.post(f"{BASE}/auth/sign-in",
                               json={"loginToken": token, "is2FAEnabled": False})
    assert response.status_code == 200
    body = response.json()
    assert body["status_code"] == 200 and set(body["data"]) == {"token", "user"}
    user = body["data"]["user"]
    assert user["uuid"] == identity.user.id and user["email"] == identity.email
    assert user["role"] == "Student"
    assert user["organisation"]["uuid"] == identity.university.id
    profile = await http.get(f"{BASE}/profile", headers=bearer(body["data"]["token"]))
    assert profile.status_code == 200
    assert profile.json()["data"]["role"] == "Student"
    assert profile.json()["data"]["organisation"]["uuid"] == identity.university.id
    principal = await core.sessions.authenticate(identity.realm, body["data"]["token"])
    assert principal.session.organisation_id == identity.university.id
    assert principal.session.amr == ["pwd"]


async def test_the_organisation_decides_on_mfa_whatever_the_client_claims(
        http, core, smtp_server, identity):
    mailbox, _ = smtp_server
    token = await login_token(http, identity, identity.university.id, "Teacher")
    response = await http.post(f"{BASE}/auth/sign-in",
                               json={"loginToken": token, "is2FAEnabled": False})
    assert response.status_code == 200
    assert response.json()["is2FAEnabled"] is True
    assert "data" not in response.json()
    assert len(await delivered_pin(core, mailbox, identity.email)) == 6


async def test_the_mfa_account_gets_a_token_only_for_the_emailed_pin(
        http, core, smtp_server, identity):
    mailbox, _ = smtp_server
    first_token = await login_token(http, identity, identity.university.id, "Teacher")
    chosen = await http.post(f"{BASE}/auth/sign-in",
                             json={"loginToken": first_token, "is2FAEnabled": True})
    assert chosen.status_code == 200
    assert set(chosen.json()) == {"is2FAEnabled", "loginToken"}
    pin_token = chosen.json()["loginToken"]
    assert pin_token != first_token
    message = await delivered_body(core, mailbox, identity.email)
    assert "expires in 15 minutes" in message
    pin = PIN_LINE.search(message).group(1)

    refused = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                              json={"loginToken": pin_token, "pin": wrong(pin)})
    assert refused.status_code == 401
    assert refused.json() == {"status_code": 401, "message": "Provided pin is invalid."}

    accepted = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                               json={"loginToken": pin_token, "pin": pin})
    assert accepted.status_code == 200
    data = accepted.json()["data"]
    assert data["user"]["role"] == "Teacher"
    principal = await core.sessions.authenticate(identity.realm, data["token"])
    assert set(principal.session.amr) == {"pwd", "otp", "mfa"}

    replayed_pin = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                                   json={"loginToken": pin_token, "pin": pin})
    assert replayed_pin.status_code == 401
    assert replayed_pin.json() == {"status_code": 401,
                                   "message": "Provided login token is invalid."}
    replayed_choice = await http.post(f"{BASE}/auth/sign-in", json={"loginToken": first_token})
    assert replayed_choice.status_code == 401
    assert replayed_choice.json() == {"status_code": 401,
                                      "message": "Provided login token is invalid."}


async def test_a_login_token_is_refused_for_another_users_pin_and_from_another_client(
        app, http, core, smtp_server):
    mailbox, _ = smtp_server
    alice = await classroom_identity(core, unique_email("alice"))
    bob = await classroom_identity(core, unique_email("bob"))
    alice_handle, alice_pin = await pin_step(http, core, mailbox, alice)
    bob_handle, bob_pin = await pin_step(http, core, mailbox, bob)
    resends = 0
    while bob_pin == alice_pin:  # one chance in a million: ask for another PIN
        resent = await http.post(f"{BASE}/auth/resend-2fa", json={"loginToken": bob_handle})
        assert resent.status_code == 200
        resends += 1
        bob_pin = await delivered_pin(core, mailbox, bob.email, after=resends)

    crossed = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                              json={"loginToken": bob_handle, "pin": alice_pin})
    assert crossed.status_code == 401
    assert crossed.json()["message"] == "Provided pin is invalid."

    async with classroom_client(app) as elsewhere:
        stolen = await elsewhere.post(f"{BASE}/auth/sign-in-with-2fa",
                                      json={"loginToken": alice_handle, "pin": alice_pin})
        assert stolen.status_code == 401
        assert stolen.json()["message"] == "Provided login token is invalid."
        stolen_choice = await elsewhere.post(
            f"{BASE}/auth/sign-in",
            json={"loginToken": await login_token(http, alice, alice.company.id,
                                                  "Account Admin")})
        assert stolen_choice.status_code == 401
        assert stolen_choice.json()["message"] == "Provided login token is invalid."

    # Each handle still works for its own user, from its own client.
    for handle, pin, who in ((alice_handle, alice_pin, alice), (bob_handle, bob_pin, bob)):
        ok = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                             json={"loginToken": handle, "pin": pin})
        assert ok.status_code == 200
        assert ok.json()["data"]["user"]["uuid"] == who.user.id


async def test_an_expired_pin_is_refused(settings, core, smtp_server):
    mailbox, _ = smtp_server
    async with clocked_core(settings, core) as (clocked, clock):
        who = await classroom_identity(clocked, unique_email("late"))
        async with classroom_client(create_app(settings, clocked)) as http:
            handle, pin = await pin_step(http, clocked, mailbox, who)
            clock.advance(minutes=15, seconds=1)
            late = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                                   json={"loginToken": handle, "pin": pin})
            assert late.status_code == 401
            assert late.json() == {"status_code": 401, "message": "Provided pin is invalid."}
            resend = await http.post(f"{BASE}/auth/resend-2fa", json={"loginToken": handle})
            assert resend.status_code == 401
            assert resend.json()["message"] == "Provided login token is invalid."

            handle, pin = await pin_step(http, clocked, mailbox, who, mails_before=1)
            clock.advance(minutes=14, seconds=50)
            in_time = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                                      json={"loginToken": handle, "pin": pin})
            assert in_time.status_code == 200


async def test_resending_the_pin_mails_a_new_one_and_retires_the_old(
        http, core, smtp_server, identity):
    mailbox, _ = smtp_server
    handle, old_pin = await pin_step(http, core, mailbox, identity)
    resent = await http.post(f"{BASE}/auth/resend-2fa", json={"loginToken": handle})
    assert resent.status_code == 200
    assert resent.json() == {"success": True}
    new_pin = await delivered_pin(core, mailbox, identity.email, after=1)
    if new_pin != old_pin:
        old = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                              json={"loginToken": handle, "pin": old_pin})
        assert old.status_code == 401
        assert old.json()["message"] == "Provided pin is invalid."
    ok = await http.post(f"{BASE}/auth/sign-in-with-2fa",
                         json={"loginToken": handle, "pin": new_pin})
    assert ok.status_code == 200


async def test_profile_and_sign_out_need_a_live_bearer_token(http, identity):
    token = await login_token(http, identity, identity.company.id, "Account Admin")
    signed = (await http.post(f"{BASE}/auth/sign-in", json={"loginToken": token})).json()
    jwt = signed["data"]["token"]
    assert (await http.get(f"{BASE}/profile")).json() == {"status_code": 401,
                                                          "message": "Unauthenticated."}
    assert (await http.get(f"{BASE}/profile", headers=bearer("not.a.jwt"))).status_code == 401
    assert (await http.get(f"{BASE}/profile", headers=bearer(jwt))).status_code == 200
    out = await http.get(f"{BASE}/profile/sign-out", headers=bearer(jwt))
    assert out.status_code == 200 and out.json() == {"invalidated": True}
    after = await http.get(f"{BASE}/profile", headers=bearer(jwt))
    assert after.status_code == 401


# Organisation policies.

async def test_max_failed_sign_in_attempts_locks_that_organisation_only(http, core):
    who = await classroom_identity(core, unique_email("locky"),
                                   company_settings={"maxFailedSignInAttempts": 5})
    for attempt in range(1, 4):
        failed = await verify(http, who.email, "a wrong password")
        assert failed.status_code == 401
        assert failed.json()["message"] == "Password is invalid."
        university = await core.organisations.membership(who.university, who.user.id)
        company = await core.organisations.membership(who.company, who.user.id)
        assert university.failed_attempts == attempt and company.failed_attempts == attempt
        assert (university.locked_until is not None) is (attempt == 3)
        assert company.locked_until is None

    body = (await verify(http, who.email)).json()
    assert body["isLocked"] == 1
    found = entries(body)
    for role in ("Student", "Teacher"):
        locked = found[(who.university.id, role)]
        assert locked["message"] == "Identity or Password is invalid."
        assert "loginToken" not in locked and locked["isLocked"] == 1
    open_entry = found[(who.company.id, "Account Admin")]
    assert open_entry["loginToken"] and "message" not in open_entry
    assert open_entry["isLocked"] == 0
    assert open_entry["organisation"]["settings"]["maxFailedSignInAttempts"] == 5
    signed = await http.post(f"{BASE}/auth/sign-in", json={"loginToken": open_entry["loginToken"]})
    assert signed.status_code == 200

    await core.organisations.unlock(who.realm, who.university, who.user.id)
    body = (await verify(http, who.email)).json()
    assert body["isLocked"] == 0
    assert all("loginToken" in e for e in entries(body).values())


async def test_a_login_token_issued_before_a_lock_no_longer_signs_in(http, core, identity):
    token = await login_token(http, identity, identity.university.id, "Student")
    for _ in range(3):
        await verify(http, identity.email, "a wrong password")
    refused = await http.post(f"{BASE}/auth/sign-in", json={"loginToken": token})
    assert refused.status_code == 401
    assert refused.json() == {"status_code": 401, "message": "Identity or Password is invalid.",
                              "isLocked": 1}


async def test_suspended_organisations_and_inactive_memberships_refuse_their_accounts(
        http, core, identity):
    await core.organisations.update(identity.realm, identity.company.id, {"is_suspended": True})
    body = (await verify(http, identity.email)).json()
    suspended = entries(body)[(identity.company.id, "Account Admin")]
    assert suspended["message"] == "Identity or Password is invalid."
    assert "loginToken" not in suspended and suspended["organisation"]["isSuspended"] == 1
    assert body["isLocked"] == 0

    await core.organisations.update(identity.realm, identity.company.id, {"is_suspended": False})
    await core.organisations.add_member(identity.realm, identity.university, identity.user.id,
                                        roles=["Student", "Teacher"], status="inactive")
    found = entries((await verify(http, identity.email)).json())
    assert "loginToken" not in found[(identity.university.id, "Student")]
    assert "loginToken" in found[(identity.company.id, "Account Admin")]


# Password reset.

async def test_password_reset_by_emailed_token(http, core, smtp_server, identity):
    mailbox, _ = smtp_server
    unknown = await http.post(f"{BASE}/password/send-token",
                              json={"email": unique_email("ghost")})
    sent = await http.post(f"{BASE}/password/send-token", json={"email": identity.email})
    assert unknown.status_code == sent.status_code == 200
    assert unknown.json() == sent.json() == {"status_code": 200, "message": "OK"}
    token = RESET_CODE.search(await delivered_body(core, mailbox, identity.email)).group(1)

    weak = await http.post(f"{BASE}/password/reset", json={"token": token, "password": "short"})
    assert weak.status_code == 422 and "password" in weak.json()["errors"]
    bad = await http.post(f"{BASE}/password/reset",
                          json={"token": "nope", "password": "a brand new passphrase"})
    assert bad.status_code == 422
    assert bad.json()["errors"] == {"token": ["The selected token is invalid."]}

    done = await http.post(f"{BASE}/password/reset",
                           json={"token": token, "password": "a brand new passphrase",
                                 "password_confirmation": "a brand new passphrase"})
    assert done.status_code == 200
    again = await http.post(f"{BASE}/password/reset",
                            json={"token": token, "password": "another new passphrase"})
    assert again.status_code == 422
    assert (await verify(http, identity.email)).status_code == 401
    assert (await verify(http, identity.email, "a brand new passphrase")).status_code == 200


# Over a real server, whose own worker delivers the PIN.

async def test_the_pin_flow_works_against_a_live_server(live_server, core, smtp_server):
    mailbox, _ = smtp_server
    who = await classroom_identity(core, unique_email("live"))
    async with httpx.AsyncClient(base_url=live_server.url) as live:
        handle_response = await verify(live, who.email)
        teacher = entries(handle_response.json())[(who.university.id, "Teacher")]
        chosen = await live.post(f"{BASE}/auth/sign-in", json={"loginToken": teacher["loginToken"]})
        assert chosen.json()["is2FAEnabled"] is True
        message = await mailbox.wait_for(who.email)
        pin = PIN_LINE.search(body_of(message)).group(1)
        signed = await live.post(f"{BASE}/auth/sign-in-with-2fa",
                                 json={"loginToken": chosen.json()["loginToken"], "pin": pin})
        assert signed.status_code == 200
        profile = await live.get(f"{BASE}/profile", headers=bearer(signed.json()["data"]["token"]))
        assert profile.json()["data"]["role"] == "Teacher"
