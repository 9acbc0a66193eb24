"""OpenID Connect discovery, the JWKS, and userinfo (per realm)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from authgate.api.deps import get_core, get_realm, principal_with_user
from authgate.api.errors import native
from authgate.api.lanes import hot
from authgate.api.surface import NO_STORE, JSONResponse
from authgate.core.models import Realm
from authgate.core.sessions import Principal, userinfo_claims

router = APIRouter(route_class=native.route_class, tags=["oidc"])

JWKS_HEADERS = {"Cache-Control": "public, max-age=300"}


def _userinfo(principal: Principal) -> Response:
    return JSONResponse(userinfo_claims(principal), headers=NO_STORE)


# Served in lanes (api/lanes.py): the realm and the bearer are resolved in the endpoint, not as
# dependencies.

@router.get("/userinfo", summary="OpenID Connect userinfo")
@hot
async def userinfo(request: Request) -> Response:
    return _userinfo(await principal_with_user(request, await get_realm(request)))


@router.post("/userinfo", summary="OpenID Connect userinfo (POST)", include_in_schema=False)
@hot
async def userinfo_post(request: Request) -> Response:
    return _userinfo(await principal_with_user(request, await get_realm(request)))


@router.get("/.well-known/openid-configuration", summary="OpenID Connect discovery")
async def discovery(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    core = get_core(request)
    issuer = core.realms.issuer(realm)
    algs = sorted({key.alg for key in await core.keys.list(realm)} | {core.settings.signing_alg})
    # No end_session_endpoint: that is RP-Initiated Logout's browser redirect (GET with an
    # id_token_hint), which is not served; POST /signout ends the bearer's session.
    return JSONResponse({
        "issuer": issuer,
        "token_endpoint": f"{issuer}/oauth/token",
        "userinfo_endpoint": f"{issuer}/userinfo",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "introspection_endpoint": f"{issuer}/oauth/introspect",
        "grant_types_supported": ["password", "refresh_token"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": list(realm.setting("scopes")),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "sid", "amr",
                             "email", "email_verified", "phone_number",
                             "phone_number_verified", "name", "given_name", "middle_name",
                             "family_name", "preferred_username", "picture", "updated_at"],
    }, headers=JWKS_HEADERS)


@router.get("/.well-known/jwks.json", summary="The realm's public signing keys")
async def jwks(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    body = await get_core(request).keys.jwks(realm)
    return Response(body, media_type="application/json", headers=JWKS_HEADERS)
