"""OAuth 2.0 endpoints: token (password and refresh_token grants, RFC 6749), revocation
(RFC 7009) and introspection (RFC 7662).

Hot paths: bodies are parsed by hand (no form-parsing machinery) and responses are orjson-encoded
with no response-model validation.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Depends, Request, Response

from authgate.api.deps import get_core, get_realm
from authgate.api.errors import native
from authgate.api.lanes import hot
from authgate.api.surface import NO_STORE, JSONResponse, bearer_token, client_info
from authgate.api.surface import read_body, string_field
from authgate.core import scopes
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm
from authgate.core.sessions import Tokens

router = APIRouter(route_class=native.route_class, tags=["oauth"])

SUPPORTED_GRANTS = ("password", "refresh_token")

# The token request (RFC 6749 §4.3.2, §6), documented by hand: the body is parsed by hand.
TOKEN_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {"type": "string", "enum": list(SUPPORTED_GRANTS)},
        "username": {"type": "string", "description": "password grant: the login id"},
        "password": {"type": "string", "format": "password",
                     "description": "password grant"},
        "mfa_code": {"type": "string", "description": "password grant, for a user with TOTP: "
                     "a TOTP or a recovery code"},
        "refresh_token": {"type": "string", "description": "refresh_token grant"},
        "scope": {"type": "string", "description": "space-separated; at sign-in, scopes the "
                  "realm lists (its default scope when absent); on refresh it may only narrow "
                  "the session's grant"},
        "client_id": {"type": "string"},
        "nonce": {"type": "string", "description": "password grant: echoed in the ID token"},
    },
}


# How a protected resource presents the realm's API key to the introspection endpoint, as the
# OpenAPI document names the two ways.
API_KEY_SCHEMES: dict[str, Any] = {
    "apiKey": {"type": "http", "scheme": "bearer",
               "description": "An API key of the realm (`authgate apikey create`)."},
    "apiKeyBasic": {"type": "http", "scheme": "basic",
                    "description": "The realm's API key as the password (any user name)."},
}


def token_response(tokens: Tokens) -> Response:
    """RFC 6749 §5.1, with the scope granted to this token when there is one."""
    body: dict[str, Any] = {
        "access_token": tokens.access_token,
        "token_type": "Bearer",
        "expires_in": tokens.expires_in,
        "refresh_token": tokens.refresh_token,
    }
    if tokens.id_token:
        body["id_token"] = tokens.id_token
    if tokens.scope:
        body["scope"] = tokens.scope
    return JSONResponse(body, headers=NO_STORE)


def _scope(form: dict[str, Any]) -> str | None:
    return string_field(form, "scope", max_length=scopes.MAX_SCOPE_LENGTH)


@router.post("/oauth/token", summary="Token endpoint (password and refresh_token grants)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-www-form-urlencoded": {"schema": TOKEN_REQUEST}}}})
@hot
async def token(request: Request) -> Response:
    # Served in a lane (api/lanes.py): the realm is resolved here, not as a dependency.
    realm = await get_realm(request)
    request.state.grant_endpoint = True
    form = await read_body(request)
    grant_type = string_field(form, "grant_type", required=True, max_length=100)
    core = get_core(request)
    client = client_info(request, device_key=request.headers.get("x-device-key"))
    client_id = string_field(form, "client_id", max_length=200)
    if grant_type == "password":
        username = string_field(form, "username", required=True, max_length=320)
        password = string_field(form, "password", required=True,
                                max_length=core.settings.password_max_length)
        assert username is not None and password is not None
        # Refused before the password is checked; the realm's default when none is asked.
        scope = scopes.grant(realm, _scope(form))
        # A user with TOTP must send ``mfa_code`` too (a TOTP or a recovery code); without it
        # the answer is 401 ``mfa_required``, and the client repeats the grant with the code.
        mfa_code = string_field(form, "mfa_code", max_length=64)
        nonce = string_field(form, "nonce", max_length=500)
        tokens = await core.signin.password_session(
            realm, username, password, client, mfa_code=mfa_code, client_id=client_id,
            nonce=nonce, with_id_token="openid" in scope.split(" "), scope=scope)
        return token_response(tokens)
    if grant_type == "refresh_token":
        raw = string_field(form, "refresh_token", required=True, max_length=512)
        assert raw is not None
        tokens = await core.sessions.refresh(realm, raw, client, client_id=client_id,
                                             scope=_scope(form))
        return token_response(tokens)
    raise AuthError(ErrorCode.INVALID_REQUEST,
                    f"Unsupported grant_type {(grant_type or '')[:40]!r}; supported: "
                    f"{', '.join(SUPPORTED_GRANTS)}.",
                    details={"oauth_error": "unsupported_grant_type", "field": "grant_type"})


@router.post("/oauth/revoke", summary="Token revocation (RFC 7009)")
async def revoke(request: Request, realm: Realm = Depends(get_realm)) -> Response:
    """Revoking a refresh token or an access token ends the session it belongs to. Unknown
    or invalid tokens are ignored, as RFC 7009 §2.2 requires."""
    form = await read_body(request)
    raw = string_field(form, "token", required=True, max_length=8192)
    assert raw is not None
    hint = string_field(form, "token_type_hint", max_length=50)
    core = get_core(request)
    client = client_info(request)
    if hint != "access_token" and "." not in raw:
        await core.sessions.revoke_refresh_token(realm, raw, client)
    else:
        try:
            principal = await core.sessions.authenticate(realm, raw)
        except AuthError:
            await core.sessions.revoke_refresh_token(realm, raw, client)
        else:
            await core.sessions.revoke(realm, principal.session.id, reason="token_revoked",
                                       client=client)
    return Response(status_code=200, headers=NO_STORE)


@router.post("/oauth/introspect", summary="Token introspection (RFC 7662)",
             openapi_extra={"security": [{name: []} for name in API_KEY_SCHEMES]})
@hot
async def introspect(request: Request) -> Response:
    """The caller is a protected resource of the realm: it presents one of the realm's API keys
    (``authgate apikey create``) as a bearer token, or as the password of HTTP Basic
    authentication (the user name is not checked). A user's access token is refused."""
    # A resource server may introspect on every request it serves: served in a lane.
    realm = await get_realm(request)
    form = await read_body(request)
    raw = string_field(form, "token", required=True, max_length=8192)
    assert raw is not None
    about = await get_core(request).introspection.introspect(realm, presented_api_key(request),
                                                             raw)
    return JSONResponse(about, headers=NO_STORE)


def presented_api_key(request: Request) -> str | None:
    """The API key in the Authorization header: ``Bearer <key>``, or ``Basic`` with the key as
    the password (RFC 6749 §2.3.1: both parts form-encoded, then base64). None when absent or
    unreadable."""
    key = bearer_token(request)
    if key is not None:
        return key
    basic = bearer_token(request, scheme="basic")
    if basic is None:
        return None
    try:
        decoded = base64.b64decode(basic, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return unquote_plus(password) if colon else None
