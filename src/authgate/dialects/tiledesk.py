"""The Tiledesk dialect: the sign-in API of tiledesk-server (``routes/auth.js``), over the core.

Served under ``/auth`` and ``/v2/auth`` (and ``/users``, ``/v2/users``) in the realm named by
``settings.tiledesk_realm``. A Tiledesk *project* is an organisation; ``id_project`` is its id.
Tokens are the realm's own JWTs with Tiledesk's claims (``_id``, ``email``, ``firstname``,
``lastname``, ``sub`` = ``user`` | ``guest`` | ``userexternal``, ``jti``), bound to a core session
(``sid``), so they expire and can be revoked; clients send them as ``Authorization: JWT <jwt>``.

This module only translates: validation into express-validator's 422 shape, core results into
Tiledesk's bodies, and core error codes into Tiledesk's statuses and messages (``TiledeskSurface``,
the one place). Every decision is a core call. See docs/dialects/tiledesk.md.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse

from authgate.api.surface import NO_STORE, BadRequest, JSONResponse, Surface, client_info
from authgate.api.surface import read_body
from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm, User
from authgate.core.org_access import CONTACT_EMAIL
from authgate.core.sessions import Principal
from authgate.core.signin import Proven
from authgate.core.users import EMAIL, NewUser
from authgate.crypto.tokens import new_id

PREFIXES = ("", "/v2")
TOKEN_TYPE = "JWT"  # what Tiledesk's tokens declare in their header

# tiledesk-server's errorCodes.js.
VERIFICATION_CODE_EXPIRED = 10005
VERIFICATION_CODE_OTHER_USER = 10006
PROJECT_NOT_FOUND = 11001
PROJECT_ACCESS_DENIED = 11003

# Claims that are the token's own, not the user's: never echoed back as user fields.
REGISTERED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid"})


class Invalid(BadRequest):
    """express-validator's ``errors.array()``: one entry per failed check."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("Invalid value", field=errors[0]["param"], status=422)
        self.errors = errors


def _failure(status: int, **body: Any) -> JSONResponse:
    return JSONResponse({"success": False, **body}, status_code=status, headers=NO_STORE)


class TiledeskSurface(Surface):
    """Core error codes as tiledesk-server answers them. Where Tiledesk words the same failure
    differently per endpoint, the route names its ``action`` on ``request.state``."""

    name = "tiledesk"

    def render(self, request: Request, error: AuthError) -> Response:
        code, action = error.code, getattr(request.state, "tiledesk_action", None)
        if code in (ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED, ErrorCode.SESSION_REVOKED):
            # passport's answer to a missing, forged, expired or revoked token.
            return PlainTextResponse("Unauthorized", status_code=401, headers=NO_STORE)
        if action == "verifyemail" and code in (ErrorCode.INVALID_CODE, ErrorCode.CODE_EXPIRED):
            if error.details.get("reason") == "other_user":
                return _failure(401, error="Trying to use a verification code from another "
                                "user.", error_code=VERIFICATION_CODE_OTHER_USER)
            return _failure(401, error="Unable to verify email: the verification code is "
                            "expired or invalid.", error_code=VERIFICATION_CODE_EXPIRED)
        if action == "resetkey" and code in (ErrorCode.INVALID_CODE, ErrorCode.CODE_EXPIRED):
            return _failure(404, msg="Invalid password reset key")
        if action == "requestresetpsw" and code is ErrorCode.USER_NOT_FOUND:
            return _failure(200, msg="User not found.")
        if action == "changepsw" and code is ErrorCode.WRONG_PASSWORD:
            return _failure(401, msg="Current password is invalid.")
        if code is ErrorCode.WEAK_PASSWORD:
            if error.details.get("reason") == "same_password":
                return _failure(403, message="The new password must be different from the "
                                "previous one.")
            return _failure(403, message="The password does not meet the minimum "
                            "vulnerability requirements", msg=error.message)
        if code is ErrorCode.INVALID_REQUEST:
            if error.details.get("reason") == "aud_required":
                return _failure(400, msg="JWT Aud field is required")
            field = error.details.get("field")
            if field and error.details.get("status") not in (413, 415):
                return self._invalid([{"msg": error.message, "param": field,
                                       "location": error.details.get("location") or "body"}])
            status = int(error.details.get("status") or 400)
            return _failure(status if status in (400, 413, 415) else 400, msg=error.message)
        status, body = SIMPLE.get(code, (400, {"msg": error.message}))
        response = _failure(status, **body)
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    def _invalid(self, errors: list[dict[str, Any]]) -> Response:
        return JSONResponse({"errors": errors}, status_code=422, headers=NO_STORE)

    def render_bad_request(self, request: Request, error: BadRequest) -> Response:
        if isinstance(error, Invalid):
            return self._invalid(error.errors)
        details: dict[str, Any] = {"field": error.field, "location": error.location,
                                   "status": error.status}
        return self.render(request, AuthError(ErrorCode.INVALID_REQUEST, error.message,
                                              details=details))

    def render_validation(self, request: Request, error: RequestValidationError) -> Response:
        errors = []
        for problem in error.errors():
            loc = [str(p) for p in problem.get("loc", ())]
            errors.append({"msg": "Invalid value", "param": ".".join(loc[1:]) or loc[0],
                           "location": loc[0] if loc else "body"})
        return self._invalid(errors or [{"msg": "Invalid value", "param": "",
                                         "location": "body"}])


