"""Password reset by an e-mailed token.

``request`` answers the same whether or not the address belongs to someone (no account
enumeration) and is throttled per address, so it cannot be used to flood a mailbox. The token
is random (stored as its SHA-256 digest), valid one hour, single use, and asking again
invalidates the previous one. ``complete`` sets the new password, which ends every session of
the user.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, OneTimeCode, Realm, User, normalise_login_id
from authgate.crypto.tokens import digest, new_id, new_token

if TYPE_CHECKING:
    from authgate.core.engine import Core

PURPOSE = "reset_password"
RESET_TTL = timedelta(hours=1)
REQUESTS_PER_WINDOW = 3
RESET_REQUESTED = "user.password_reset_requested"


class PasswordResets:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def request(self, realm: Realm, email: str, client: ClientInfo | None = None, *,
                      link_base: str | None = None) -> None:
        """E-mail a reset token to the user with this address, if there is one."""
        throttle = self.core.throttle
        key = throttle.scoped_key(f"reset:{realm.id}", normalise_login_id(email)[:320],
                                  REQUESTS_PER_WINDOW)
        try:
            await throttle.check([key])
        except AuthError:
            return  # said alike to everyone: the mailbox is not flooded, nothing is revealed
        user = await self.core.users.find(realm, email)
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            await throttle.record_failure(tx, [key])  # counts requests, not failures
            if user is None or not user.email or user.status != "active":
                return
            raw = new_token(32)
            await tx.codes.invalidate_for_user(user.id, PURPOSE, now)
            await tx.codes.add(OneTimeCode(id=new_id(), realm_id=realm.id, user_id=user.id,
                                           purpose=PURPOSE, secret_hash=digest(raw),
                                           created_at=now, expires_at=now + RESET_TTL))
            base = link_base or f"{self.core.settings.public_url}/password/reset"
            await self.core.mail.enqueue(tx, realm_id=realm.id, to=user.email,
                                         template="reset_password",
                                         name=user.display_name or user.email, code=raw,
                                         link=f"{base}?token={raw}",
                                         minutes=int(RESET_TTL.total_seconds() // 60))
            await self.core.audit.record(tx, RESET_REQUESTED, realm_id=realm.id,
                                         user_id=user.id, client=client)

    async def complete(self, realm: Realm, token: str, new_password: str,
                       client: ClientInfo | None = None) -> User:
        """Set a new password with a reset token; every session of the user ends."""
        if not isinstance(token, str) or not token or len(token) > 512:
            raise AuthError(ErrorCode.INVALID_CODE)
        async with self.core.store.transaction() as tx:
            code = await tx.codes.by_hash(digest(token))
        if (code is None or code.realm_id != realm.id or code.purpose != PURPOSE
                or code.consumed_at is not None):
            raise AuthError(ErrorCode.INVALID_CODE)
        if code.expires_at <= self.core.now():
            raise AuthError(ErrorCode.CODE_EXPIRED)
        user = await self.core.users.get(realm, code.user_id)
        # Check the new password before spending the token, so a weak one can be corrected.
        self.core.users.policy.check(new_password, related=(user.email, user.username,
                                                            user.phone))
        async with self.core.store.transaction(write=True) as tx:
            if not await tx.codes.consume(code.id, self.core.now()):
                raise AuthError(ErrorCode.INVALID_CODE)
        await self.core.users.set_password(realm, user.id, new_password, client=client)
        return user
