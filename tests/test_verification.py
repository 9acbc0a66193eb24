"""E-mail verification and password reset: the core rules (hashed, expiring, single-use,
attempt-limited codes, mailed in the change's transaction) and the native routes, with mail
delivered over real SMTP; and the admin routes for organisations."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from authgate.config import load_master_secret
from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm, utcnow
from authgate.core.users import NewUser
from authgate.core.verification import MAX_CODE_ATTEMPTS, VERIFY_EMAIL
from authgate.mail.worker import OutboxWorker
from tests.conftest import PASSWORD, realm_url, unique_email
from tests.tiledesk_helpers import admin_token, deliver_and_read, mailed_code, mailed_link

NEW_PASSWORD = "a different long passphrase"


async def new_user(core: Core, realm: Realm, email: str | None = None):
    return await core.users.create(realm, NewUser(email=email or unique_email(),
                                                  password=PASSWORD))


def token_of(link: str) -> str:
    return link.rsplit("token=", 1)[1]


# Core.

async def test_codes_are_stored_hashed_and_mailed_in_the_same_transaction(core, realm):
    user = await new_user(core, realm)
    async with core.store.transaction(write=True) as tx:
        await core.verification.issue(tx, realm, user, VERIFY_EMAIL)
        mail_due = await tx.outbox.due(utcnow() + timedelta(seconds=1), 1000)
        codes = await tx.codes.live_for_user(user.id, VERIFY_EMAIL, utcnow())
        pins = await tx.codes.live_for_user(user.id, VERIFY_EMAIL + ":pin", utcnow())
    mail = [m for m in mail_due if m.recipient == user.email]
    assert len(mail) == 1 and len(codes) == 1 and len(pins) == 1
    code, link = mailed_code(mail[0].body_text), mailed_link(mail[0].body_text)
    assert code not in pins[0].secret_hash and token_of(link) not in codes[0].secret_hash
    assert len(pins[0].secret_hash) == len(codes[0].secret_hash) == 64

    # A transaction that fails takes its mail and codes with it.
    other = await new_user(core, realm)
    with pytest.raises(RuntimeError):
        async with core.store.transaction(write=True) as tx:
            await core.verification.issue(tx, realm, other, VERIFY_EMAIL)
            raise RuntimeError("rolled back")
    async with core.store.transaction() as tx:
        assert await tx.codes.live_for_user(other.id, VERIFY_EMAIL, utcnow()) == []
        due = await tx.outbox.due(utcnow() + timedelta(seconds=1), 1000)
    assert not [m for m in due if m.recipient == other.email]


async def test_a_typed_code_dies_after_its_attempts(core, realm, smtp_server):
    box, _ = smtp_server
    user = await new_user(core, realm)
    await core.verification.request_email_verification(realm, user.email)
    code = mailed_code(await deliver_and_read(core, box, user.email))
    wrong = "000000" if code != "000000" else "111111"
    for _ in range(MAX_CODE_ATTEMPTS):
        with pytest.raises(AuthError) as refused:
            await core.verification.confirm_email(realm, login_id=user.email, code=wrong)
        assert refused.value.code is ErrorCode.INVALID_CODE
    # The per-login throttle now blocks; even with it cleared, the code itself is spent.
    with pytest.raises(AuthError) as blocked:
        await core.verification.confirm_email(realm, login_id=user.email, code=code)
    assert blocked.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.clear(core.throttle.scoped_key(
            f"code:{VERIFY_EMAIL}", f"{realm.id}:{user.email.casefold()}", 0).key)
    with pytest.raises(AuthError) as spent:
        await core.verification.confirm_email(realm, login_id=user.email, code=code)
    assert spent.value.code is ErrorCode.INVALID_CODE
    assert not (await core.users.get(realm, user.id)).email_verified


async def test_codes_expire(core, realm, settings, smtp_server):
    box, _ = smtp_server
    user = await new_user(core, realm)
    await core.verification.request_password_reset(realm, user.email)
    token = token_of(mailed_link(await deliver_and_read(core, box, user.email)))
    later = Core(settings, core.store, load_master_secret(settings),
                 clock=lambda: utcnow() + timedelta(hours=2))
    try:
        with pytest.raises(AuthError) as expired:
            await later.verification.reset_password(realm, NEW_PASSWORD, token=token)
        assert expired.value.code is ErrorCode.CODE_EXPIRED
    finally:
        later.hasher.close()
    # Still usable inside its hour.
    await core.verification.reset_password(realm, NEW_PASSWORD, token=token)


async def test_a_new_request_replaces_earlier_codes(core, realm, smtp_server):
    box, _ = smtp_server
    user = await new_user(core, realm)
    await core.verification.request_password_reset(realm, user.email)
    first = token_of(mailed_link(await deliver_and_read(core, box, user.email)))
    await core.verification.request_password_reset(realm, user.email)
    await OutboxWorker(core).run_once()
    assert await box.wait_for_count(user.email, 2) == 2
    with pytest.raises(AuthError) as replaced:
        await core.verification.check_reset(realm, first)
    assert replaced.value.code is ErrorCode.INVALID_CODE


async def test_codes_of_one_realm_do_not_work_in_another(core, realm, smtp_server):
    box, _ = smtp_server
    user = await new_user(core, realm)
    await core.verification.request_password_reset(realm, user.email)
    token = token_of(mailed_link(await deliver_and_read(core, box, user.email)))
    elsewhere = await core.realms.create(f"t-{uuid.uuid4().hex[:16]}")
    with pytest.raises(AuthError) as refused:
        await core.verification.check_reset(elsewhere, token)
    assert refused.value.code is ErrorCode.INVALID_CODE
    with pytest.raises(AuthError):
        await core.verification.reset_password(realm, NEW_PASSWORD, token=token + "x")
    assert (await core.verification.check_reset(realm, token)).id == user.id


# Native API, mail through the real SMTP server.

async def test_native_sign_up_can_mail_a_verification_code_that_verifies(
        client, core, realm, smtp_server):
    box, _ = smtp_server
    email = unique_email("native")
    created = await client.post(realm_url(realm, "/signup"), json={
        "email": email, "password": PASSWORD, "send_verification_email": True})
    assert created.status_code == 201
    assert created.json()["email_verified"] is False
    code = mailed_code(await deliver_and_read(core, box, email))
    confirmed = await client.post(realm_url(realm, "/verify-email/confirm"),
                                  json={"email": email, "code": code})
    assert confirmed.status_code == 200
    assert confirmed.json()["email_verified"] is True
    again = await client.post(realm_url(realm, "/verify-email/confirm"),
                              json={"email": email, "code": code})
    assert again.status_code == 400
    assert again.json()["error_code"] == "invalid_code"


async def test_native_verification_request_then_confirm_by_link_token(
        client, core, realm, smtp_server):
    box, _ = smtp_server
    user = await new_user(core, realm)
    requested = await client.post(realm_url(realm, "/verify-email/request"),
                                  json={"email": user.email})
    assert requested.status_code == 202
    token = token_of(mailed_link(await deliver_and_read(core, box, user.email)))
    confirmed = await client.post(realm_url(realm, "/verify-email/confirm"),
                                  json={"token": token})
    assert confirmed.status_code == 200 and confirmed.json()["email_verified"] is True
    neither = await client.post(realm_url(realm, "/verify-email/confirm"), json={"x": 1})
    assert neither.status_code == 400


async def test_native_password_reset_ends_every_session(client, core, realm, smtp_server):
    box, _ = smtp_server
    user = await new_user(core, realm)
    signed_in = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "password", "username": user.email, "password": PASSWORD})
    access = signed_in.json()["access_token"]

    forgot = await client.post(realm_url(realm, "/password/forgot"), json={"email": user.email})
    assert forgot.status_code == 202
    text = await deliver_and_read(core, box, user.email)
    code = mailed_code(text)

    weak = await client.post(realm_url(realm, "/password/reset"), json={
        "email": user.email, "code": code, "password": "short"})
    assert weak.status_code == 400 and weak.json()["error"] == "weak_password"
    reset = await client.post(realm_url(realm, "/password/reset"), json={
        "email": user.email, "code": code, "password": NEW_PASSWORD})
    assert reset.status_code == 204

    info = await client.get(realm_url(realm, "/userinfo"),
                            headers={"Authorization": f"Bearer {access}"})
    assert info.status_code == 401
    old = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "password", "username": user.email, "password": PASSWORD})
    assert old.status_code == 400
    new = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "password", "username": user.email, "password": NEW_PASSWORD})
    assert new.status_code == 200
    reused = await client.post(realm_url(realm, "/password/reset"), json={
        "token": token_of(mailed_link(text)), "password": "yet another passphrase"})
    assert reused.status_code == 400  # the link died with the code


async def test_native_forgot_for_an_unknown_email_answers_the_same_and_mails_nothing(
        client, core, realm, smtp_server):
    box, _ = smtp_server
    email = unique_email("ghost")
    response = await client.post(realm_url(realm, "/password/forgot"), json={"email": email})
    assert response.status_code == 202
    assert response.json() == {"status": "accepted"}
    await OutboxWorker(core).run_once()
    assert box.count_to(email) == 0
    missing = await client.post(realm_url(realm, "/password/forgot"), json={})
    assert missing.status_code == 400


async def test_a_realm_that_reveals_unknown_users_says_so_on_forgot(client, core, realm):
    await core.realms.update_settings(realm, {"reveal_unknown_users": True})
    response = await client.post(realm_url(realm, "/password/forgot"),
                                 json={"email": unique_email("ghost")})
    assert response.status_code == 400
    assert response.json()["error_code"] == "user_not_found"


# Admin API for organisations.

async def test_admin_creates_organisations_adds_members_and_rotates_the_secret(client, core):
    headers = await admin_token(client, core)
    name = f"org-{uuid.uuid4().hex[:10]}"
    created = await client.post("/admin/realms/default/organisations", headers=headers,
                                json={"name": name, "settings": {"allow_guests": False}})
    assert created.status_code == 201
    org = created.json()
    assert org["name"] == name and org["has_secret"] is False
    duplicate = await client.post("/admin/realms/default/organisations", headers=headers,
                                  json={"name": name})
    assert duplicate.status_code == 400

    realm = await core.realms.require("default")
    member = await new_user(core, realm)
    added = await client.post(f"/admin/realms/default/organisations/{name}/members",
                              headers=headers, json={"user_id": member.id,
                                                     "roles": ["agent"]})
    assert added.status_code == 200
    assert added.json()["roles"] == ["agent"] and added.json()["status"] == "active"
    members = await client.get(f"/admin/realms/default/organisations/{org['id']}/members",
                               headers=headers)
    assert [m["user_id"] for m in members.json()["members"]] == [member.id]
    unknown_user = await client.post(f"/admin/realms/default/organisations/{name}/members",
                                     headers=headers, json={"user_id": str(uuid.uuid4()),
                                                            "roles": ["agent"]})
    assert unknown_user.status_code == 400

    first = await client.post(f"/admin/realms/default/organisations/{org['id']}/secret",
                              headers=headers)
    second = await client.post(f"/admin/realms/default/organisations/{org['id']}/secret",
                               headers=headers)
    assert first.status_code == second.status_code == 200
    assert len(first.json()["secret"]) >= 40 and first.json()["secret"] != second.json()["secret"]
    listed = await client.get("/admin/realms/default/organisations", headers=headers)
    mine = [o for o in listed.json()["organisations"] if o["id"] == org["id"]]
    assert mine[0]["has_secret"] is True and "secret" not in mine[0]
    stored = await core.organisations.get(realm, org["id"])
    assert core.organisations.secret(stored) == second.json()["secret"].encode()

    guests_closed = await client.post("/tiledesk/auth/signinAnonymously",
                                      json={"id_project": org["id"]})
    assert guests_closed.status_code == 403


async def test_organisation_admin_routes_need_an_administrator(client, core):
    response = await client.post("/admin/realms/default/organisations",
                                 json={"name": "nope"})
    assert response.status_code == 401
    realm = await core.realms.require("default")
    email = unique_email("plain")
    await core.users.create(realm, NewUser(email=email, password=PASSWORD))
    token = (await client.post("/oauth/token", data={
        "grant_type": "password", "username": email, "password": PASSWORD})).json()
    response = await client.post("/admin/realms/default/organisations", json={"name": "nope"},
                                 headers={"Authorization": f"Bearer {token['access_token']}"})
    assert response.status_code == 403


async def test_purposes_do_not_mix(core, realm, smtp_server):
    box, _ = smtp_server
    user = await new_user(core, realm)
    await core.verification.request_email_verification(realm, user.email)
    token = token_of(mailed_link(await deliver_and_read(core, box, user.email)))
    with pytest.raises(AuthError):
        await core.verification.reset_password(realm, NEW_PASSWORD, token=token)
    assert (await core.verification.confirm_email(realm, token=token)).email_verified


async def test_a_reset_for_an_unknown_account_is_recorded_and_sends_nothing(core, realm):
    """Both answers do a durable write: the unknown account's is its audit event."""
    login_id = unique_email("nobody")
    await core.verification.request_password_reset(realm, login_id)
    [event] = [e for e in await core.audit.recent(realm.id, limit=20)
               if e.type == "user.password_reset_requested"]
    assert event.user_id is None
    assert event.data["sent"] is False and event.data["login_id"] == login_id
    async with core.store.transaction() as tx:
        assert [m for m in await tx.outbox.due(utcnow(), 100) if m.recipient == login_id] == []