SIMPLE: dict[ErrorCode, tuple[int, dict[str, Any]]] = {
    # Told apart only when the realm's reveal_unknown_users allows it.
    ErrorCode.USER_NOT_FOUND: (401, {"msg": "Authentication failed. User not found."}),
    ErrorCode.WRONG_PASSWORD: (401, {"msg": "Authentication failed. Wrong password."}),
    ErrorCode.INVALID_CREDENTIALS: (401, {"msg": "Authentication failed. Wrong email or "
                                                 "password."}),
    ErrorCode.USER_DISABLED: (401, {"msg": "Authentication failed. User not active."}),
    ErrorCode.ACCOUNT_LOCKED: (401, {"msg": "Authentication failed. Account locked."}),
    # Tiledesk has no second factor to ask for: an account with TOTP cannot sign in here.
    ErrorCode.MFA_REQUIRED: (401, {"msg": "Authentication failed. The account requires a "
                                          "second factor."}),
    ErrorCode.USER_ALREADY_EXISTS: (403, {"message": "Email already registered"}),
    ErrorCode.MEMBERSHIP_INACTIVE: (401, {"msg": "Authentication failed. Project_user not "
                                                 "active."}),
    ErrorCode.ORGANISATION_NOT_FOUND: (404, {"msg": "Project not found.",
                                             "error_code": PROJECT_NOT_FOUND}),
    ErrorCode.ORGANISATION_INACTIVE: (403, {"msg": "Project not active.",
                                            "error_code": PROJECT_ACCESS_DENIED}),
    ErrorCode.ORGANISATION_SUSPENDED: (403, {"msg": "Project not active.",
                                             "error_code": PROJECT_ACCESS_DENIED}),
    ErrorCode.FORBIDDEN: (403, {"msg": "Unauthorized."}),
    ErrorCode.NOT_FOUND: (404, {"msg": "Object not found."}),
    ErrorCode.REALM_NOT_FOUND: (404, {"msg": "Not found."}),
    ErrorCode.TOO_MANY_ATTEMPTS: (429, {"msg": "Too many attempts; try again later."}),
    ErrorCode.TEMPORARILY_UNAVAILABLE: (503, {"msg": "Service temporarily unavailable."}),
    ErrorCode.INVALID_CODE: (401, {"msg": "The code is invalid."}),
    ErrorCode.CODE_EXPIRED: (401, {"msg": "The code has expired."}),
}

surface = TiledeskSurface()
router = APIRouter(route_class=surface.route_class, tags=["tiledesk"])


