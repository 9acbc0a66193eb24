"""A user with TOTP enabled needs the second factor on every surface. The surfaces that can ask
for a code take it; those that cannot refuse the password alone, each in its own shape."""

from __future__ import annotations

from typing import Any

import httpx
import pyotp
import pytest
from descope import AuthException

from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm, User
from authgate.core.users import NewUser
from tests.conftest import PASSWORD, unique_email
from tests.test_descope import call, error_of, sdk
from tests.test_totp import enrolled, next_code


@pytest.fixture
async def mfa_user(core: Core) -> tuple[Realm, User, pyotp.TOTP]:
    """A user of the default realm (the one Tiledesk, classroom, Deskera and the web API
    serve) with TOTP enabled."""
    realm = await core.realms.ensure_default()
    user = await core.users.create(realm, NewUser(email=unique_email("mfa"), password=PASSWORD))
    totp, _ = await enrolled(core, realm, user)
    return realm, user, totp


async def sessions_of(core: Core, realm: Realm, user: User) -> int:
    return len(await core.sessions.list_for_user(realm, user.id))


@pytest.mark.parametrize(("path", "field", "refusal"), [
    ("/tiledesk/v2/auth/signin", "email",
     {"success": False, "msg": "Authentication failed. The account requires a second factor."}),
    ("/classroom/auth/sign-in-verify", "identity",
     {"status_code": 401, "message": "The account requires an authenticator app code."}),
])
async def test_surfaces_with_no_field_for_a_code_refuse_the_password_alone(
        client: httpx.AsyncClient, core: Core, mfa_user: Any, path: str, field: str,
        refusal: dict[str, Any]) -> None:
    realm, user, _ = mfa_user
    response = await client.post(path, json={field: user.email, "password": PASSWORD})
    assert (response.status_code, response.json()) == (401, refusal)
    assert await sessions_of(core, realm, user) == 0


async def test_descope_refuses_sign_in_and_password_replace_with_the_password_alone(
        live_server: Any, core: Core, realm: Realm) -> None:
    user = await core.users.create(realm, NewUser(email=unique_email("mfa"), password=PASSWORD))
    totp, _ = await enrolled(core, realm, user)
    client = sdk(live_server, realm)
    for attempt in (lambda: client.password.sign_in(user.email, PASSWORD),
                    lambda: client.password.replace(user.email, PASSWORD,
                                                    "a different passphrase 77")):
        with pytest.raises(AuthException) as raised:
            await call(attempt)
        assert raised.value.status_code == 401
        assert error_of(raised.value)["errorCode"] == "E061105"
    assert await sessions_of(core, realm, user) == 0
    # The password did not change.
    signed_in = await core.signin.password(realm, user.email, PASSWORD,
                                           mfa_code=next_code(totp))
    assert signed_in.user.id == user.id


async def test_surfaces_that_ask_for_the_code_sign_in_with_it(client: httpx.AsyncClient,
                                                              core: Core,
                                                              mfa_user: Any) -> None:
    realm, user, totp = mfa_user
    asked = await client.post("/deskera/v1/iam/auth/sign-in/web/sign-in",
                              json={"userName": user.email, "password": PASSWORD})
    assert asked.status_code == 200 and asked.json() == {"isMFAEnabled": True}
    granted = await client.post("/oauth/token", data={
        "grant_type": "password", "username": user.email, "password": PASSWORD,
        "mfa_code": next_code(totp)})
    assert granted.status_code == 200, granted.text
    assert await sessions_of(core, realm, user) == 1


async def test_the_core_sign_in_needs_the_code_and_reports_how(core: Core,
                                                               mfa_user: Any) -> None:
    realm, user, totp = mfa_user
    with pytest.raises(AuthError) as raised:
        await core.signin.password(realm, user.email, PASSWORD)
    assert raised.value.code is ErrorCode.MFA_REQUIRED
    signed_in = await core.signin.password(realm, user.email, PASSWORD,
                                           mfa_code=next_code(totp))
    assert (signed_in.user.id, signed_in.amr) == (user.id, ["pwd", "otp", "mfa"])
    plain = await core.users.create(realm, NewUser(email=unique_email("plain"),
                                                   password=PASSWORD))
    assert (await core.signin.password(realm, plain.email, PASSWORD)).amr == ["pwd"]
