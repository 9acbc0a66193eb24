"""Password sign-in: identify and verify a user, safely.

An unknown login id and a wrong password do the same work (a dummy Argon2id verification) and
get the same answer unless the realm's ``reveal_unknown_users`` allows telling them apart.
Attempts are throttled per login id and per client address; an imported hash is replaced by an
Argon2id hash on the first successful sign-in. A user with TOTP enabled must give a code with
the password, on every surface: one that cannot ask for it cannot sign such a user in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authgate.core import audit as events
from authgate.core.completion import completed
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Credential, Realm, ThrottleState, User
from authgate.core.throttle import Attempt, ThrottleKey

if TYPE_CHECKING:
    from authgate.core.engine import Core
    from authgate.core.ports import Tx
    from authgate.core.sessions import Tokens


@dataclass(slots=True)
class SignedIn:
    """A verified user, and how (``amr``: the password, and the second factor if any)."""

    user: User
    amr: list[str]


@dataclass(slots=True)
class Proven(SignedIn):
    """A password proven, inside ``SignIn.proving``: ``session`` opens the user's session."""

    _open: Callable[..., Awaitable[Tokens]]

    async def session(self, **start: Any) -> Tokens:
        """``Sessions.start`` for the user (``start``: its arguments but the user, ``amr`` and
        ``client``), the attempt's success written in the same write."""
        return await self._open(**start)


