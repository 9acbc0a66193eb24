"""The admin API for organisations: create and list them, add members with roles, and rotate
the secret an organisation's backend signs its own tokens with (shown once)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from authgate.api.admin import admin
from authgate.api.deps import get_core
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
from authgate.core.models import Membership, Organisation
from authgate.core.sessions import Principal

router = APIRouter(prefix="/admin", route_class=native.route_class, tags=["admin"])


def organisation_json(org: Organisation) -> dict[str, Any]:
    return {"id": org.id, "name": org.name, "display_name": org.display_name,
            "account_name": org.account_name, "is_active": org.is_active,
            "is_suspended": org.is_suspended, "is_paid": org.is_paid, "settings": org.settings,
            "has_secret": org.secret_enc is not None, "created_at": org.created_at.isoformat()}


def membership_json(membership: Membership) -> dict[str, Any]:
    return {"id": membership.id, "organisation_id": membership.organisation_id,
            "user_id": membership.user_id, "roles": membership.roles,
            "status": membership.status, "failed_attempts": membership.failed_attempts,
            "created_at": membership.created_at.isoformat()}


@router.get("/realms/{realm_name}/organisations")
async def list_organisations(realm_name: str, request: Request,
                             _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    orgs = await core.organisations.list(realm)
    return JSONResponse({"organisations": [organisation_json(o) for o in orgs]},
                        headers=NO_STORE)


@router.post("/realms/{realm_name}/organisations", status_code=201, openapi_extra=json_body({
    "name": {"type": "string", "maxLength": 100}, "display_name": {"type": "string"},
    "account_name": {"type": "string"}, "settings": {"type": "object"},
    "is_active": {"type": "boolean"}, "is_suspended": {"type": "boolean"},
    "is_paid": {"type": "boolean"}}, required=("name",)))
async def create_organisation(realm_name: str, request: Request,
                              _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    body = await read_body(request)
    settings = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise BadRequest("settings must be an object.", field="settings")
    name = string_field(body, "name", required=True, max_length=100)
    assert name is not None
    org = await core.organisations.create(
        realm, name, display_name=string_field(body, "display_name", max_length=200),
        account_name=string_field(body, "account_name", max_length=200), settings=settings,
        is_active=bool_field(body, "is_active", True),
        is_suspended=bool_field(body, "is_suspended", False),
        is_paid=bool_field(body, "is_paid", False))
    return JSONResponse(organisation_json(org), status_code=201, headers=NO_STORE)


@router.get("/realms/{realm_name}/organisations/{org}/members")
async def list_members(realm_name: str, org: str, request: Request,
                       _: Principal = Depends(admin)) -> Response:
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    target = await core.organisations.find(realm, org[:100])
    members = await core.organisations.members(target)
    return JSONResponse({"members": [membership_json(m) for m in members]}, headers=NO_STORE)


@router.post("/realms/{realm_name}/organisations/{org}/members", openapi_extra=json_body({
    "user_id": {"type": "string"}, "roles": {"type": "array", "items": {"type": "string"}},
    "status": {"type": "string", "default": "active"}}, required=("user_id",)))
async def add_member(realm_name: str, org: str, request: Request,
                     _: Principal = Depends(admin)) -> Response:
    """Add a user with roles, or replace the roles and status of their membership."""
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    target = await core.organisations.find(realm, org[:100])
    body = await read_body(request)
    user_id = string_field(body, "user_id", required=True, max_length=64)
    roles = body.get("roles") or []
    if not isinstance(roles, list):
        raise BadRequest("roles must be a list of strings.", field="roles")
    assert user_id is not None
    user = await core.users.get(realm, user_id)
    membership = await core.organisations.add_member(
        realm, target, user.id, roles=roles,
        status=string_field(body, "status", max_length=20) or "active")
    return JSONResponse(membership_json(membership), headers=NO_STORE)


@router.post("/realms/{realm_name}/organisations/{org}/secret")
async def rotate_secret(realm_name: str, org: str, request: Request,
                        _: Principal = Depends(admin)) -> Response:
    """Create or replace the organisation's token secret; the answer is the only copy."""
    core = get_core(request)
    realm = await core.realms.require(realm_name)
    target = await core.organisations.find(realm, org[:100])
    secret = await core.organisations.rotate_secret(realm, target)
    return JSONResponse({"organisation_id": target.id, "secret": secret}, headers=NO_STORE)
