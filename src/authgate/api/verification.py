"""Native routes for e-mailed codes: verify an address, reset a forgotten password.

Requests answer 202 whether or not the address belongs to an account (unless the realm's
``reveal_unknown_users`` allows saying so). Confirmations take either the link ``token`` or the
``email`` and the typed ``code``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from authgate.api.account import user_json
from authgate.api.deps import get_core, get_realm
from authgate.api.errors import native
from authgate.api.surface import NO_STORE, JSONResponse, client_info, read_body, string_field
from authgate.core.models import Realm

router = APIRouter(route_class=native.route_class, tags=["verification"])

ACCEPTED = {"status": "accepted"}


@router.post("/verify-email/request", status_code=202, summary="Mail a verification code")
async def verify_email_request(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    body = await read_body(request)
    email = string_field(body, "email", required=True, max_length=320)
    assert email is not None
    await get_core(request).verification.request_email_verification(
        realm, email, client=client_info(request))
    return JSONResponse(ACCEPTED, status_code=202, headers=NO_STORE)


@router.post("/verify-email/confirm", summary="Confirm an address with its code")
async def verify_email_confirm(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    body = await read_body(request)
    user = await get_core(request).verification.confirm_email(
        realm, token=string_field(body, "token", max_length=256),
        login_id=string_field(body, "email", max_length=320),
        code=string_field(body, "code", max_length=32), client=client_info(request))
    return JSONResponse(user_json(user), headers=NO_STORE)


@router.post("/password/forgot", status_code=202, summary="Mail a password-reset code")
async def password_forgot(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    body = await read_body(request)
    email = string_field(body, "email", required=True, max_length=320)
    assert email is not None
    await get_core(request).verification.request_password_reset(
        realm, email, client=client_info(request))
    return JSONResponse(ACCEPTED, status_code=202, headers=NO_STORE)


@router.post("/password/reset", status_code=204, summary="Set a new password with a reset code")
async def password_reset(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    core = get_core(request)
    body = await read_body(request)
    password = string_field(body, "password", required=True,
                            max_length=core.settings.password_max_length)
    assert password is not None
    await core.verification.reset_password(
        realm, password, token=string_field(body, "token", max_length=256),
        login_id=string_field(body, "email", max_length=320),
        code=string_field(body, "code", max_length=32), client=client_info(request))
    return Response(status_code=204, headers=NO_STORE)