class SignIn:
    def __init__(self, core: Core) -> None:
        self.core = core

    def _throttle_keys(self, realm: Realm, login_id: str, client: ClientInfo,
                       device_id: str | None = None) -> list[ThrottleKey]:
        """The login id's key (a remembered device's, with ``device_id``) and the address's."""
        throttle = self.core.throttle
        keys = [throttle.login_key(realm.id, login_id, device_id)]
        address = throttle.address_key(realm.id, client.ip)
        if address is not None:
            keys.append(address)
        return keys

    async def password(self, realm: Realm, login_id: str, password: str,
                       client: ClientInfo | None = None, *,
                       mfa_code: str | None = None) -> SignedIn:
        """The user whose login id and password these are, or AuthError. A user with TOTP
        enabled must give ``mfa_code`` too (a TOTP or a recovery code): without it the answer
        is MFA_REQUIRED, told only to someone who knows the password."""
        async with self._signing_in(realm, login_id, password, client, mfa_code) as (signed_in,
                                                                                      _):
            return signed_in

    async def password_session(self, realm: Realm, login_id: str, password: str,
                               client: ClientInfo | None = None, *,
                               mfa_code: str | None = None, **start: Any) -> Tokens:
        """``password``, then ``Sessions.start`` (with ``start``'s arguments) for the user it
        signed in; the attempt's success is written with the session, in one write where
        there would be two (the throttle's, then the session's)."""
        async with self.proving(realm, login_id, password, client, mfa_code=mfa_code) as proven:
            return await proven.session(**start)

    @asynccontextmanager
    async def proving(self, realm: Realm, login_id: str, password: str,
                      client: ClientInfo | None = None, *,
                      mfa_code: str | None = None) -> AsyncIterator[Proven]:
        """``password_session`` for a caller with work to do between the password and the
        session (a device to record, say): ``proven.session(...)`` opens the session with the
        attempt's success. A body that opens none has the success written as it leaves; one
        that fails releases the attempt, neither success nor failure."""
        async with self._signing_in(realm, login_id, password, client, mfa_code) as (
                signed_in, attempt):
            async def open_session(**start: Any) -> Tokens:
                settles = attempt is not None and not attempt.resolved
                # To its end: once the session is written, the attempt is resolved by it.
                return await completed(self.core.sessions.start(
                    realm, signed_in.user, amr=signed_in.amr, client=client,
                    settlement=attempt.settlement() if settles else None, **start))

            yield Proven(signed_in.user, signed_in.amr, open_session)

    @asynccontextmanager
    async def _signing_in(self, realm: Realm, login_id: str, password: str,
                          client: ClientInfo | None,
                          mfa_code: str | None) -> AsyncIterator[tuple[SignedIn, Attempt | None]]:
        """The signed-in user, and its attempt when the success is still to be written: the
        body may carry ``attempt.settlement()`` in a write of its own; if it does not, the
        success is written on leaving, and a body that fails releases the attempt."""
        client = client or ClientInfo()
        if not login_id or not password or len(password) > self.core.settings.password_max_length:
            # Oversized passwords are refused before any hashing (a cheap denial of service).
            raise AuthError(ErrorCode.INVALID_CREDENTIALS)
        keys = self._throttle_keys(realm, login_id, client)
        read: list[ThrottleState | None] | None = None
        async with self.core.store.transaction() as tx:
            if self.core.store.round_trips:  # the admission reads the counters: read them now
                found, read = await tx.users.for_sign_in_and_counters(
                    realm.id, login_id, [key.key for key in keys])
            else:
                found = await tx.users.for_sign_in(realm.id, login_id)
        user, credentials = found if found is not None else (None, [])
        creds = [c for c in credentials if c.kind == "password"]
        # The per-login key moves to a per-device key when the request comes from a device the
        # user has signed in from before, so strangers' failures cannot lock the owner out.
        device = await self.core.devices.remembered(user, client.device_key) if user else None
        if device is not None:
            keys, read = self._throttle_keys(realm, login_id, client, device.id), None
        try:
            async with self.core.throttle.attempting(keys, read=read) as attempt:
                await self._verify(realm, login_id, password, user, creds, client, attempt)
                assert user is not None
                totp = any(c.kind == "totp" and c.confirmed for c in credentials)
                if not attempt.resolved and (user.status != "active" or totp):
                    await attempt.ended(True)  # before the checks that follow
                if user.status != "active":
                    # Told only to someone who knows the password.
                    raise AuthError(ErrorCode.USER_DISABLED)
                amr = await self.core.totp.second_factor(realm, user, mfa_code, client=client,
                                                         enabled=totp)
                yield SignedIn(user, amr), (None if attempt.resolved else attempt)
                if not attempt.resolved:
                    await attempt.ended(True)
        except AuthError as exc:
            if exc.code is ErrorCode.TOO_MANY_ATTEMPTS:
                async with self.core.store.transaction(write=True) as tx:
                    await self.core.audit.record(tx, events.THROTTLED, realm_id=realm.id,
                                                 user_id=user.id if user else None,
                                                 client=client)
            raise

    async def _verify(self, realm: Realm, login_id: str, password: str, user: User | None,
                      creds: list[Credential], client: ClientInfo, attempt: Attempt) -> None:
        """Check the password of an admitted attempt; a failure is recorded here, a success
        only where the hash is replaced (with the new hash), else by the caller."""
        if user is None or not creds:
            await self.core.hasher.dummy_verify(password)
            await self._fail(realm, login_id, None, ErrorCode.USER_NOT_FOUND, client, attempt)
        assert user is not None
        credential = creds[0]
        result = await self.core.hasher.verify(credential.secret, password)
        if not result.ok:
            await self._fail(realm, login_id, user, ErrorCode.WRONG_PASSWORD, client, attempt)
        if result.needs_rehash:
            rehashed = await self.core.hasher.hash(password)

            async def replace_hash(tx: Tx) -> None:
                credential.secret, credential.updated_at = rehashed, self.core.now()
                await tx.credentials.update(credential)
                await self.core.audit.record(tx, events.PASSWORD_REHASHED,
                                             realm_id=realm.id, user_id=user.id)

            await attempt.ended(True, also=replace_hash)

    async def _fail(self, realm: Realm, login_id: str, user: User | None, reason: ErrorCode,
                    client: ClientInfo, attempt: Attempt) -> None:
        async def record(tx: Tx) -> None:
            await self.core.audit.record(tx, events.SIGN_IN_FAILED, realm_id=realm.id,
                                         user_id=user.id if user else None, client=client,
                                         reason=reason.value, login_id=login_id[:320])

        await attempt.ended(False, also=record)
        if realm.setting("reveal_unknown_users"):
            raise AuthError(reason)
        raise AuthError(ErrorCode.INVALID_CREDENTIALS)

    async def check_password(self, user: User, password: str) -> bool:
        """Verify a known user's password (for re-authentication), with no throttling side
        effects; callers that face the network should throttle around it."""
        async with self.core.store.transaction() as tx:
            creds = await tx.credentials.for_user(user.id, "password")
        if not creds:
            await self.core.hasher.dummy_verify(password)
            return False
        return (await self.core.hasher.verify(creds[0].secret, password)).ok
