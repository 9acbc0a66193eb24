"""Sessions, refresh-token families, and the JWTs issued for them.

A session is one successful sign-in. Its refresh tokens are opaque random strings stored only as
SHA-256 digests, and every use rotates them. Presenting a rotated token again is reuse: the whole
session is revoked, except within ``refresh_grace_seconds`` of the rotation, when the caller gets
the same successor (concurrent refreshes from one client must not sign it out). The successor is
kept encrypted on its parent row for that purpose.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from authgate.core import audit as events
from authgate.core import scopes
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import (
    ClientInfo,
    Realm,
    RefreshToken,
    Rotation,
    Session,
    Settlement,
    User,
)
from authgate.core.ports import StaleUser
from authgate.crypto.secretbox import DecryptionError
from authgate.crypto.tokens import digest, new_id, new_ordered_id, new_token

if TYPE_CHECKING:
    from authgate.core.engine import Core

_SUCCESSOR = "refresh-successor"
# The JOSE type of an access token (RFC 9068): checked on every presentation, so that an ID
# token (type JWT, same key, same issuer) is never taken for one.
ACCESS_TOKEN_TYPE = "at+jwt"
# A session's last use is written at most this often: it is informational, not a security check.
TOUCH_INTERVAL = timedelta(seconds=60)


@dataclass(slots=True)
class Tokens:
    """What a sign-in or a refresh hands back: the session, its JWTs and its refresh token."""

    session: Session
    user: User
    access_token: str
    expires_in: int
    refresh_token: str
    id_token: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    scope: str | None = None


@dataclass(slots=True)
class Principal:
    """The bearer of a verified access token, with a live session."""

    realm: Realm
    claims: dict[str, Any]
    session: Session
    user: User | None = None  # loaded when the caller asked for it

    @property
    def user_id(self) -> str:
        return self.session.user_id


ClaimsBuilder = Any  # async callable(realm, user, session) -> dict of extra access-token claims


class Sessions:
    def __init__(self, core: Core) -> None:
        self.core = core

    # Starting a session.

    async def start(self, realm: Realm, user: User, *, amr: list[str],
                    client: ClientInfo | None = None, organisation_id: str | None = None,
                    device_id: str | None = None, client_id: str | None = None,
                    nonce: str | None = None, extra_claims: dict[str, Any] | None = None,
                    with_id_token: bool = True, access_ttl: int | None = None,
                    scope: str | None = None, settlement: Settlement | None = None) -> Tokens:
        """``access_ttl`` overrides the access token's lifetime (a dialect whose clients expect
        another one); the session's own lifetime does not change. ``scope`` is the scope
        asked for (native OAuth; INVALID_SCOPE past what the realm grants): kept on the
        session, it bounds every refresh and decides the claims an ID token shows.
        ``settlement``: the sign-in's throttle attempt, written with the session."""
        client = client or ClientInfo()
        granted = scopes.grant(realm, scope) if scope is not None else None
        now = self.core.now()
        s = self.core.settings
        session = Session(
            id=new_id(), realm_id=realm.id, user_id=user.id, amr=list(dict.fromkeys(amr)),
            created_at=now, last_used_at=now, expires_at=now + timedelta(seconds=s.session_ttl),
            organisation_id=organisation_id, device_id=device_id, client_id=client_id,
            ip=client.ip, user_agent=(client.user_agent or "")[:512] or None,
            scope=granted,
        )
        raw, token = self._new_refresh(session)
        user.last_sign_in_at = now
        event = self.core.audit.event(events.SIGN_IN, realm_id=realm.id, user_id=user.id,
                                      session_id=session.id, organisation_id=organisation_id,
                                      client=client, amr=session.amr)
        try:
            async with self.core.store.transaction(write=True, single=True) as tx:
                await tx.sessions.open(session, token, event, user.security_stamp, settlement)
        except StaleUser:
            # The password changed, the user was disabled or signed out everywhere while this
            # sign-in was checking what it read before: what it proved no longer holds.
            raise AuthError(ErrorCode.INVALID_CREDENTIALS) from None
        self.core.audit.counted(event)
        return await self._tokens(realm, user, session, raw, nonce=nonce,
                                  extra_claims=extra_claims, with_id_token=with_id_token,
                                  access_ttl=access_ttl)

    def _new_refresh(self, session: Session) -> tuple[str, RefreshToken]:
        """A session's first refresh token (successors come from ``_rotate_in``)."""
        raw = new_token(32)
        now = self.core.now()
        ttl = timedelta(seconds=self.core.settings.refresh_token_ttl)
        # Refresh tokens are keyed by time-ordered ids: each refresh adds a row, and such ids
        # add it at the end of the key's index (bench/ordered_ids.py). The id never leaves
        # the store, and the row keeps its creation time anyway.
        return raw, RefreshToken(id=new_ordered_id(), session_id=session.id,
                                 token_hash=digest(raw), created_at=now,
                                 expires_at=min(now + ttl, session.expires_at))

    # Tokens.

    def access_claims(self, realm: Realm, user: User, session: Session,
                      access_ttl: int | None = None,
                      scope: str | None = None) -> dict[str, Any]:
        now = int(self.core.now().timestamp())
        claims: dict[str, Any] = {
            "iss": self.core.realms.issuer(realm),
            "sub": user.id,
            "aud": self.core.realms.audience(realm),
            "iat": now,
            "exp": now + (access_ttl or self.core.settings.access_token_ttl),
            "jti": new_id(),
            "sid": session.id,
            "amr": session.amr,
        }
        if session.client_id:
            claims["azp"] = session.client_id
        if user.roles:
            claims["roles"] = user.roles
        if session.organisation_id:
            claims["org"] = session.organisation_id
        if scope or session.scope:
            claims["scope"] = scope or session.scope  # RFC 9068
        return claims

    def id_claims(self, realm: Realm, user: User, session: Session, nonce: str | None,
                  scope: str | None = None) -> dict[str, Any]:
        """``scope``: the grant of this token request, when it narrowed the session's."""
        now = int(self.core.now().timestamp())
        claims: dict[str, Any] = {
            "iss": self.core.realms.issuer(realm),
            "sub": user.id,
            "aud": session.client_id or self.core.realms.audience(realm),
            "iat": now,
            "exp": now + self.core.settings.id_token_ttl,
            "auth_time": int(session.created_at.timestamp()),
            "sid": session.id,
            "amr": session.amr,
        }
        claims.update(scopes.shown_claims(profile_claims(user), scope or session.scope))
        if nonce:
            claims["nonce"] = nonce
        return claims

    async def _tokens(self, realm: Realm, user: User, session: Session, raw_refresh: str, *,
                      nonce: str | None = None, extra_claims: dict[str, Any] | None = None,
                      with_id_token: bool = True, access_ttl: int | None = None,
                      scope: str | None = None) -> Tokens:
        claims = self.access_claims(realm, user, session, access_ttl, scope)
        if extra_claims:
            claims.update({k: v for k, v in extra_claims.items() if k not in RESERVED_CLAIMS})
        signer = await self.core.keys.signer(realm)
        id_token = (signer.sign(self.id_claims(realm, user, session, nonce, scope))
                    if with_id_token else None)
        return Tokens(session=session, user=user,
                      access_token=signer.sign(claims, typ=ACCESS_TOKEN_TYPE),
                      expires_in=access_ttl or self.core.settings.access_token_ttl,
                      refresh_token=raw_refresh,
                      id_token=id_token, claims=claims, scope=scope or session.scope)

    # Refreshing.

    async def _refreshable(self, tx: Any, realm: Realm, raw: str, now: datetime, *,
                           lock: bool) -> tuple[RefreshToken, Session, User]:
        """The token, its live session and active user, or the AuthError that refuses them."""
        if not raw or len(raw) > 512:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        token = await tx.refresh_tokens.by_hash(digest(raw), lock=lock)
        found = await tx.sessions.get_with_user(token.session_id) if token else None
        if token is None or found is None or found[0].realm_id != realm.id:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        session, user = found
        if session.revoked_at is not None:
            raise AuthError(ErrorCode.SESSION_REVOKED)
        if session.expires_at <= now or token.expires_at <= now:
            raise AuthError(ErrorCode.TOKEN_EXPIRED)
        if user.status != "active":
            raise AuthError(ErrorCode.USER_DISABLED)
        return token, session, user

    async def _revoke_for_reuse(self, tx: Any, realm: Realm, session: Session, now: datetime,
                                client: ClientInfo | None) -> None:
        await tx.sessions.revoke(session.id, now, "refresh_token_reused")
        await self.core.audit.record(tx, events.REFRESH_REUSED, realm_id=realm.id,
                                     user_id=session.user_id, session_id=session.id,
                                     client=client)

    async def refresh(self, realm: Realm, raw: str, client: ClientInfo | None = None, *,
                      extra_claims: dict[str, Any] | None = None,
                      with_id_token: bool | None = None, access_ttl: int | None = None,
                      scope: str | None = None, client_id: str | None = None) -> Tokens:
        """Rotate a refresh token. Reuse outside the grace window revokes the session.

        ``scope`` may narrow the new access token's scope, never widen it past the session's
        grant (RFC 6749 §6: INVALID_SCOPE). ``client_id``, when the client names itself, must
        be the client the session was issued to, if it was issued to one (§6). An ID token
        comes back when the caller asks for one or, by default, when the session was granted
        ``openid`` (OIDC Core §12.2)."""
        requested = scopes.normalise_scope(scope)
        if not raw or len(raw) > 512:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        # The grace window is measured from when the refresh was asked for: one held up
        # behind a busy store is still the concurrent refresh it was, not reuse. (Expiry is
        # judged when it is checked.)
        asked_at = self.core.now()
        rotated = (await self._rotate_live(realm, raw, client, client_id)
                   if requested is None else None)
        if rotated is not None:
            session, user, successor_raw = rotated
        else:
            session, user, successor_raw = await self._rotate(realm, raw, client, requested,
                                                              client_id, asked_at)
        # What this token carries: the grant as narrowed, less what the realm no longer lists
        # (a session granted a scope before the realm stopped listing it, or before scopes
        # were checked at all, does not keep it).
        granted = requested or session.scope
        if granted is not None:
            granted = scopes.still_granted(realm, granted)
        if with_id_token is None:
            with_id_token = granted is None or "openid" in granted.split(" ")
        return await self._tokens(realm, user, session, successor_raw,
                                  extra_claims=extra_claims, with_id_token=with_id_token,
                                  access_ttl=access_ttl, scope=granted)

    async def _rotate_live(self, realm: Realm, raw: str, client: ClientInfo | None,
                           client_id: str | None) -> tuple[Session, User, str] | None:
        """The common case in one store call: a live token, rotated. None when any check fails
        (nothing changed then): ``_rotate`` finds out what to answer."""
        rotation, successor_raw = self._rotation(realm, digest(raw), client, client_id)
        return self._rotated(await self.core.store.rotate_live(rotation), rotation,
                             successor_raw)

    async def _rotate_in(self, tx: Any, realm: Realm, token_hash: str,
                         client: ClientInfo | None,
                         client_id: str | None) -> tuple[Session, User, str] | None:
        rotation, successor_raw = self._rotation(realm, token_hash, client, client_id)
        return self._rotated(await tx.refresh_tokens.rotate_live(rotation), rotation,
                             successor_raw)

    def _rotation(self, realm: Realm, token_hash: str, client: ClientInfo | None,
                  client_id: str | None) -> tuple[Rotation, str]:
        """The rotation of the token whose hash is ``token_hash``, and its successor's raw
        value, kept encrypted on its parent for the grace window."""
        now = self.core.now()
        successor_raw = new_token(32)
        return Rotation(
            token_hash=token_hash, realm_id=realm.id, now=now, successor_id=new_ordered_id(),
            successor_hash=digest(successor_raw),
            successor_expires_at=now + timedelta(seconds=self.core.settings.refresh_token_ttl),
            successor_enc=self.core.box.encrypt(_SUCCESSOR, successor_raw.encode(), token_hash),
            touch_before=now - TOUCH_INTERVAL, client_id=client_id,
            event=self.core.audit.event(events.REFRESHED, realm_id=realm.id, client=client),
        ), successor_raw

    def _rotated(self, found: tuple[Session, User] | None, rotation: Rotation,
                 successor_raw: str) -> tuple[Session, User, str] | None:
        if found is None:
            return None
        self.core.audit.counted(rotation.event)
        return *found, successor_raw

    async def _rotate(self, realm: Realm, raw: str, client: ClientInfo | None,
                      requested: str | None, client_id: str | None = None,
                      asked_at: datetime | None = None) -> tuple[Session, User, str]:
        """Every case, one check at a time: a live token is rotated; a token rotated within
        the grace window of when the refresh was asked for (``asked_at``) gives its successor
        again; any other rotated token is reuse. Expiry is judged now."""
        now = self.core.now()
        grace = timedelta(seconds=self.core.settings.refresh_grace_seconds)
        reused = False
        async with self.core.store.transaction(write=True) as tx:
            token, session, user = await self._refreshable(tx, realm, raw, now, lock=True)
            if client_id and session.client_id and client_id != session.client_id:
                raise AuthError(ErrorCode.INVALID_TOKEN,
                                "The refresh token was issued to another client.")
            # A session with no recorded grant (a dialect's) has nothing a scope can narrow.
            if requested and (session.scope is None
                              or not set(requested.split(" ")) <= set(session.scope.split(" "))):
                raise AuthError(ErrorCode.INVALID_SCOPE)
            if token.rotated_at is None:
                rotated = await self._rotate_in(tx, realm, token.token_hash, client, client_id)
                if rotated is None:
                    raise AuthError(ErrorCode.INVALID_TOKEN)  # lost a race the lock prevents
                session, user, successor_raw = rotated
            else:
                grace_raw = await self._grace_successor(tx, token, asked_at or now, grace)
                if grace_raw is None:
                    await self._revoke_for_reuse(tx, realm, session, now, client)
                    reused = True
                else:
                    successor_raw = grace_raw
        if reused:
            raise AuthError(ErrorCode.REFRESH_TOKEN_REUSED)
        return session, user, successor_raw

    async def _grace_successor(self, tx: Any, token: RefreshToken, asked_at: datetime,
                               grace: timedelta) -> str | None:
        """Asked for within the grace window, the still-unused successor of a just-rotated
        token."""
        if token.rotated_at is None or asked_at - token.rotated_at > grace:
            return None
        if token.successor_id is None or token.successor_enc is None:
            return None
        successor = await tx.refresh_tokens.get(token.successor_id)
        if successor is None or successor.rotated_at is not None:
            return None
        try:
            return self.core.box.decrypt(_SUCCESSOR, token.successor_enc,
                                         token.token_hash).decode()
        except DecryptionError:
            return None

    # Verifying access tokens.

    async def authenticate(self, realm: Realm, access_token: str, *,
                           issuer: str | None = None,
                           audience: str | list[str] | None = None,
                           subject_claim: str = "sub", with_user: bool = False,
                           typ: str = ACCESS_TOKEN_TYPE) -> Principal:
        """Verify an access token and that its session is still live. ``subject_claim`` names
        the claim that carries the user id and ``typ`` the token's JOSE type (a dialect's
        tokens may differ in both); ``with_user`` also requires the user active and returns
        it (the store reads the session and the user together either way)."""
        claims = await self.core.keys.verify(
            realm, access_token,
            issuer=issuer if issuer is not None else self.core.realms.issuer(realm),
            audience=audience if audience is not None else self.core.realms.audience(realm),
            typ=typ)
        session_id = claims.get("sid")
        if not isinstance(session_id, str):
            raise AuthError(ErrorCode.INVALID_TOKEN)
        found = await self.core.store.session_with_user(session_id)
        session, user = found if found else (None, None)
        self._check_live(session)
        assert session is not None
        if claims.get(subject_claim) != session.user_id:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        if with_user and (user is None or user.status != "active"):
            raise AuthError(ErrorCode.SESSION_REVOKED)
        return Principal(realm=realm, claims=claims, session=session,
                         user=user if with_user else None)

    def _check_live(self, session: Session | None) -> None:
        if session is None:
            raise AuthError(ErrorCode.INVALID_TOKEN)
        if not session.is_live(self.core.now()):
            raise AuthError(ErrorCode.SESSION_REVOKED)

    async def live_session(self, session_id: str) -> Session:
        async with self.core.store.transaction() as tx:
            session = await tx.sessions.get(session_id)
        self._check_live(session)
        assert session is not None
        return session

    # Ending sessions.

    async def revoke(self, realm: Realm, session_id: str, *, reason: str = "signed_out",
                     user_id: str | None = None, client: ClientInfo | None = None) -> bool:
        """End one session; ``user_id`` restricts it to that user's own sessions."""
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            session = await tx.sessions.get(session_id)
            if session is None or session.realm_id != realm.id or (
                    user_id is not None and session.user_id != user_id):
                return False
            revoked = await tx.sessions.revoke(session_id, now, reason)
            if revoked:
                await self.core.audit.record(
                    tx, events.SIGNED_OUT if reason == "signed_out" else events.SESSION_REVOKED,
                    realm_id=realm.id, user_id=session.user_id, session_id=session_id,
                    client=client, reason=reason)
            return revoked

    async def revoke_all(self, realm: Realm, user_id: str, *, except_session_id: str | None = None,
                         client: ClientInfo | None = None) -> int:
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            await tx.users.new_stamp(user_id)  # first: no sign-in in flight opens a session
            ids = await tx.sessions.revoke_for_user(user_id, now, "signed_out_all",
                                                    except_session_id=except_session_id)
            await self.core.audit.record(tx, events.SIGNED_OUT_ALL, realm_id=realm.id,
                                         user_id=user_id, client=client, count=len(ids))
        return len(ids)

    async def revoke_refresh_token(self, realm: Realm, raw: str,
                                   client: ClientInfo | None = None) -> bool:
        """RFC 7009: revoking a refresh token ends its session. Unknown tokens are ignored."""
        async with self.core.store.transaction() as tx:
            token = await tx.refresh_tokens.by_hash(digest(raw)) if raw else None
        if token is None:
            return False
        return await self.revoke(realm, token.session_id, reason="token_revoked", client=client)

    async def live_refresh_token(self, realm: Realm,
                                 raw: str) -> tuple[RefreshToken, Session] | None:
        """A refresh token that would be rotated if presented now, and its session: not yet
        rotated (a rotated one is at most a retry within the grace window), not expired, its
        session live. None for anything else (RFC 7662: inactive)."""
        if not raw or len(raw) > 512:
            return None
        async with self.core.store.transaction() as tx:
            token = await tx.refresh_tokens.by_hash(digest(raw))
            session = await tx.sessions.get(token.session_id) if token else None
        now = self.core.now()
        if token is None or session is None or session.realm_id != realm.id:
            return None
        if token.rotated_at is not None or token.expires_at <= now or not session.is_live(now):
            return None
        return token, session

    async def list_for_user(self, realm: Realm, user_id: str) -> list[Session]:
        async with self.core.store.transaction() as tx:
            sessions = await tx.sessions.for_user(user_id, live_at=self.core.now())
        return [s for s in sessions if s.realm_id == realm.id]


    # A refresh token presented as a credential (for surfaces whose clients send it on every
    # call, e.g. the Descope dialect).

    async def holder(self, realm: Realm, raw: str,
                     client: ClientInfo | None = None) -> tuple[Session, User]:
        """The live session and active user a refresh token belongs to, without rotating it.

        A rotated token is reuse, as in ``refresh``: the session is revoked, unless the token's
        successor is still unused within the grace window."""
        now = self.core.now()
        grace = timedelta(seconds=self.core.settings.refresh_grace_seconds)
        reused = False
        async with self.core.store.transaction(write=True) as tx:
            token, session, user = await self._refreshable(tx, realm, raw, now, lock=False)
            if token.rotated_at is not None and \
                    await self._grace_successor(tx, token, now, grace) is None:
                await self._revoke_for_reuse(tx, realm, session, now, client)
                reused = True
        if reused:
            raise AuthError(ErrorCode.REFRESH_TOKEN_REUSED)
        return session, user

    async def step_up(self, realm: Realm, raw: str, user: User, *, amr: list[str],
                      mfa: bool = False, client: ClientInfo | None = None) -> Tokens:
        """Add a fresh authentication of ``user`` to the session a refresh token belongs to,
        then rotate the token.

        The token must be the same user's. With ``mfa`` the new authentication is a second
        factor: it must use a method the session does not have yet (a password twice is one
        factor), and the session gains ``mfa``."""
        session, holder = await self.holder(realm, raw, client)
        if holder.id != user.id:
            raise AuthError(ErrorCode.FORBIDDEN, "The refresh token belongs to another user.")
        added = list(amr)
        if mfa:
            if all(method in session.amr for method in amr):
                raise AuthError(ErrorCode.INVALID_REQUEST, "A second factor must be a method "
                                "the session does not have yet.", details={"field": "mfa"})
            added.append("mfa")
        async with self.core.store.transaction(write=True) as tx:
            await tx.sessions.add_amr(session.id, added)
            await self.core.audit.record(tx, events.STEPPED_UP, realm_id=realm.id,
                                         user_id=user.id, session_id=session.id, client=client,
                                         amr=added)
        return await self.refresh(realm, raw, client, with_id_token=False)

RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid", "amr",
                             "azp", "auth_time", "nonce", "acr", "cnf", "scope"})


def profile_claims(user: User) -> dict[str, Any]:
    """OpenID Connect standard claims for a user, without empty values."""
    claims: dict[str, Any] = {
        "email": user.email, "email_verified": user.email_verified if user.email else None,
        "phone_number": user.phone,
        "phone_number_verified": user.phone_verified if user.phone else None,
        "name": user.display_name, "given_name": user.given_name,
        "middle_name": user.middle_name, "family_name": user.family_name,
        "preferred_username": user.username, "picture": user.picture,
        "updated_at": int(user.updated_at.timestamp()),
    }
    return {k: v for k, v in claims.items() if v is not None}


def userinfo_claims(principal: Principal) -> dict[str, Any]:
    """What userinfo shows the bearer: the claims its access token's scope shows (OIDC Core
    §5.4; all of them for a session with no recorded grant)."""
    user = principal.user
    assert user is not None
    scope = principal.claims.get("scope")
    shown = scopes.shown_claims(profile_claims(user),
                                scope if isinstance(scope, str) else principal.session.scope)
    return {"sub": user.id, **shown}


def check_custom_claims(claims: Any, *, reserved: Iterable[str] = (),
                        max_bytes: int = 4096) -> dict[str, Any]:
    """Claims a client asks to add to its session tokens: a small JSON object whose names
    shadow none of the claims the issuer sets (the standard ones, and ``reserved``)."""
    if claims is None:
        return {}
    if not isinstance(claims, dict):
        raise AuthError(ErrorCode.INVALID_REQUEST, "customClaims must be an object.",
                        details={"field": "customClaims"})
    taken = RESERVED_CLAIMS | frozenset(reserved)
    refused = sorted(str(name) for name in claims if name in taken)
    if refused:
        raise AuthError(ErrorCode.INVALID_REQUEST,
                        f"These claims are reserved and cannot be set: {refused}.",
                        details={"field": "customClaims"})
    if not all(isinstance(name, str) and 0 < len(name) <= 100 for name in claims):
        raise AuthError(ErrorCode.INVALID_REQUEST, "Claim names are 1-100 characters.",
                        details={"field": "customClaims"})
    try:
        size = len(orjson.dumps(claims))
    except TypeError:
        size = max_bytes + 1
    if size > max_bytes:
        raise AuthError(ErrorCode.INVALID_REQUEST,
                        f"customClaims must be a JSON object of at most {max_bytes} bytes.",
                        details={"field": "customClaims"})
    return dict(claims)
