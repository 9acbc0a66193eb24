"""Dependencies shared by the native routes: the core, the realm, the bearer's session."""

from __future__ import annotations

from fastapi import Depends, Request

from authgate.api.surface import bearer_token
from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm
from authgate.core.realms import DEFAULT_REALM
from authgate.core.sessions import Principal


def get_core(request: Request) -> Core:
    return request.app.state.core


async def get_realm(request: Request) -> Realm:
    """The realm named by the ``/realms/{realm}`` prefix, or the default realm at the root."""
    return await get_core(request).realms.require(
        request.path_params.get("realm", DEFAULT_REALM))


async def _principal(request: Request, realm: Realm, *, with_user: bool) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise AuthError(ErrorCode.INVALID_TOKEN, "A bearer access token is required.")
    return await get_core(request).sessions.authenticate(realm, token, with_user=with_user)


async def get_principal(request: Request, realm: Realm = Depends(get_realm)) -> Principal:
    """The bearer of a valid access token whose session is live."""
    return await _principal(request, realm, with_user=False)


async def get_principal_with_user(request: Request,
                                  realm: Realm = Depends(get_realm)) -> Principal:
    """The same, with the (active) user loaded in the same read."""
    return await principal_with_user(request, realm)


async def principal_with_user(request: Request, realm: Realm) -> Principal:
    """``get_principal_with_user`` called directly, for hot endpoints."""
    return await _principal(request, realm, with_user=True)


async def get_admin(request: Request) -> Principal:
    """An administrator: a user of the default realm holding the ``admin`` role."""
    core = get_core(request)
    realm = await core.realms.require(DEFAULT_REALM)
    token = bearer_token(request)
    if token is None:
        raise AuthError(ErrorCode.INVALID_TOKEN, "A bearer access token is required.")
    principal = await core.sessions.authenticate(realm, token)
    if "admin" not in (principal.claims.get("roles") or []):
        raise AuthError(ErrorCode.FORBIDDEN, "Administrator role required.")
    return principal
