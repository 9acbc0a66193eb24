"""Self-service account routes: sign-up, sign-out, my sessions, my password."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from authgate.api.deps import get_core, get_principal, get_principal_with_user, get_realm
from authgate.api.errors import native
from authgate.api.surface import NO_STORE, BadRequest, JSONResponse, bool_field, client_info
from authgate.api.surface import read_body
from authgate.api.surface import string_field
from authgate.core.models import Realm, Session, User
from authgate.core.sessions import Principal
from authgate.core.users import NewUser

router = APIRouter(route_class=native.route_class, tags=["account"])


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": user.id, "email": user.email, "username": user.username, "phone": user.phone,
        "email_verified": user.email_verified, "phone_verified": user.phone_verified,
        "name": user.name, "given_name": user.given_name, "middle_name": user.middle_name,
        "family_name": user.family_name, "picture": user.picture,
        "custom_attributes": user.custom_attributes, "roles": user.roles,
        "status": user.status, "is_anonymous": user.is_anonymous,
        "created_at": user.created_at.isoformat(),
        "last_sign_in_at": user.last_sign_in_at.isoformat() if user.last_sign_in_at else None,
    }


def session_json(session: Session, current: str | None = None) -> dict[str, Any]:
    return {
        "id": session.id, "created_at": session.created_at.isoformat(),
        "last_used_at": session.last_used_at.isoformat(),
        "expires_at": session.expires_at.isoformat(), "amr": session.amr,
        "ip": session.ip, "user_agent": session.user_agent, "client_id": session.client_id,
        "organisation_id": session.organisation_id, "device_id": session.device_id,
        "current": session.id == current,
    }


@router.post("/signup", status_code=201, summary="Create an account with a password")
async def signup(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    core = get_core(request)
    body = await read_body(request)
    attributes = body.get("custom_attributes") or {}
    if not isinstance(attributes, dict):
        raise BadRequest("custom_attributes must be an object.", field="custom_attributes")
    new = NewUser(
        email=string_field(body, "email", max_length=320),
        username=string_field(body, "username", max_length=200),
        phone=string_field(body, "phone", max_length=40),
        password=string_field(body, "password", required=True,
                              max_length=core.settings.password_max_length),
        name=string_field(body, "name", max_length=200),
        given_name=string_field(body, "given_name", max_length=200),
        middle_name=string_field(body, "middle_name", max_length=200),
        family_name=string_field(body, "family_name", max_length=200),
        picture=string_field(body, "picture", max_length=2048),
        custom_attributes=attributes,
    )
    hooks = ([core.verification.sign_up_hook(realm)]
             if bool_field(body, "send_verification_email") else None)
    user = await core.users.sign_up(realm, new, client_info(request), hooks=hooks)
    return JSONResponse(user_json(user), status_code=201, headers=NO_STORE)


@router.post("/signout", summary="End this session", status_code=204,
             responses={204: {"description": "The session has ended."}})
async def signout(request: Request, principal: Principal = Depends(get_principal)) -> Response:
    await get_core(request).sessions.revoke(principal.realm, principal.session.id,
                                            client=client_info(request))
    return Response(status_code=204)


@router.post("/signout/all", summary="End every session of this user")
async def signout_all(request: Request,
                      principal: Principal = Depends(get_principal)) -> Response:
    count = await get_core(request).sessions.revoke_all(principal.realm, principal.user_id,
                                                        client=client_info(request))
    return JSONResponse({"revoked": count}, headers=NO_STORE)


@router.get("/sessions", summary="My live sessions")
async def my_sessions(request: Request, principal: Principal = Depends(get_principal)) -> Response:
    sessions = await get_core(request).sessions.list_for_user(principal.realm, principal.user_id)
    return JSONResponse({"sessions": [session_json(s, principal.session.id) for s in sessions]},
                        headers=NO_STORE)


@router.delete("/sessions/{session_id}", summary="End one of my sessions")
async def revoke_session(session_id: str, request: Request,
                         principal: Principal = Depends(get_principal)) -> Response:
    revoked = await get_core(request).sessions.revoke(
        principal.realm, session_id[:64], user_id=principal.user_id, reason="revoked_by_user",
        client=client_info(request))
    if not revoked:
        raise BadRequest("No such live session.", status=404)
    return Response(status_code=204)


@router.get("/me", summary="My account")
async def me(request: Request,
             principal: Principal = Depends(get_principal_with_user)) -> Response:
    user = principal.user
    return JSONResponse(user_json(user), headers=NO_STORE)


@router.post("/me/password", summary="Change my password")
async def change_password(request: Request,
                          principal: Principal = Depends(get_principal)) -> Response:
    core = get_core(request)
    body = await read_body(request)
    old = string_field(body, "current_password", required=True,
                       max_length=core.settings.password_max_length)
    new = string_field(body, "new_password", required=True,
                       max_length=core.settings.password_max_length)
    assert old is not None and new is not None
    await core.users.change_password(principal.realm, principal.user_id, old, new,
                                     keep_session_id=principal.session.id,
                                     client=client_info(request))
    return Response(status_code=204)
