"""The web-API dialect: an ASP.NET Web API sign-in (4DX OS style, seed 003), under ``/webapi``.

Every call carries the application's ``APIKey`` in the query string; the key names the realm.
Query names, body names and paths match case-insensitively, as ASP.NET binds them. Errors are
ASP.NET's ``{"Message": ...}``; with ``suppressResponseCodes=true`` every answer is HTTP 200 and
a failure reads ``{"Authenticated": false, "Message": ...}``. See ``docs/dialects/webapi.md``.

    POST /api/v1/Authentication/Login       {userName, password, deviceName?,
                                             generateReAuthenticationToken?, mfaCode?}
    POST /api/v1/Authentication/TokenLogin  {reAuthenticationToken}
    POST /api/v1/Authentication/Logout      (APIToken: the session to end)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from authgate.api.surface import (
    NO_STORE,
    BadRequest,
    JSONResponse,
    Surface,
    bool_field,
    client_info,
    read_body,
    string_field,
)
from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Device, Realm, User
from authgate.core.sessions import Tokens

DENIED = "Authorization has been denied for this request."
BAD_CREDENTIALS = "The user name or password is incorrect."

# core code -> (HTTP status, Message or None for the core's own message)
WEBAPI_ERRORS: dict[ErrorCode, tuple[int, str | None]] = {
    ErrorCode.INVALID_REQUEST: (400, None),
    ErrorCode.NOT_FOUND: (404, None),
    ErrorCode.FORBIDDEN: (403, None),
    ErrorCode.INVALID_CREDENTIALS: (401, BAD_CREDENTIALS),
    ErrorCode.USER_NOT_FOUND: (401, BAD_CREDENTIALS),
    ErrorCode.WRONG_PASSWORD: (401, BAD_CREDENTIALS),
    ErrorCode.USER_DISABLED: (403, "The account is disabled."),
    ErrorCode.ACCOUNT_LOCKED: (403, "The account is locked."),
    ErrorCode.TOO_MANY_ATTEMPTS: (429, None),
    ErrorCode.INVALID_API_KEY: (401, "The APIKey is missing, invalid or revoked."),
    ErrorCode.INVALID_TOKEN: (401, DENIED),
    ErrorCode.TOKEN_EXPIRED: (401, DENIED),
    ErrorCode.SESSION_REVOKED: (401, DENIED),
    ErrorCode.MFA_REQUIRED: (401, "A second factor is required: send mfaCode."),
    ErrorCode.INVALID_MFA_CODE: (401, "The mfaCode is invalid."),
    ErrorCode.REALM_NOT_FOUND: (401, "The APIKey is missing, invalid or revoked."),
    ErrorCode.DEVICE_NOT_FOUND: (404, None),
    ErrorCode.TEMPORARILY_UNAVAILABLE: (503, None),
}

LOGIN_DATA_FIELDS = ("Authenticated", "ReAuthenticationToken", "Me", "SessionToken")


def query(request: Request) -> dict[str, list[str]]:
    """Query parameters by lower-cased name (ASP.NET binds names case-insensitively)."""
    cached = getattr(request.state, "webapi_query", None)
    if cached is not None:
        return cached
    found: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        found.setdefault(name.lower(), []).append(value)
    request.state.webapi_query = found
    return found


def query_value(request: Request, name: str) -> str | None:
    values = query(request).get(name.lower())
    return values[0] if values else None


def suppressing(request: Request) -> bool:
    return (query_value(request, "suppressResponseCodes") or "").strip().lower() in ("true",
                                                                                      "1")


class WebApiSurface(Surface):
    name = "webapi"

    def render(self, request: Request, error: AuthError) -> Response:
        status, wire = WEBAPI_ERRORS.get(error.code, (400, None))
        message = wire or error.message
        if error.code is ErrorCode.INVALID_REQUEST and error.details.get("status") in (
                404, 405, 413, 415):
            status = int(error.details["status"])
        headers = dict(NO_STORE)
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        if suppressing(request):
            return JSONResponse({"Authenticated": False, "Message": message}, status_code=200,
                                headers=headers)
        return JSONResponse({"Message": message}, status_code=status, headers=headers)


surface = WebApiSurface()
router = APIRouter(route_class=surface.route_class, tags=["dialect: webapi"])


def _core(request: Request) -> Core:
    return request.app.state.core


async def _realm(request: Request) -> Realm:
    """The realm of the application's APIKey: required and checked on every call."""
    raw = query_value(request, "APIKey")
    if not raw:
        raise AuthError(ErrorCode.INVALID_API_KEY, "The APIKey query parameter is required.")
    return (await _core(request).api_keys.verify(raw.strip())).realm


