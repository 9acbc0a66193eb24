"""Token introspection (RFC 7662): who may ask, and what they learn about a token.

The endpoint must authorise its caller (RFC 7662 §2.1 and §4). A user's access token is not
enough: anyone holding one could then learn, without spending it, whether a stolen refresh token
is still live (spending it would be noticed, as reuse), and whose it is. The caller is a
protected resource of the realm, which presents one of the realm's API keys (``core/api_keys``).

A key bound to an organisation is told only about tokens of that organisation's active members;
any other token is inactive to it (RFC 7662 §2.2 lets the answer depend on who asks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm

if TYPE_CHECKING:
    from authgate.core.engine import Core

# The access token's claims an introspection answer repeats (RFC 7662 §2.2).
ACCESS_TOKEN_MEMBERS = ("sub", "aud", "iss", "exp", "iat", "jti", "sid", "amr", "scope")


class Introspection:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def introspect(self, realm: Realm, api_key: str | None, token: str) -> dict[str, Any]:
        """RFC 7662's answer about ``token`` for the holder of ``api_key``; INVALID_API_KEY when
        the key is missing, unknown, revoked or of another realm (one answer for all four)."""
        if not api_key:
            raise AuthError(ErrorCode.INVALID_API_KEY, "Introspection needs one of the realm's "
                            "API keys, as a bearer token or as the Basic password.")
        verified = await self.core.api_keys.verify(api_key)
        if verified.realm.id != realm.id:
            raise AuthError(ErrorCode.INVALID_API_KEY)
        about = await self._about(realm, token)
        organisation_id = verified.key.organisation_id
        if about is not None and organisation_id is not None:
            async with self.core.store.transaction() as tx:
                membership = await tx.memberships.find(organisation_id, about["sub"])
            if membership is None or membership.status != "active":
                about = None
        return about if about is not None else {"active": False}

    async def _about(self, realm: Realm, token: str) -> dict[str, Any] | None:
        """What a live token says of itself; None for anything else."""
        sessions = self.core.sessions
        try:
            principal = await sessions.authenticate(realm, token)
        except AuthError:
            pass
        else:
            claims = principal.claims
            return {"active": True, "token_type": "access_token", "client_id": claims.get("azp"),
                    **{k: claims[k] for k in ACCESS_TOKEN_MEMBERS if k in claims}}
        live = await sessions.live_refresh_token(realm, token)
        if live is None:
            return None
        refresh, session = live
        about: dict[str, Any] = {
            "active": True, "token_type": "refresh_token", "sub": session.user_id,
            "sid": session.id, "client_id": session.client_id,
            "exp": int(refresh.expires_at.timestamp()),
            "iat": int(refresh.created_at.timestamp()), "iss": self.core.realms.issuer(realm)}
        if session.scope:
            about["scope"] = session.scope
        return about
