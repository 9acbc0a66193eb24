"""The admin API: realms, users, keys and audit events. Callers need the ``admin`` role in the
default realm (checked against the stored user on every call, not only the token)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response

from authgate.api.account import user_json
from authgate.api.deps import get_admin, get_core
from authgate.api.errors import native
from authgate.api.surface import (
    NO_STORE,
    BadRequest,
    JSONResponse,
    bool_field,
    json_body,
    read_body,
    string_field,
)
from authgate.core.audit import ACTOR
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import AuditEvent, Realm
from authgate.core.realms import DEFAULT_REALM
from authgate.core.sessions import Principal
from authgate.core.users import NewUser

router = APIRouter(prefix="/admin", route_class=native.route_class, tags=["admin"])


async def admin(request: Request,
                principal: Principal = Depends(get_admin)) -> AsyncIterator[Principal]:
    """An active administrator; every audit event of the request names them as its actor."""
    user = await get_core(request).users.get(principal.realm, principal.user_id)
    if "admin" not in user.roles or user.status != "active":
        raise AuthError(ErrorCode.FORBIDDEN, "Administrator role required.")
    token = ACTOR.set({"actor": principal.user_id, "actor_session": principal.session.id})
    try:
        yield principal
    finally:
        try:
            ACTOR.reset(token)
        except ValueError:  # torn down in another context: that context ends with the request
            pass


def realm_json(realm: Realm) -> dict[str, Any]:
    return {"id": realm.id, "name": realm.name, "display_name": realm.display_name,
            "project_id": realm.project_id, "settings": realm.settings,
            "created_at": realm.created_at.isoformat()}


def event_json(event: AuditEvent) -> dict[str, Any]:
    return {"id": event.id, "at": event.at.isoformat(), "type": event.type,
            "realm_id": event.realm_id, "user_id": event.user_id,
            "session_id": event.session_id, "organisation_id": event.organisation_id,
            "ip": event.ip, "user_agent": event.user_agent, "data": event.data}


@router.get("/realms")
async def list_realms(request: Request, _: Principal = Depends(admin)) -> Response:
    realms = await get_core(request).realms.list()
    return JSONResponse({"realms": [realm_json(r) for r in realms]}, headers=NO_STORE)


@router.post("/realms", status_code=201, openapi_extra=json_body({
    "name": {"type": "string", "maxLength": 63}, "display_name": {"type": "string"},
    "settings": {"type": "object", "description": "realm settings (docs/design.md)"}},
    required=("name",)))
async def create_realm(request: Request, _: Principal = Depends(admin)) -> Response:
    body = await read_body(request)
    name = string_field(body, "name", required=True, max_length=63)
    settings = body.get("settings")
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise BadRequest("settings must be an object.", field="settings")
    assert name is not None
    realm = await get_core(request).realms.create(
        name, display_name=string_field(body, "display_name", max_length=200),
        settings=settings)
    return JSONResponse(realm_json(realm), status_code=201, headers=NO_STORE)


# Past any table's size, and within the 64-bit integer both stores take (it overflowed them).
MAX_OFFSET = 1_000_000_000


@router.get("/realms/{realm_name}/users")
async def list_users(realm_name: str, request: Request, limit: int = 100,
                     offset: int = Query(0, le=MAX_OFFSET),
                     _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    users = await core.users.list(realm, limit=max(1, min(limit, 1000)), offset=max(0, offset))
    return JSONResponse({"users": [user_json(u) for u in users]}, headers=NO_STORE)


@router.post("/realms/{realm_name}/users", status_code=201, openapi_extra=json_body({
    "email": {"type": "string"}, "username": {"type": "string"}, "phone": {"type": "string"},
    "password": {"type": "string", "format": "password"}, "name": {"type": "string"},
    "roles": {"type": "array", "items": {"type": "string"}},
    "email_verified": {"type": "boolean"}}))
async def create_user(realm_name: str, request: Request,
                      _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    body = await read_body(request)
    roles = body.get("roles") or []
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise BadRequest("roles must be a list of strings.", field="roles")
    new = NewUser(email=string_field(body, "email", max_length=320),
                  username=string_field(body, "username", max_length=200),
                  phone=string_field(body, "phone", max_length=40),
                  password=string_field(body, "password",
                                        max_length=core.settings.password_max_length),
                  name=string_field(body, "name", max_length=200), roles=roles,
                  email_verified=bool_field(body, "email_verified"))
    user = await core.users.create(realm, new, event="admin.user_created")
    return JSONResponse(user_json(user), status_code=201, headers=NO_STORE)


@router.post("/realms/{realm_name}/users/{user_id}/{action}",
             description="`action`: `disable` or `enable`.")
async def user_action(realm_name: str, user_id: str, action: str, request: Request,
                      _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    if action not in ("disable", "enable"):
        raise BadRequest(f"Unknown action {action[:30]!r}.", status=404)
    user = await core.users.set_status(realm, user_id[:64],
                                       "disabled" if action == "disable" else "active")
    return JSONResponse(user_json(user), headers=NO_STORE)


@router.get("/realms/{realm_name}/keys")
async def list_keys(realm_name: str, request: Request, _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    keys = await core.keys.list(realm)
    return JSONResponse({"keys": [{
        "kid": k.kid, "alg": k.alg, "status": k.status, "created_at": k.created_at.isoformat(),
        "retired_at": k.retired_at.isoformat() if k.retired_at else None,
        "publish_until": k.publish_until.isoformat() if k.publish_until else None,
    } for k in keys]}, headers=NO_STORE)


@router.post("/realms/{realm_name}/keys/rotate", openapi_extra=json_body({
    "alg": {"type": "string", "enum": ["ES256", "EdDSA", "RS256"]}}, optional=True))
async def rotate_keys(realm_name: str, request: Request,
                      _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    body = await read_body(request, allow_empty=True)
    key = await core.keys.rotate(realm, string_field(body, "alg", max_length=10))
    return JSONResponse({"kid": key.kid, "alg": key.alg}, headers=NO_STORE)


@router.get("/events")
async def events(request: Request, realm: str = DEFAULT_REALM, limit: int = 50,
                 user_id: str | None = None, _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    target = await core.realms.require(realm)
    found = await core.audit.recent(target.id, limit=max(1, min(limit, 1000)), user_id=user_id)
    return JSONResponse({"events": [event_json(e) for e in found]}, headers=NO_STORE)