async def _body(request: Request) -> dict[str, Any]:
    """The body (JSON or form-urlencoded) by lower-cased name."""
    body = await read_body(request)
    return {str(name).lower(): value for name, value in body.items()}


def _text(body: dict[str, Any], name: str, *, required: bool = False,
          max_length: int = 4096) -> str | None:
    try:
        return string_field(body, name.lower(), required=required, max_length=max_length)
    except BadRequest as exc:
        raise BadRequest(exc.message.replace(name.lower(), name), field=name) from None


def _requested_fields(request: Request) -> list[str]:
    """``fields``: a comma list, repeated, or both; names match case-insensitively; unknown
    names are ignored."""
    wanted = {part.strip().lower() for value in query(request).get("fields", [])
              for part in value.split(",") if part.strip()}
    return [name for name in LOGIN_DATA_FIELDS if name.lower() in wanted]


def _me(user: User) -> dict[str, Any]:
    return {"ID": user.id, "FirstName": user.given_name, "LastName": user.family_name,
            "ImageURL": user.picture}


def _login_data(request: Request, tokens: Tokens, reauth_token: str | None) -> Response:
    data: dict[str, Any] = {
        "Authenticated": True,
        "ReAuthenticationToken": reauth_token,
        "Me": _me(tokens.user),
        "SessionToken": tokens.access_token,
    }
    chosen = _requested_fields(request)
    if chosen:  # no known name selected: the whole object
        data = {name: data[name] for name in chosen}
    return JSONResponse(data, headers=NO_STORE)


async def login(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await _body(request)
    user_name = _text(body, "userName", required=True, max_length=320)
    password = _text(body, "password", required=True,
                     max_length=core.settings.password_max_length)
    device_name = _text(body, "deviceName", max_length=200)
    try:
        generate = bool_field(body, "generatereauthenticationtoken")
    except BadRequest:
        raise BadRequest("generateReAuthenticationToken must be a boolean.",
                         field="generateReAuthenticationToken") from None
    if generate and not device_name:
        raise BadRequest("deviceName is required when generateReAuthenticationToken is true.",
                         field="deviceName")
    mfa_code = _text(body, "mfaCode", max_length=64)
    assert user_name is not None and password is not None
    client = client_info(request)
    async with core.signin.proving(realm, user_name, password, client,
                                   mfa_code=mfa_code) as proven:
        device: Device | None = None
        reauth_token: str | None = None
        if device_name:
            device = await core.devices.named(realm, proven.user, device_name, client=client)
            if generate:
                reauth_token = await core.devices.issue_reauth_token(realm, device,
                                                                     client=client)
        tokens = await proven.session(device_id=device.id if device else None,
                                      with_id_token=False)
    return _login_data(request, tokens, reauth_token)


async def token_login(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    body = await _body(request)
    raw = _text(body, "reAuthenticationToken", required=True, max_length=512)
    assert raw is not None
    client = client_info(request)
    used = await core.devices.reauthenticate(realm, raw, client=client)
    tokens = await core.sessions.start(realm, used.user, amr=["reauth"], client=client,
                                       device_id=used.device.id, with_id_token=False)
    return _login_data(request, tokens, used.token)


async def logout(request: Request) -> Response:
    core = _core(request)
    realm = await _realm(request)
    token = query_value(request, "APIToken")
    if not token:
        raise AuthError(ErrorCode.INVALID_TOKEN)
    principal = await core.sessions.authenticate(realm, token.strip()[:8192])
    await core.sessions.revoke(realm, principal.session.id, client=client_info(request))
    return JSONResponse({"Authenticated": False, "LoggedOut": True}, headers=NO_STORE)


ROUTES = (
    ("/api/v1/Authentication/Login", login, "Log a user in"),
    ("/api/v1/Authentication/TokenLogin", token_login,
     "Log a user in with a re-authentication token"),
    ("/api/v1/Authentication/Logout", logout, "End the session named by APIToken"),
)
for _path, _endpoint, _summary in ROUTES:
    router.add_api_route(_path, _endpoint, methods=["POST"], summary=_summary)
    # ASP.NET routes match case-insensitively; the common lower-case spelling is served too.
    router.add_api_route(_path.lower(), _endpoint, methods=["POST"], summary=_summary,
                         include_in_schema=False)