def route(method: str, path: str) -> Callable[[Any], Any]:
    """Register a handler under every prefix Tiledesk clients use (``/auth`` and ``/v2/auth``)."""

    def register(handler: Any) -> Any:
        for prefix in PREFIXES:
            router.add_api_route(prefix + path, handler, methods=[method],
                                 include_in_schema=prefix == "")
        return handler

    return register


# Requests: the pieces every route needs.

def _core(request: Request) -> Core:
    return request.app.state.core


async def _realm(request: Request) -> Realm:
    return await _core(request).realms.require(request.app.state.settings.tiledesk_realm)


def _jwt(request: Request) -> str:
    """The token of ``Authorization: JWT <token>`` (passport-jwt's extractor)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "jwt" or not value.strip():
        raise AuthError(ErrorCode.INVALID_TOKEN)
    return value.strip()


async def _principal(request: Request, realm: Realm) -> Principal:
    issuer = _core(request).realms.issuer(realm)
    return await _core(request).sessions.authenticate(realm, _jwt(request), issuer=issuer,
                                                      audience=issuer, subject_claim="_id",
                                                      typ=TOKEN_TYPE)


class Checks:
    """express-validator's ``check(field)`` rules, collected into one 422."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.errors: list[dict[str, Any]] = []

    def _fail(self, name: str) -> None:
        entry: dict[str, Any] = {"msg": "Invalid value", "param": name, "location": "body"}
        if self.body.get(name) is not None:
            entry["value"] = self.body[name]
        self.errors.append(entry)

    def not_empty(self, name: str, max_length: int = 4096) -> str | None:
        value = self.body.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value or len(value) > max_length:
            self._fail(name)
            return None
        return value

    def is_email(self, name: str) -> str | None:
        value = self.body.get(name)
        if not isinstance(value, str) or len(value) > 320 or not EMAIL.match(value.strip()):
            self._fail(name)
            return None
        return value.strip()

    def optional_string(self, name: str, max_length: int = 200) -> str | None:
        value = self.body.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or len(value) > max_length:
            self._fail(name)
            return None
        return value

    def done(self) -> None:
        if self.errors:
            raise Invalid(self.errors)


# Shapes.

