"""The Descope dialect: password sign-in and sessions as Descope's API and SDKs expect them.

A Descope *Project ID* names a realm. Every request carries ``Authorization: Bearer <ProjectID>``
and, for calls on behalf of a signed-in user, ``Bearer <ProjectID>:<refreshJwt>`` (or the ``DSR``
cookie). Both the session JWT (``DS``) and the refresh JWT (``DSR``) are JWTs signed with the
realm's key and published at ``/v2/keys/<ProjectID>``. The refresh JWT is a signed envelope around
the core's opaque refresh token (claim ``rt``), so rotation and reuse detection apply to it.

This module only translates: every decision is a core service call. Error codes are mapped to
Descope's ``{errorCode, errorDescription, errorMessage}`` envelope in ``DescopeSurface`` alone.
See docs/dialects/descope.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt
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
from authgate.core.models import Realm, Session, User
from authgate.core.organisations import Account
from authgate.core.sessions import Tokens, check_custom_claims
from authgate.core.signin import Proven
from authgate.core.users import PHONE, NewUser
from authgate.crypto.tokens import new_id

SESSION_COOKIE = "DS"
REFRESH_COOKIE = "DSR"
TOKEN_TYPE = "JWT"  # what Descope's session and refresh JWTs declare in their header
# Claims this dialect sets itself; customClaims may not shadow them.
DESCOPE_CLAIMS = frozenset({"drn", "roles", "permissions", "tenants", "dct", "su", "rt", "cc",
                            "dsub", "nsec"})


# Errors: the one place where core codes become Descope's envelope.

class MissingArgument(BadRequest):
    """A required argument is absent (Descope's E011002)."""


# core code -> (HTTP status, errorCode, errorDescription)
DESCOPE_ERRORS: dict[ErrorCode, tuple[int, str, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "E011004", "Invalid arguments"),
    ErrorCode.NOT_FOUND: (404, "E011003", "Invalid request"),
    ErrorCode.FORBIDDEN: (403, "E011007", "Not allowed"),
    ErrorCode.REALM_NOT_FOUND: (400, "E011005", "Unknown project"),
    ErrorCode.INVALID_API_KEY: (401, "E011008", "Invalid management key"),
    ErrorCode.INVALID_CREDENTIALS: (401, "E061101", "Invalid login id or password"),
    ErrorCode.WRONG_PASSWORD: (401, "E061101", "Invalid login id or password"),
    ErrorCode.TOO_MANY_ATTEMPTS: (429, "E061103", "Too many attempts"),
    ErrorCode.ACCOUNT_LOCKED: (403, "E061104", "Account locked"),
    ErrorCode.MFA_REQUIRED: (401, "E061105", "A second factor is required"),
    ErrorCode.INVALID_MFA_CODE: (401, "E061106", "Invalid second-factor code"),
    ErrorCode.CHALLENGE_INVALID: (401, "E061107", "Invalid login challenge"),
    ErrorCode.CHALLENGE_EXPIRED: (401, "E061108", "Login challenge expired"),
    ErrorCode.INVALID_TOKEN: (401, "E061201", "Invalid token"),
    ErrorCode.TOKEN_EXPIRED: (401, "E061202", "Token expired"),
    ErrorCode.REFRESH_TOKEN_REUSED: (401, "E061203", "Refresh token reused"),
    ErrorCode.SESSION_REVOKED: (401, "E061204", "Session revoked"),
    ErrorCode.INVALID_CODE: (400, "E061301", "Invalid code"),
    ErrorCode.CODE_EXPIRED: (400, "E061302", "Code expired"),
    ErrorCode.USER_ALREADY_EXISTS: (400, "E062107", "User already exists"),
    ErrorCode.USER_NOT_FOUND: (401, "E062108", "User not found"),
    ErrorCode.USER_DISABLED: (403, "E062109", "User disabled"),
    ErrorCode.WEAK_PASSWORD: (400, "E062110", "Password does not meet the policy"),
    ErrorCode.EMAIL_NOT_VERIFIED: (403, "E062111", "E-mail not verified"),
    ErrorCode.ORGANISATION_NOT_FOUND: (400, "E063101", "Tenant not found"),
    ErrorCode.ORGANISATION_INACTIVE: (403, "E063102", "Tenant not active"),
    ErrorCode.ORGANISATION_SUSPENDED: (403, "E063103", "Tenant suspended"),
    ErrorCode.MEMBERSHIP_INACTIVE: (403, "E063104", "Tenant membership not active"),
    ErrorCode.DEVICE_NOT_FOUND: (404, "E011009", "Unknown device"),
    ErrorCode.TEMPORARILY_UNAVAILABLE: (503, "E011010", "Service temporarily unavailable"),
}
MALFORMED = (400, "E011001", "Bad request")
MISSING = (400, "E011002", "Missing arguments")
INVALID_REQUEST = (400, "E011003", "Invalid request")


class DescopeSurface(Surface):
    name = "descope"

    def render(self, request: Request, error: AuthError) -> Response:
        status, code, description = DESCOPE_ERRORS.get(error.code, INVALID_REQUEST)
        kind = error.details.get("descope")
        if kind == "missing":
            status, code, description = MISSING
        elif kind == "malformed":
            status, code, description = MALFORMED
        elif kind == "request":
            status, code, description = INVALID_REQUEST
        wire_status = error.details.get("status")
        if error.code in (ErrorCode.INVALID_REQUEST, ErrorCode.NOT_FOUND) and \
                wire_status in (404, 405, 413, 415):
            status, code, description = INVALID_REQUEST if wire_status in (404, 405) \
                else MALFORMED
            status = int(wire_status)
        headers = dict(NO_STORE)
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return JSONResponse({"errorCode": code, "errorDescription": description,
                             "errorMessage": error.message}, status_code=status,
                            headers=headers)

    def render_bad_request(self, request: Request, error: BadRequest) -> Response:
        if isinstance(error, MissingArgument):
            kind = "missing"
        elif error.status in (404, 405):
            kind = "request"
        elif error.field is not None:
            kind = "invalid"
        else:
            kind = "malformed"
        return self.render(request, AuthError(
            ErrorCode.INVALID_REQUEST, error.message,
            details={"descope": kind, "field": error.field, "status": error.status}))


surface = DescopeSurface()
router = APIRouter(route_class=surface.route_class, tags=["descope"])


# Reading requests.

def _core(request: Request) -> Core:
    return request.app.state.core


def _credentials(request: Request) -> tuple[str, str | None]:
    """(project id, token) from ``Authorization: Bearer <ProjectID>[:<token>[:<key>]]``; the
    token falls back to the DSR cookie, then the DS cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        value = request.headers.get("x-descope-project-id", "").strip()
    if not value:
        raise MissingArgument("The project id is missing: send 'Authorization: Bearer "
                              "<ProjectID>'.", field="Authorization", location="header")
    parts = value.split(":", 2)
    project_id, token = parts[0], (parts[1] if len(parts) > 1 else "")
    if not project_id:
        raise MissingArgument("The project id is missing.", field="Authorization",
                              location="header")
    token = token or request.cookies.get(REFRESH_COOKIE) or request.cookies.get(SESSION_COOKIE)
    return project_id, token or None


async def _realm(request: Request) -> tuple[Realm, str | None]:
    project_id, token = _credentials(request)
    return await _core(request).realms.require_project(project_id), token


def _required(body: dict[str, Any], name: str, *, max_length: int = 4096) -> str:
    if body.get(name) in (None, ""):
        raise MissingArgument(f"{name} is required.", field=name)
    value = string_field(body, name, max_length=max_length)
    assert value is not None
    return value


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object.", field=name, value=value)
    return value


def _issuer(core: Core, realm: Realm) -> str:
    return f"{core.settings.issuer}/descope/{realm.project_id}"


async def _refresh_claims(request: Request, realm: Realm, token: str | None) -> dict[str, Any]:
    """The verified claims of a refresh JWT of this project (signature, audience, expiry)."""
    if not token:
        raise MissingArgument("A refresh token is required: send 'Authorization: Bearer "
                              "<ProjectID>:<refreshJwt>' or the DSR cookie.",
                              field="Authorization", location="header")
    core = _core(request)
    claims = await core.keys.verify(realm, token, issuer=_issuer(core, realm),
                                    audience=realm.project_id, typ=TOKEN_TYPE)
    if claims.get("drn") != "DSR" or not isinstance(claims.get("rt"), str):
        raise AuthError(ErrorCode.INVALID_TOKEN, "A refresh token is required.")
    return claims


async def _session_user(request: Request, realm: Realm,
                        token: str | None) -> tuple[Session, User]:
    """The live session and user behind a refresh JWT or, for calls that neither rotate nor
    change anything but the session itself (me, tenants, history, logout), a session JWT."""
    core = _core(request)
    if token and _looks_like_session_jwt(token):
        principal = await core.sessions.authenticate(realm, token, issuer=_issuer(core, realm),
                                                     audience=realm.project_id, typ=TOKEN_TYPE)
        if principal.claims.get("drn") != "DS":
            raise AuthError(ErrorCode.INVALID_TOKEN)
        return principal.session, await core.users.get(realm, principal.user_id)
    claims = await _refresh_claims(request, realm, token)
    return await core.sessions.holder(realm, claims["rt"], client_info(request))


def _looks_like_session_jwt(token: str) -> bool:
    """Whether a JWT says it is a session token (checked again once its signature is)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    return claims.get("drn") == "DS"


# Writing responses.

def user_json(user: User, accounts: list[Account], kinds: set[str]) -> dict[str, Any]:
    """Descope's user object."""
    return {
        "userId": user.id,
        "loginIds": user.login_ids,
        "name": user.display_name or "",
        "givenName": user.given_name or "",
        "middleName": user.middle_name or "",
        "familyName": user.family_name or "",
        "email": user.email or "",
        "phone": user.phone or "",
        "verifiedEmail": user.email_verified,
        "verifiedPhone": user.phone_verified,
        "roleNames": list(user.roles),
        "userTenants": [{"tenantId": a.organisation.id,
                         "tenantName": a.organisation.display_name,
                         "roleNames": list(a.membership.roles), "permissions": []}
                        for a in accounts],
        "status": "enabled" if user.status == "active" else "disabled",
        "picture": user.picture or "",
        "test": False,
        "customAttributes": dict(user.custom_attributes),
        "createdTime": int(user.created_at.timestamp()),
        "TOTP": "totp" in kinds,
        "webauthn": False,
        "password": "password" in kinds,
        "SAML": False,
        "OAuth": {},
        "ssoAppIds": [],
        "externalIds": [user.external_id] if user.external_id else [],
        "editable": True,
    }


async def _user_json(core: Core, realm: Realm, user: User,
                     accounts: list[Account] | None = None) -> dict[str, Any]:
    if accounts is None:
        accounts = await core.organisations.tenancy(realm, user.id)
    return user_json(user, accounts, await core.users.credential_kinds(user.id))


async def issue(core: Core, realm: Realm, tokens: Tokens, *, custom: dict[str, Any] | None = None,
                stepped_up: bool = False,
                accounts: list[Account] | None = None) -> tuple[str, str, int]:
    """Sign the session JWT and the refresh JWT for a core sign-in or refresh.

    Returns (session JWT, refresh JWT, refresh lifetime in seconds). The refresh JWT carries
    the core's opaque refresh token (``rt``) and what must survive a refresh: custom claims
    (``cc``) and the step-up mark (``su``)."""
    user, session = tokens.user, tokens.session
    now = core.now()
    iat = int(now.timestamp())
    if accounts is None:
        accounts = await core.organisations.tenancy(realm, user.id)
    base = {"iss": _issuer(core, realm), "sub": user.id, "aud": realm.project_id, "iat": iat,
            "sid": session.id, "amr": list(session.amr)}
    claims: dict[str, Any] = {
        **(custom or {}), **base, "jti": new_id(), "drn": "DS",
        "exp": iat + core.settings.access_token_ttl,
        "roles": list(user.roles), "permissions": [],
        "tenants": {a.organisation.id: {"roles": list(a.membership.roles), "permissions": []}
                    for a in accounts},
    }
    if session.organisation_id and session.organisation_id in claims["tenants"]:
        claims["dct"] = session.organisation_id
    if stepped_up:
        claims["su"] = True
    refresh_until = min(now + timedelta(seconds=core.settings.refresh_token_ttl),
                        session.expires_at)
    refresh_ttl = max(0, int((refresh_until - now).total_seconds()))
    refresh: dict[str, Any] = {**base, "jti": new_id(), "drn": "DSR", "exp": iat + refresh_ttl,
                               "rt": tokens.refresh_token}
    if custom:
        refresh["cc"] = custom
    if stepped_up:
        refresh["su"] = True
    return (await core.keys.sign(realm, claims, typ=TOKEN_TYPE),
            await core.keys.sign(realm, refresh, typ=TOKEN_TYPE),
            refresh_ttl)


async def _jwt_response(request: Request, realm: Realm, tokens: Tokens, *,
                        custom: dict[str, Any] | None = None, stepped_up: bool = False,
                        first_seen: bool | None = None, with_user: bool = True) -> Response:
    core = _core(request)
    accounts = await core.organisations.tenancy(realm, tokens.user.id)
    session_jwt, refresh_jwt, refresh_ttl = await issue(core, realm, tokens, custom=custom,
                                                        stepped_up=stepped_up,
                                                        accounts=accounts)
    expires = int(core.now().timestamp()) + refresh_ttl
    body: dict[str, Any] = {
        "sessionJwt": session_jwt, "refreshJwt": refresh_jwt, "cookieDomain": "",
        "cookiePath": "/", "cookieMaxAge": refresh_ttl, "cookieExpiration": expires,
    }
    if with_user:
        body["user"] = await _user_json(core, realm, tokens.user, accounts)
    if first_seen is not None:
        body["firstSeen"] = first_seen
    response = JSONResponse(body, headers=NO_STORE)
    secure = core.settings.public_url.startswith("https://")
    response.set_cookie(SESSION_COOKIE, session_jwt, max_age=core.settings.access_token_ttl,
                        path="/", secure=secure, httponly=False, samesite="lax")
    response.set_cookie(REFRESH_COOKIE, refresh_jwt, max_age=refresh_ttl, path="/",
                        secure=secure, httponly=True, samesite="strict")
    return response


def _signed_out() -> Response:
    response = JSONResponse({}, headers=NO_STORE)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(REFRESH_COOKIE, path="/")
    return response


@dataclass(slots=True)
class LoginOptions:
    """``loginOptions`` as the SDK sends them; with stepup or mfa, the verified claims of the
    refresh JWT the request carries."""

    custom: dict[str, Any]
    stepup: bool
    mfa: bool
    revoke_others: bool
    refresh: dict[str, Any] | None = None


async def _login_options(request: Request, realm: Realm, token: str | None,
                         body: dict[str, Any]) -> LoginOptions:
    options = _object(body, "loginOptions")
    found = LoginOptions(
        custom=check_custom_claims(options.get("customClaims"), reserved=DESCOPE_CLAIMS),
        stepup=bool_field(options, "stepup"), mfa=bool_field(options, "mfa"),
        revoke_others=bool_field(options, "revokeOtherSessions"))
    if found.stepup or found.mfa:
        found.refresh = await _refresh_claims(request, realm, token)
    return found


async def _start(request: Request, realm: Realm, proven: Proven, options: LoginOptions, *,
                 first_seen: bool) -> Response:
    """Start a session after a password check, or step up the session of the refresh JWT."""
    core = _core(request)
    client = client_info(request)
    custom = options.custom
    user = proven.user
    if options.refresh is not None:
        custom = {**(options.refresh.get("cc") or {}), **custom}
        tokens = await core.sessions.step_up(realm, options.refresh["rt"], user, amr=["pwd"],
                                             mfa=options.mfa, client=client)
        stepped_up = options.stepup or bool(options.refresh.get("su"))
    else:
        tokens = await proven.session(with_id_token=False)
        stepped_up = False
    if options.revoke_others:
        await core.sessions.revoke_all(realm, user.id, except_session_id=tokens.session.id,
                                       client=client)
    return await _jwt_response(request, realm, tokens, custom=custom, stepped_up=stepped_up,
                               first_seen=first_seen)


# Keys.

@router.get("/v2/keys/{project_id}", summary="The project's public keys (JWKS)")
async def keys(project_id: str, request: Request) -> Response:
    core = _core(request)
    realm = await core.realms.require_project(project_id)
    return Response(await core.keys.jwks(realm), media_type="application/json",
                    headers={"Cache-Control": "public, max-age=300"})


# Password.

@router.post("/v1/auth/password/signup", summary="Sign up with a login id and password")
async def password_signup(request: Request) -> Response:
    realm, token = await _realm(request)
    core = _core(request)
    body = await read_body(request, allow_form=False)
    login_id = _required(body, "loginId", max_length=320)
    password = _required(body, "password", max_length=core.settings.password_max_length)
    profile = _object(body, "user")
    new = NewUser(password=password,
                  name=string_field(profile, "name", max_length=200),
                  given_name=string_field(profile, "givenName", max_length=200),
                  middle_name=string_field(profile, "middleName", max_length=200),
                  family_name=string_field(profile, "familyName", max_length=200))
    _assign_login_ids(new, login_id, string_field(profile, "email", max_length=320),
                      string_field(profile, "phone", max_length=40))
    custom = check_custom_claims(_object(body, "loginOptions").get("customClaims"),
                                 reserved=DESCOPE_CLAIMS)
    client = client_info(request)
    user = await core.users.sign_up(realm, new, client)
    tokens = await core.sessions.start(realm, user, amr=["pwd"], client=client,
                                       with_id_token=False)
    return await _jwt_response(request, realm, tokens, custom=custom, first_seen=True)


def _assign_login_ids(new: NewUser, login_id: str, email: str | None,
                      phone: str | None) -> None:
    """Descope's loginId is any string; Authgate's login ids are an e-mail, a phone or a
    username. The loginId takes the slot its form names; user.email and user.phone fill the
    others, and must agree with the loginId when they name the same slot."""
    if "@" in login_id:
        new.email = login_id
    elif PHONE.match(login_id):
        new.phone = login_id
    else:
        new.username = login_id
    for slot, value in (("email", email), ("phone", phone)):
        if value is None:
            continue
        current = getattr(new, slot)
        if current is None:
            setattr(new, slot, value)
        elif current.strip().casefold() != value.strip().casefold():
            raise BadRequest(f"user.{slot} must match the loginId.", field=f"user.{slot}")


@router.post("/v1/auth/password/signin", summary="Sign in with a login id and password")
async def password_signin(request: Request) -> Response:
    realm, token = await _realm(request)
    core = _core(request)
    body = await read_body(request, allow_form=False)
    login_id = _required(body, "loginId", max_length=320)
    password = _required(body, "password", max_length=core.settings.password_max_length)
    string_field(body, "ssoAppId", max_length=200)  # accepted, not used (no SSO apps)
    options = await _login_options(request, realm, token, body)  # before any password work
    async with core.signin.proving(realm, login_id, password, client_info(request)) as proven:
        return await _start(request, realm, proven, options,
                            first_seen=proven.user.last_sign_in_at is None)


@router.post("/v1/auth/password/replace", summary="Replace a password, proving the old one")
async def password_replace(request: Request) -> Response:
    realm, _ = await _realm(request)
    core = _core(request)
    body = await read_body(request, allow_form=False)
    login_id = _required(body, "loginId", max_length=320)
    old = _required(body, "oldPassword", max_length=core.settings.password_max_length)
    new = _required(body, "newPassword", max_length=core.settings.password_max_length)
    client = client_info(request)
    user = (await core.signin.password(realm, login_id, old, client)).user
    user.security_stamp = await core.users.set_password(realm, user.id, new, client=client)
    tokens = await core.sessions.start(realm, user, amr=["pwd"], client=client,
                                       with_id_token=False)
    return await _jwt_response(request, realm, tokens, first_seen=False)


@router.post("/v1/auth/password/update", summary="Set a new password for the session's user")
async def password_update(request: Request) -> Response:
    realm, token = await _realm(request)
    core = _core(request)
    body = await read_body(request, allow_form=False)
    login_id = _required(body, "loginId", max_length=320)
    new = _required(body, "newPassword", max_length=core.settings.password_max_length)
    claims = await _refresh_claims(request, realm, token)
    client = client_info(request)
    session, user = await core.sessions.holder(realm, claims["rt"], client)
    await core.users.update_password(realm, user.id, login_id, new,
                                     keep_session_id=session.id, client=client)
    return JSONResponse({}, headers=NO_STORE)


@router.post("/v1/auth/password/reset", summary="E-mail a password reset code")
async def password_reset(request: Request) -> Response:
    realm, _ = await _realm(request)
    body = await read_body(request, allow_form=False)
    login_id = _required(body, "loginId", max_length=320)
    string_field(body, "redirectUrl", max_length=2048)  # accepted, not used: see the docs
    _object(body, "templateOptions")
    await _core(request).verification.request_password_reset(realm, login_id,
                                                             client=client_info(request))
    return JSONResponse({"resetMethod": "email", "maskedEmail": _mask(login_id)},
                        headers=NO_STORE)


def _mask(login_id: str) -> str:
    """A masked form of the address the client typed (never one looked up: no account
    is revealed)."""
    local, at, domain = login_id.partition("@")
    if not at:
        return ""
    return f"{local[:1]}***@{domain[:1]}***"


@router.get("/v1/auth/password/policy", summary="The password policy")
async def password_policy(request: Request) -> Response:
    await _realm(request)
    policy = _core(request).users.policy
    return JSONResponse({"minLength": policy.min_length, "maxLength": policy.max_length,
                         "lowercase": False, "uppercase": False, "number": False,
                         "nonAlphanumeric": False, "rejectCommon": policy.reject_common,
                         "active": True}, headers=NO_STORE)


# Sessions.

@router.post("/v1/auth/refresh", summary="Refresh the session (rotates the refresh token)")
async def refresh(request: Request) -> Response:
    realm, token = await _realm(request)
    await read_body(request, allow_form=False, allow_empty=True)
    claims = await _refresh_claims(request, realm, token)
    tokens = await _core(request).sessions.refresh(realm, claims["rt"], client_info(request),
                                                   with_id_token=False)
    return await _jwt_response(request, realm, tokens, custom=claims.get("cc") or None,
                               stepped_up=bool(claims.get("su")), with_user=False)


@router.post("/v1/auth/logout", summary="End this session")
async def logout(request: Request) -> Response:
    realm, token = await _realm(request)
    await read_body(request, allow_form=False, allow_empty=True)
    session, user = await _session_user(request, realm, token)
    await _core(request).sessions.revoke(realm, session.id, user_id=user.id,
                                         client=client_info(request))
    return _signed_out()


@router.post("/v1/auth/logoutall", summary="End every session of this user")
async def logout_all(request: Request) -> Response:
    realm, token = await _realm(request)
    await read_body(request, allow_form=False, allow_empty=True)
    _, user = await _session_user(request, realm, token)
    await _core(request).sessions.revoke_all(realm, user.id, client=client_info(request))
    return _signed_out()


@router.get("/v1/auth/me", summary="The session's user")
async def me(request: Request) -> Response:
    realm, token = await _realm(request)
    _, user = await _session_user(request, realm, token)
    return JSONResponse(await _user_json(_core(request), realm, user), headers=NO_STORE)


@router.get("/v1/auth/me/tenants", summary="The tenants of the session's user",
            operation_id="descope_my_tenants_get")
@router.post("/v1/auth/me/tenants", summary="The tenants of the session's user (as the SDK "
             "asks: POST {dct, ids})", operation_id="descope_my_tenants_post")
async def my_tenants(request: Request) -> Response:
    realm, token = await _realm(request)
    body = await read_body(request, allow_form=False, allow_empty=True)
    dct = bool_field(body, "dct")
    ids = body.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise BadRequest("ids must be a list of strings.", field="ids", value=ids)
    session, user = await _session_user(request, realm, token)
    accounts = await _core(request).organisations.tenancy(realm, user.id)
    if dct:
        accounts = [a for a in accounts if a.organisation.id == session.organisation_id]
    elif ids:
        accounts = [a for a in accounts if a.organisation.id in set(ids)]
    return JSONResponse({"tenants": [
        {"id": a.organisation.id, "name": a.organisation.display_name,
         "customAttributes": {}} for a in accounts]}, headers=NO_STORE)


@router.get("/v1/auth/me/history", summary="The sign-ins of the session's user")
async def my_history(request: Request) -> Response:
    realm, token = await _realm(request)
    _, user = await _session_user(request, realm, token)
    events = await _core(request).audit.sign_ins(realm.id, user.id, limit=100)
    return JSONResponse([{"userId": user.id, "loginTime": int(event.at.timestamp()),
                          "city": "", "country": "", "ip": event.ip or ""}
                         for event in events], headers=NO_STORE)


@router.post("/v1/auth/tenant/select", summary="Select the session's tenant")
async def select_tenant(request: Request) -> Response:
    realm, token = await _realm(request)
    body = await read_body(request, allow_form=False)
    tenant = _required(body, "tenant", max_length=100)
    claims = await _refresh_claims(request, realm, token)
    core = _core(request)
    client = client_info(request)
    session, user = await core.sessions.holder(realm, claims["rt"], client)
    await core.organisations.select_for_session(realm, session.id, user.id, tenant, client)
    tokens = await core.sessions.refresh(realm, claims["rt"], client, with_id_token=False)
    return await _jwt_response(request, realm, tokens, custom=claims.get("cc") or None,
                               stepped_up=bool(claims.get("su")))
