"""The classroom dialect (InteDashboard style): one identity, many organisation accounts.

A translator over the core: ``core.challenges`` runs the steps of a sign-in (password, choose an
account, e-mailed PIN), ``core.org_policy`` decides which accounts may sign in and which need a
PIN, ``core.sessions`` issues and checks the bearer JWTs, ``core.verification`` resets
passwords. This module only reads requests and writes the service's shapes; every core error
becomes a classroom body in ``ClassroomSurface.render``. See docs/dialects/classroom.md.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException

from authgate.api.deps import get_core
from authgate.api.surface import (
    NO_STORE,
    BadRequest,
    JSONResponse,
    Surface,
    bearer_token,
    client_info,
    read_body,
)
from authgate.core.challenges import AccountChoice, AccountOption, SignInStep
from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Organisation, Realm, User
from authgate.core.org_policy import policy_settings
from authgate.core.sessions import Principal

# The classroom's role names that its MFA flags stand for (see the docs for the mapping).
STUDENT, TEACHER = "Student", "Teacher"
# Classroom organisation settings kept as they are (the core does not read them).
PASSTHROUGH_SETTINGS = ("enableLti", "allowGenericUsers", "defaultTratSettings")

REFUSED = "Identity or Password is invalid."

# core code -> (HTTP status, message). Codes missing here answer 400 with the core's message.
CLASSROOM_ERRORS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_CREDENTIALS: (401, "Password is invalid."),
    ErrorCode.WRONG_PASSWORD: (401, "Password is invalid."),
    ErrorCode.USER_NOT_FOUND: (401, "No user(s) found."),
    ErrorCode.USER_DISABLED: (401, "No user(s) found."),
    ErrorCode.CHALLENGE_INVALID: (401, "Provided login token is invalid."),
    ErrorCode.CHALLENGE_EXPIRED: (401, "Provided login token is invalid."),
    ErrorCode.INVALID_MFA_CODE: (401, "Provided pin is invalid."),
    ErrorCode.MFA_REQUIRED: (401, "Provided login token is invalid."),
    ErrorCode.ACCOUNT_LOCKED: (401, REFUSED),
    ErrorCode.ORGANISATION_SUSPENDED: (401, REFUSED),
    ErrorCode.ORGANISATION_INACTIVE: (401, REFUSED),
    ErrorCode.MEMBERSHIP_INACTIVE: (401, REFUSED),
    ErrorCode.INVALID_TOKEN: (401, "Unauthenticated."),
    ErrorCode.TOKEN_EXPIRED: (401, "Unauthenticated."),
    ErrorCode.SESSION_REVOKED: (401, "Unauthenticated."),
    ErrorCode.TOO_MANY_ATTEMPTS: (429, "Too many attempts. Please try again later."),
    ErrorCode.NOT_FOUND: (404, "404 Not Found"),
    ErrorCode.FORBIDDEN: (403, "403 Forbidden"),
    ErrorCode.REALM_NOT_FOUND: (503, "The classroom realm is not configured."),
    ErrorCode.TEMPORARILY_UNAVAILABLE: (503, "Service Unavailable"),
}

# core code -> the request field a 422 names.
FIELD_ERRORS: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.INVALID_CODE: ("token", "The selected token is invalid."),
    ErrorCode.CODE_EXPIRED: ("token", "The selected token has expired."),
}


def unprocessable(errors: dict[str, list[str]]) -> JSONResponse:
    return JSONResponse({"message": "422 Unprocessable Entity", "errors": errors,
                         "status_code": 422}, status_code=422, headers=NO_STORE)


class ClassroomSurface(Surface):
    name = "classroom"

    def render(self, request: Request, error: AuthError) -> Response:
        if error.code is ErrorCode.INVALID_REQUEST:
            field = error.details.get("field") or "request"
            return unprocessable({field: [error.message]})
        if error.code is ErrorCode.WEAK_PASSWORD:
            problems = error.details.get("problems") or []
            return unprocessable({"password": [f"The password {p}." for p in problems]
                                  or [error.message]})
        if error.code in FIELD_ERRORS:
            field, message = FIELD_ERRORS[error.code]
            return unprocessable({field: [message]})
        status, message = CLASSROOM_ERRORS.get(error.code, (400, error.message))
        if error.code is ErrorCode.MFA_REQUIRED and "otp" in error.details.get("methods", ()):
            # The account has TOTP, which this sign-in has no step to ask for.
            message = "The account requires an authenticator app code."
        body: dict[str, Any] = {"status_code": status, "message": message}
        if error.code is ErrorCode.ACCOUNT_LOCKED:
            body["isLocked"] = 1
        headers = dict(NO_STORE)
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return JSONResponse(body, status_code=status, headers=headers)

    def render_bad_request(self, request: Request, error: BadRequest) -> Response:
        if error.field:
            return unprocessable({error.field: [error.message]})
        status = error.status if error.status in (400, 413, 415) else 400
        return JSONResponse({"status_code": status, "message": error.message},
                            status_code=status, headers=NO_STORE)

    def render_http(self, request: Request, error: HTTPException) -> Response:
        status = error.status_code
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        return JSONResponse({"status_code": status, "message": f"{status} {phrase}"},
                            status_code=status, headers=getattr(error, "headers", None))


surface = ClassroomSurface()
router = APIRouter(route_class=surface.route_class, tags=["classroom"])


# Reading requests (Laravel-style validation messages, answered as 422).

def text(body: dict[str, Any], name: str, *, max_length: int = 4096) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise BadRequest(f"The {name} field is required.", field=name, status=422)
    if not isinstance(value, str):
        raise BadRequest(f"The {name} must be a string.", field=name, status=422)
    if len(value) > max_length:
        raise BadRequest(f"The {name} may not be greater than {max_length} characters.",
                         field=name, status=422)
    return value


def optional_boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    if value in (0, 1, "0", "1", "true", "false"):
        return value in (1, "1", "true")
    raise BadRequest(f"The {name} field must be true or false.", field=name, status=422)


async def classroom_realm(core: Core) -> Realm:
    return await core.realms.require(core.settings.classroom_realm)


# Writing responses.

def organisation_settings(classroom: dict[str, Any]) -> dict[str, Any]:
    """Classroom organisation settings -> the organisation's stored settings: the MFA flags
    become the roles that need a PIN, ``maxFailedSignInAttempts`` the lockout limit; the rest
    is kept as given. For importing organisations and for tests."""
    roles = [role for flag, role in (("mfaForStudents", STUDENT), ("mfaForTeachers", TEACHER))
             if classroom.get(flag)]
    stored = policy_settings(mfa_required_roles=roles,
                             max_failed_sign_in_attempts=classroom.get("maxFailedSignInAttempts"))
    stored.update({key: classroom[key] for key in PASSTHROUGH_SETTINGS if key in classroom})
    return stored


def settings_json(core: Core, org: Organisation) -> dict[str, Any] | None:
    if not org.settings:
        return None
    policy = core.org_policy.policy(org)
    return {
        "enableLti": bool(org.settings.get("enableLti", False)),
        "mfaForStudents": STUDENT in policy.mfa_required_roles,
        "mfaForTeachers": TEACHER in policy.mfa_required_roles,
        "allowGenericUsers": bool(org.settings.get("allowGenericUsers", False)),
        "defaultTratSettings": org.settings.get("defaultTratSettings"),
        "maxFailedSignInAttempts": policy.max_failed_sign_in_attempts,
    }


def organisation_json(core: Core, org: Organisation) -> dict[str, Any]:
    return {"uuid": org.id, "accountName": org.account_name,
            "organisationName": org.display_name, "isActive": int(org.is_active),
            "isSuspended": int(org.is_suspended), "settings": settings_json(core, org),
            "isPaid": int(org.is_paid)}


def option_json(core: Core, option: AccountOption) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": option.role}
    if option.login_token is not None:
        entry["loginToken"] = option.login_token
        entry["is2FAEnabled"] = option.mfa_required
    entry["organisation"] = organisation_json(core, option.account.organisation)
    entry["isLocked"] = int(option.locked)
    if option.refusal is not None:
        entry["message"] = REFUSED
    return entry


def choice_json(core: Core, choice: AccountChoice) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for option in choice.options:
        groups.setdefault(option.account.organisation.id, []).append(option_json(core, option))
    return {"status_code": 200, "message": "OK", "isLocked": int(choice.locked),
            "result": list(groups.values())}


def user_json(core: Core, user: User, role: str | None,
              org: Organisation | None) -> dict[str, Any]:
    return {"uuid": user.id, "identity": user.email or user.username or user.phone,
            "email": user.email, "firstname": user.given_name, "lastname": user.family_name,
            "displayName": user.display_name, "role": role,
            "organisation": organisation_json(core, org) if org is not None else None}


def signed_in(core: Core, step: SignInStep) -> JSONResponse:
    assert step.tokens is not None
    return JSONResponse({"status_code": 200, "data": {
        "token": step.tokens.access_token,
        "user": user_json(core, step.user, step.role, step.account.organisation)}},
        headers=NO_STORE)


async def bearer(request: Request, core: Core, realm: Realm) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise AuthError(ErrorCode.INVALID_TOKEN, "A bearer token is required.")
    return await core.sessions.authenticate(realm, token)


# Routes.

@router.post("/auth/sign-in-verify", summary="Check the identity's password; list its accounts")
async def sign_in_verify(request: Request) -> Response:
    core = get_core(request)
    body = await read_body(request)
    identity = text(body, "identity", max_length=320)
    password = text(body, "password", max_length=core.settings.password_max_length)
    realm = await classroom_realm(core)
    choice = await core.challenges.begin(realm, identity, password, client_info(request))
    return JSONResponse(choice_json(core, choice), headers=NO_STORE)


@router.post("/auth/sign-in", summary="Sign in to the chosen account (or get a PIN e-mailed)")
async def sign_in(request: Request) -> Response:
    core = get_core(request)
    body = await read_body(request)
    login_token = text(body, "loginToken", max_length=512)
    optional_boolean(body, "is2FAEnabled")  # the client's claim; the organisation decides
    realm = await classroom_realm(core)
    step = await core.challenges.choose(realm, login_token, client_info(request))
    if step.mfa_required:
        return JSONResponse({"is2FAEnabled": True, "loginToken": step.pin_token},
                            headers=NO_STORE)
    return signed_in(core, step)


@router.post("/auth/sign-in-with-2fa", summary="Sign in with the e-mailed PIN")
async def sign_in_with_2fa(request: Request) -> Response:
    core = get_core(request)
    body = await read_body(request)
    login_token = text(body, "loginToken", max_length=512)
    pin = text(body, "pin", max_length=32)
    realm = await classroom_realm(core)
    return signed_in(core, await core.challenges.verify_pin(realm, login_token, pin,
                                                            client_info(request)))


@router.post("/auth/resend-2fa", summary="E-mail a new PIN")
async def resend_2fa(request: Request) -> Response:
    core = get_core(request)
    body = await read_body(request)
    login_token = text(body, "loginToken", max_length=512)
    realm = await classroom_realm(core)
    await core.challenges.resend_pin(realm, login_token, client_info(request))
    return JSONResponse({"success": True}, headers=NO_STORE)


@router.get("/profile", summary="The signed-in account")
async def profile(request: Request) -> Response:
    core = get_core(request)
    realm = await classroom_realm(core)
    principal = await bearer(request, core, realm)
    user = await core.users.get(realm, principal.user_id)
    org_id = principal.session.organisation_id
    org = await core.organisations.get(realm, org_id) if org_id else None
    role = principal.claims.get("role")
    return JSONResponse({"status_code": 200, "message": "OK",
                         "data": user_json(core, user, role if isinstance(role, str) else None,
                                           org)}, headers=NO_STORE)


@router.get("/profile/sign-out", summary="End the session of the bearer token")
async def sign_out(request: Request) -> Response:
    core = get_core(request)
    realm = await classroom_realm(core)
    principal = await bearer(request, core, realm)
    await core.sessions.revoke(realm, principal.session.id, user_id=principal.user_id,
                               client=client_info(request))
    return JSONResponse({"invalidated": True}, headers=NO_STORE)


@router.post("/password/send-token", summary="E-mail a password reset token")
async def send_token(request: Request) -> Response:
    core = get_core(request)
    body = await read_body(request)
    email = text(body, "email", max_length=320)
    realm = await classroom_realm(core)
    await core.verification.request_password_reset(realm, email, client=client_info(request))
    # The same answer whether or not the address is known.
    return JSONResponse({"status_code": 200, "message": "OK"}, headers=NO_STORE)


@router.post("/password/reset", summary="Set a new password with the e-mailed token")
async def reset(request: Request) -> Response:
    core = get_core(request)
    body = await read_body(request)
    token = text(body, "token", max_length=512)
    password = text(body, "password", max_length=core.settings.password_max_length)
    confirmation = body.get("password_confirmation")
    if confirmation is not None and confirmation != password:
        raise BadRequest("The password confirmation does not match.", field="password",
                         status=422)
    realm = await classroom_realm(core)
    await core.verification.reset_password(realm, password, token=token,
                                           client=client_info(request))
    return JSONResponse({"status_code": 200, "message": "OK"}, headers=NO_STORE)