def _mongo_date(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _email(user: User) -> str | None:
    return user.email or user.custom_attributes.get(CONTACT_EMAIL)


def _attributes(user: User) -> dict[str, Any]:
    return {k: v for k, v in user.custom_attributes.items() if k != CONTACT_EMAIL}


def user_json(user: User) -> dict[str, Any]:
    """The user as /auth/signin and GET /users return it."""
    return {"_id": user.id, "email": _email(user), "firstname": user.given_name,
            "lastname": user.family_name, "emailverified": user.email_verified}


def user_document(user: User) -> dict[str, Any]:
    """The whole user document, as sign-up, verification and reset return it."""
    body = user_json(user)
    if user.phone:
        body["phone"] = user.phone
    if user.custom_attributes:
        body["attributes"] = _attributes(user)
    body.update({"status": 100 if user.status == "active" else 0,
                 "createdAt": _mongo_date(user.created_at),
                 "updatedAt": _mongo_date(user.updated_at), "__v": 0})
    return body


def _decorated(user: dict[str, Any]) -> dict[str, Any]:
    """tiledesk-server's UserUtil.decorateUser: ``id`` and ``fullName``."""
    user["id"] = user["_id"]
    user["fullName"] = f"{user.get('firstname') or ''} {user.get('lastname') or ''}"
    return user


def _ok(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers=NO_STORE)


async def _token(request: Request, realm: Realm, user: User, *, subject: str, amr: list[str],
                 claims: dict[str, Any], organisation_id: str | None = None,
                 proven: Proven | None = None) -> str:
    """Start a core session (``proven``'s, after a password) and sign Tiledesk's claims for
    it: ``"JWT <jwt>"``."""
    core = _core(request)
    if proven is not None:
        tokens = await proven.session(organisation_id=organisation_id, with_id_token=False)
    else:
        tokens = await core.sessions.start(realm, user, amr=amr, client=client_info(request),
                                           organisation_id=organisation_id,
                                           with_id_token=False)
    session = tokens.session
    issuer = core.realms.issuer(realm)
    now = int(core.now().timestamp())
    signed = await core.keys.sign(realm, typ=TOKEN_TYPE, claims={
        **claims, "iss": issuer, "aud": issuer, "sub": subject, "iat": now,
        "exp": now + request.app.state.settings.tiledesk_token_ttl, "jti": new_id(),
        "sid": session.id})
    return "JWT " + signed


def _links(request: Request) -> tuple[str, str]:
    """Where the mailed links point: the Tiledesk dashboard's verify and reset pages."""
    base = request.app.state.settings.public_url
    return (f"{base}/#/verify/email/{{user_id}}/{{token}}", f"{base}/#/resetpassword/{{token}}")


# Sign-in and sign-up.

@route("POST", "/auth/signin")
async def signin(request: Request) -> Response:
    realm = await _realm(request)
    checks = Checks(await read_body(request, allow_empty=True))
    email = checks.is_email("email")
    password = checks.not_empty("password", _core(request).settings.password_max_length)
    checks.done()
    assert email is not None and password is not None
    async with _core(request).signin.proving(realm, email, password,
                                             client_info(request)) as proven:
        user = proven.user
        token = await _token(request, realm, user, subject="user", amr=proven.amr,
                             claims=user_json(user), proven=proven)
    return _ok({"success": True, "token": token, "user": user_json(user)})


@route("POST", "/auth/signup")
async def signup(request: Request) -> Response:
    core, realm = _core(request), await _realm(request)
    body = await read_body(request, allow_empty=True)
    checks = Checks(body)
    email = checks.is_email("email")
    firstname = checks.not_empty("firstname", 200)
    lastname = checks.not_empty("lastname", 200)
    phone = checks.optional_string("phone", 40)
    checks.done()
    password = body.get("password")
    if not email or not password:
        return _ok({"success": False, "msg": "Please pass email and password."})
    if not isinstance(password, str) or len(password) > core.settings.password_max_length:
        raise Invalid([{"msg": "Invalid value", "param": "password", "location": "body"}])
    hooks = None
    if not body.get("disableEmail"):
        hooks = [core.verification.sign_up_hook(realm, link=_links(request)[0])]
    user = await core.users.sign_up(
        realm, NewUser(email=email.lower(), password=password, given_name=firstname,
                       family_name=lastname, phone=phone),
        client_info(request), hooks=hooks)
    return _ok({"success": True, "msg": "Successfully created new user.",
                "user": user_document(user)})


@route("POST", "/auth/signinAnonymously")
async def signin_anonymously(request: Request) -> Response:
    realm = await _realm(request)
    body = await read_body(request, allow_empty=True)
    checks = Checks(body)
    id_project = checks.not_empty("id_project", 64)
    checks.done()
    assert id_project is not None
    found = await _core(request).org_access.guest(
        realm, id_project, given_name=body.get("firstname"), family_name=body.get("lastname"),
        contact_email=body.get("email"), attributes=body.get("attributes"),
        client=client_info(request))
    user = found.user
    claims = {"_id": user.id, "firstname": user.given_name, "lastname": user.family_name,
              "email": _email(user), "attributes": _attributes(user),
              "id_project": found.organisation.id}
    token = await _token(request, realm, user, subject="guest", amr=["anon"], claims=claims,
                         organisation_id=found.organisation.id)
    body_user = _decorated({**claims, "emailverified": False,
                            "createdAt": _mongo_date(user.created_at),
                            "updatedAt": _mongo_date(user.updated_at), "__v": 0})
    return _ok({"success": True, "token": token, "user": body_user})


@route("POST", "/auth/signinWithCustomToken")
async def signin_with_custom_token(request: Request) -> Response:
    realm = await _realm(request)
    found = await _core(request).org_access.customer_token(realm, _jwt(request),
                                                           client=client_info(request))
    user, org = found.user, found.organisation
    role = found.membership.roles[0] if found.membership.roles else None
    claims = {"_id": user.id, "firstname": user.given_name, "lastname": user.family_name,
              "email": _email(user), "attributes": _attributes(user), "id_project": org.id,
              "role": role}
    token = await _token(request, realm, user, subject="userexternal", amr=["custom"],
                         claims=claims, organisation_id=org.id)
    # Tiledesk answers with the customer's own claims as the user; Authgate's id replaces the
    # customer's ``_id``, which stays readable as ``externalId``.
    echoed = {k: v for k, v in found.claims.items() if k not in REGISTERED_CLAIMS}
    echoed.update({"_id": user.id, "externalId": str(found.claims.get("_id")),
                   "id_project": org.id, "role": role})
    return _ok({"success": True, "token": token, "user": _decorated(echoed)})


# The signed-in user.

@route("GET", "/users")
async def me(request: Request) -> Response:
    realm = await _realm(request)
    principal = await _principal(request, realm)
    user = await _core(request).users.get(realm, principal.user_id)
    return _ok(user_json(user))


router.add_api_route("/users/", me, methods=["GET"], include_in_schema=False)
router.add_api_route("/v2/users/", me, methods=["GET"], include_in_schema=False)


@route("PUT", "/users/changepsw")
async def change_password(request: Request) -> Response:
    request.state.tiledesk_action = "changepsw"
    core, realm = _core(request), await _realm(request)
    principal = await _principal(request, realm)
    checks = Checks(await read_body(request, allow_empty=True))
    old = checks.not_empty("oldpsw", core.settings.password_max_length)
    new = checks.not_empty("newpsw", core.settings.password_max_length)
    checks.done()
    assert old is not None and new is not None
    await core.users.change_password(realm, principal.user_id, old, new,
                                     keep_session_id=principal.session.id,
                                     client=client_info(request))
    return _ok({"message": "Password change successful"})


@route("GET", "/users/resendverifyemail")
async def resend_verify_email(request: Request) -> Response:
    core, realm = _core(request), await _realm(request)
    principal = await _principal(request, realm)
    user = await core.users.get(realm, principal.user_id)
    if user.email:
        await core.verification.request_email_verification(
            realm, user.email, link=_links(request)[0], client=client_info(request))
    return _ok({"success": True, "msg": "Verification email successfully sent"})


# E-mail verification and password reset.

@route("PUT", "/auth/verifyemail/{userid}/{code}")
async def verify_email(userid: str, code: str, request: Request) -> Response:
    request.state.tiledesk_action = "verifyemail"
    realm = await _realm(request)
    user = await _core(request).verification.confirm_email(
        realm, token=code, user_id=userid[:64], client=client_info(request))
    return _ok(user_document(user))


@route("PUT", "/auth/requestresetpsw")
async def request_reset_password(request: Request) -> Response:
    request.state.tiledesk_action = "requestresetpsw"
    realm = await _realm(request)
    checks = Checks(await read_body(request, allow_empty=True))
    email = checks.not_empty("email", 320)
    checks.done()
    assert email is not None
    await _core(request).verification.request_password_reset(
        realm, email, link=_links(request)[1], client=client_info(request))
    return _ok({"success": True, "message": "An email has been sent to reset your password"})


@route("PUT", "/auth/resetpsw/{key}")
async def reset_password(key: str, request: Request) -> Response:
    request.state.tiledesk_action = "resetkey"
    core, realm = _core(request), await _realm(request)
    checks = Checks(await read_body(request, allow_empty=True))
    password = checks.not_empty("password", core.settings.password_max_length)
    checks.done()
    assert password is not None
    user = await core.verification.reset_password(realm, password, token=key,
                                                  client=client_info(request))
    return _ok({"message": "Password change successful", "user": user_document(user)})


@route("GET", "/auth/checkpswresetkey/{key}")
async def check_reset_key(key: str, request: Request) -> Response:
    request.state.tiledesk_action = "resetkey"
    realm = await _realm(request)
    user = await _core(request).verification.check_reset(realm, key)
    return _ok({"message": "Valid password reset key", "user": user_document(user)})
