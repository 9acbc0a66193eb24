"""The Deskera IAM dialect: a Cognito-shaped web sign-in (seed 000), under ``/deskera``.

Every route serves the realm named by ``settings.deskera_realm``. Tokens come back in Cognito's
``AuthenticationResultType`` (camel-cased) plus Deskera's own fields; errors are
``{"errorMessage": ...}`` with the status the service uses. See ``docs/dialects/deskera.md``.

Where Deskera is silent, this dialect chooses:
- a remembered device is presented as a ``deviceKey`` body field or an ``x-device-key`` header
  (the body wins); an optional ``deviceName`` names a new device;
- the caller's access token is read from ``x-access-token``, else ``Authorization: Bearer``;
- ``expiresIn`` is ``AUTHGATE_DESKERA_TOKEN_TTL`` (3600): access tokens issued here live that long.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from fastapi import APIRouter, Request, Response

from authgate.api.surface import (
    NO_STORE,
    BadRequest,
    JSONResponse,
    Surface,
    bearer_token,
    client_info,
    read_body,
    string_field,
)
from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Realm, User
from authgate.core.sessions import Principal, Tokens
from authgate.core.signin import Proven
from authgate.core.users import NewUser

FAILED_CREDENTIALS = "Failed to authenticate user credentials."
USER_EXISTS = "User with same username is already exist."
VERIFICATION_PATH = "/v1/iam/auth/email/verification"

# core code -> (HTTP status, errorMessage or None for the core's own message)
DESKERA_ERRORS: dict[ErrorCode, tuple[int, str | None]] = {
    ErrorCode.INVALID_REQUEST: (400, None),
    ErrorCode.NOT_FOUND: (404, None),
    ErrorCode.FORBIDDEN: (403, None),
    ErrorCode.INVALID_CREDENTIALS: (400, FAILED_CREDENTIALS),
    ErrorCode.WRONG_PASSWORD: (400, FAILED_CREDENTIALS),
    ErrorCode.USER_NOT_FOUND: (404, FAILED_CREDENTIALS),
    ErrorCode.USER_DISABLED: (403, "User is disabled."),
    ErrorCode.ACCOUNT_LOCKED: (403, "User is locked."),
    ErrorCode.TOO_MANY_ATTEMPTS: (403, "User is locked due to too many failed attempts; "
                                       "try again later."),
    ErrorCode.USER_ALREADY_EXISTS: (400, USER_EXISTS),
    ErrorCode.WEAK_PASSWORD: (400, None),
    ErrorCode.EMAIL_NOT_VERIFIED: (403, None),
    ErrorCode.INVALID_TOKEN: (401, "Unauthorized."),
    ErrorCode.TOKEN_EXPIRED: (401, "Token expired."),
    ErrorCode.SESSION_REVOKED: (401, "Unauthorized."),
    ErrorCode.REFRESH_TOKEN_REUSED: (401, "Unauthorized."),
    ErrorCode.INVALID_CODE: (400, "Invalid confirmation code."),
    ErrorCode.CODE_EXPIRED: (400, "Confirmation code expired."),
    ErrorCode.MFA_REQUIRED: (400, "MFA code is required."),
    ErrorCode.INVALID_MFA_CODE: (400, "Invalid MFA code."),
    ErrorCode.REALM_NOT_FOUND: (404, None),
    ErrorCode.DEVICE_NOT_FOUND: (404, None),
    ErrorCode.TEMPORARILY_UNAVAILABLE: (503, None),
}
# The e-mail verification link answers 404 for an invalid link and 410 for an expired one.
VERIFICATION_ERRORS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_CODE: (404, "Invalid verification link."),
    ErrorCode.CODE_EXPIRED: (410, "Verification link expired."),
}


class DeskeraSurface(Surface):
    name = "deskera"

    def render(self, request: Request, error: AuthError) -> Response:
        if request.url.path.endswith(VERIFICATION_PATH) and error.code in VERIFICATION_ERRORS:
            status, message = VERIFICATION_ERRORS[error.code]
        else:
            status, wire = DESKERA_ERRORS.get(error.code, (400, None))
            message = wire or error.message
        if error.code is ErrorCode.INVALID_REQUEST and error.details.get("status") in (
                404, 405, 413, 415):
            status = int(error.details["status"])
        headers = dict(NO_STORE)
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return JSONResponse({"errorMessage": message}, status_code=status, headers=headers)


surface = DeskeraSurface()
router = APIRouter(route_class=surface.route_class, tags=["dialect: deskera"])


def _core(request: Request) -> Core:
    return request.app.state.core


async def _realm(request: Request) -> Realm:
    core = _core(request)
    return await core.realms.require(core.settings.deskera_realm)


def _access_token(request: Request) -> str | None:
    return (request.headers.get("x-access-token") or "").strip() or bearer_token(request)


async def _principal(request: Request, realm: Realm) -> Principal:
    token = _access_token(request)
    if not token:
        raise AuthError(ErrorCode.INVALID_TOKEN)
    return await _core(request).sessions.authenticate(realm, token[:8192])


async def _account_fields(core: Core, user: User) -> dict[str, Any]:
    return {"emailVerified": user.email_verified, "isTrialUser": False,
            "isMFAEnabled": await core.totp.is_enabled(user), "guid": user.id}


async def _token_object(core: Core, tokens: Tokens, *,
                        device: tuple[str, str] | None = None) -> dict[str, Any]:
    """Cognito's AuthenticationResultType, camel-cased, with Deskera's account fields."""
    body: dict[str, Any] = {
        "accessToken": tokens.access_token,
        "expiresIn": tokens.expires_in,
        "idToken": tokens.id_token,
        "refreshToken": tokens.refresh_token,
        "tokenType": "Bearer",
    }
    if device is not None:
        body["newDeviceMetadata"] = {"deviceGroupKey": device[0], "deviceKey": device[1]}
    body.update(await _account_fields(core, tokens.user))
    return body


def _credentials(body: dict[str, Any], core: Core) -> tuple[str, str]:
    user_name = string_field(body, "userName", required=True, max_length=320)
    password = string_field(body, "password", required=True,
                            max_length=core.settings.password_max_length)
    assert user_name is not None and password is not None
    return user_name, password


def _device_key(request: Request, body: dict[str, Any]) -> str | None:
    return (string_field(body, "deviceKey", max_length=128)
            or (request.headers.get("x-device-key") or "").strip()[:128] or None)


async def _signed_in(request: Request, realm: Realm, proven: Proven,
                     client: ClientInfo, body: dict[str, Any]) -> Response:
    core = _core(request)
    sighting = await core.devices.sighting(realm, proven.user, client.device_key,
                                           name=string_field(body, "deviceName", max_length=200),
                                           client=client)
    tokens = await proven.session(device_id=sighting.device.id,
                                  access_ttl=core.settings.deskera_token_ttl)
    device = ((sighting.device.device_group_key, sighting.device.device_key)
              if sighting.is_new else None)
    return JSONResponse(await _token_object(core, tokens, device=device), headers=NO_STORE)


@router.post("/v1/iam/auth/sign-in/web/sign-in", summary="Web sign-in with userName/password")
async def sign_in(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await read_body(request)
    user_name, password = _credentials(body, core)
    # isMobile, inviteCode and referer are accepted and have no effect.
    client = client_info(request, device_key=_device_key(request, body))
    async with AsyncExitStack() as signing_in:
        try:
            proven = await signing_in.enter_async_context(
                core.signin.proving(realm, user_name, password, client))
        except AuthError as exc:
            if exc.code is not ErrorCode.MFA_REQUIRED:
                raise
            return JSONResponse({"isMFAEnabled": True}, headers=NO_STORE)
        return await _signed_in(request, realm, proven, client, body)


@router.post("/v1/iam/auth/sign-in/web/mfa-signin", summary="Web sign-in with a TOTP code")
async def mfa_sign_in(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await read_body(request)
    user_name, password = _credentials(body, core)
    code = string_field(body, "mfaCode", required=True, max_length=64)
    client = client_info(request, device_key=_device_key(request, body))
    async with core.signin.proving(realm, user_name, password, client,
                                   mfa_code=code) as proven:
        return await _signed_in(request, realm, proven, client, body)


async def _refresh(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await read_body(request)
    raw = string_field(body, "refreshToken", required=True, max_length=512)
    assert raw is not None
    # tenantId and userName are accepted and ignored: the refresh token names its session.
    tokens = await core.sessions.refresh(realm, raw, client_info(request),
                                         access_ttl=core.settings.deskera_token_ttl)
    return JSONResponse(await _token_object(core, tokens), headers=NO_STORE)


for _kind in ("web", "mobile", "app"):
    router.add_api_route(f"/v1/iam/auth/{_kind}/getrefreshtoken", _refresh, methods=["POST"],
                         summary=f"Refresh tokens ({_kind} client)")


@router.get("/v1/iam/auth/logout", summary="End the session of the x-access-token")
async def logout(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    principal = await _principal(request, realm)
    await core.sessions.revoke(realm, principal.session.id, client=client_info(request))
    return JSONResponse({"message": "Logged out successfully."}, headers=NO_STORE)


@router.get("/v1/iam/auth/sign-in/login/status", summary="The current session's token object")
async def login_status(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    try:
        principal = await _principal(request, realm)
    except AuthError:
        raise AuthError(ErrorCode.NOT_FOUND, "User is not logged in.") from None
    user = await core.users.get(realm, principal.user_id)
    remaining = max(0, int(principal.claims["exp"]) - int(core.now().timestamp()))
    body: dict[str, Any] = {"accessToken": _access_token(request), "expiresIn": remaining,
                            "tokenType": "Bearer"}
    body.update(await _account_fields(core, user))
    return JSONResponse(body, headers=NO_STORE)


@router.post("/v1/iam/auth/sign-up/web", summary="Web sign-up")
async def sign_up(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await read_body(request)
    email = (string_field(body, "userName", max_length=320)
             or string_field(body, "email", max_length=320))
    if email is None:
        raise BadRequest("userName is required.", field="userName")
    password = string_field(body, "password", required=True,
                            max_length=core.settings.password_max_length)
    new = NewUser(email=email, password=password,
                  given_name=string_field(body, "firstName", max_length=200),
                  family_name=string_field(body, "lastName", max_length=200),
                  phone=string_field(body, "phone", max_length=40))
    prefix = request.url.path[: -len("/v1/iam/auth/sign-up/web")]
    link = (f"{core.settings.public_url}{prefix}{VERIFICATION_PATH}"
            "?token={token}&user={user_id}")
    user = await core.users.sign_up(realm, new, client_info(request),
                                    hooks=[core.verification.sign_up_hook(realm, link=link)])
    return JSONResponse({"guid": user.id, "userName": user.email, "emailVerified": False,
                         "isMFAEnabled": False, "isTrialUser": False}, headers=NO_STORE)


@router.get(VERIFICATION_PATH, summary="Verify an e-mail address from its link")
async def email_verification(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    token = (request.query_params.get("token") or "")[:512]
    user_ref = (request.query_params.get("user") or "")[:320]
    owner = await core.users.find(realm, user_ref) if user_ref else None
    user = await core.verification.confirm_email(realm, token=token,
                                                 user_id=owner.id if owner else user_ref,
                                                 client=client_info(request))
    return JSONResponse({"message": "Email verified successfully.", "guid": user.id,
                         "emailVerified": True}, headers=NO_STORE)


@router.post("/v1/iam/auth/password/forgot", summary="Mail a password reset code")
async def password_forgot(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await read_body(request)
    user_name = string_field(body, "userName", required=True, max_length=320)
    assert user_name is not None
    await core.verification.request_password_reset(realm, user_name, client=client_info(request))
    return JSONResponse({"message": "If the user exists, a confirmation code has been sent "
                                    "to the registered e-mail address."}, headers=NO_STORE)


@router.post("/v1/iam/auth/password/confirm", summary="Set a new password with the mailed code")
async def password_confirm(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await read_body(request)
    user_name = string_field(body, "userName", required=True, max_length=320)
    code = string_field(body, "confirmationCode", required=True, max_length=64)
    password = string_field(body, "password", required=True,
                            max_length=core.settings.password_max_length)
    assert user_name is not None and code is not None and password is not None
    await core.verification.reset_password(realm, password, login_id=user_name, code=code,
                                           client=client_info(request))
    return JSONResponse({"message": "Password changed successfully."}, headers=NO_STORE)
