"""E-mailed codes: verifying an e-mail address, and resetting a forgotten password.

A verification mail carries a link with a long random token; a reset mail carries a six-digit
code. Both are stored only as keyed digests (``SecretBox.mac``, so a stolen database does not let
anyone try the short codes offline), bound to their user, expire, and work once. A reset code
allows ``MAX_CODE_ATTEMPTS`` wrong tries, then dies. Asking for a reset never says whether the
account exists. Mails are written to the outbox in the same transaction as their code.

Surfaces give the link's shape (their own verification path), with ``{token}`` and ``{user}``
placeholders: the core knows no URLs of its own.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote

from authgate.core import audit as events
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, OneTimeCode, Realm, User
from authgate.core.users import NewUser
from authgate.crypto.tokens import new_id, new_pin, new_token

if TYPE_CHECKING:
    from authgate.core.engine import Core
    from authgate.core.ports import Tx

VERIFY_EMAIL = "verify_email"
RESET_PASSWORD = "reset_password"
VERIFY_TTL = timedelta(hours=24)
RESET_TTL = timedelta(hours=1)
MAX_CODE_ATTEMPTS = 5

EMAIL_VERIFIED = "user.email_verified"
RESET_REQUESTED = "user.password_reset_requested"
RESET_FAILED = "user.password_reset_failed"


class EmailCodes:
    def __init__(self, core: Core) -> None:
        self.core = core

    def _digest(self, purpose: str, user_id: str, secret: str) -> str:
        return self.core.box.mac(purpose, f"{user_id}:{secret}")

    # Verification.

    async def sign_up(self, realm: Realm, new: NewUser, *, link: str,
                      client: ClientInfo | None = None) -> User:
        """Self-service sign-up (the same rules as ``Users.sign_up``) that also sends a
        verification mail, committed together with the new user."""
        if not realm.setting("allow_signup"):
            raise AuthError(ErrorCode.FORBIDDEN, "Sign-up is closed in this realm.")
        if not new.password:
            raise AuthError(ErrorCode.INVALID_REQUEST, "A password is required.",
                            details={"field": "password"})

        async def send(tx: Tx, user: User) -> None:
            await self.enqueue_verification(tx, realm, user, link=link)

        return await self.core.users.create(realm, new, client=client, event=events.SIGN_UP,
                                            hooks=[send])

    async def enqueue_verification(self, tx: Tx, realm: Realm, user: User, *, link: str) -> None:
        if not user.email:
            return
        token = new_token(32)
        now = self.core.now()
        await tx.codes.add(OneTimeCode(id=new_id(), realm_id=realm.id, user_id=user.id,
                                       purpose=VERIFY_EMAIL,
                                       secret_hash=self._digest(VERIFY_EMAIL, user.id, token),
                                       created_at=now, expires_at=now + VERIFY_TTL))
        url = link.replace("{token}", quote(token, safe="")).replace("{user}",
                                                                     quote(user.id, safe=""))
        await self.core.mail.enqueue(tx, realm_id=realm.id, to=user.email,
                                     template="verify_email", name=user.display_name or
                                     user.email, code=token, link=url,
                                     minutes=int(VERIFY_TTL.total_seconds() // 60))

    async def verify_email(self, realm: Realm, user_ref: str, token: str) -> User:
        """Mark the user's e-mail verified. ``user_ref`` is the user's id or login id.
        INVALID_CODE for a wrong, used or foreign token; CODE_EXPIRED for an expired one."""
        if not user_ref or not token or len(token) > 512 or len(user_ref) > 320:
            raise AuthError(ErrorCode.INVALID_CODE)
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            user = await tx.users.get(user_ref) if len(user_ref) <= 64 else None
            if user is None or user.realm_id != realm.id:
                user = await tx.users.by_login_id(realm.id, user_ref)
            code = (await tx.codes.by_hash(self._digest(VERIFY_EMAIL, user.id, token))
                    if user else None)
            if user is None or code is None or code.purpose != VERIFY_EMAIL or \
                    code.realm_id != realm.id or code.consumed_at is not None:
                raise AuthError(ErrorCode.INVALID_CODE)
            if code.expires_at <= now:
                raise AuthError(ErrorCode.CODE_EXPIRED)
            if not await tx.codes.consume(code.id, now):
                raise AuthError(ErrorCode.INVALID_CODE)
            user.email_verified = True
            user.updated_at = now
            await tx.users.update(user)
            await self.core.audit.record(tx, EMAIL_VERIFIED, realm_id=realm.id, user_id=user.id)
        return user

    # Password reset.

    async def request_password_reset(self, realm: Realm, login_id: str, *,
                                     client: ClientInfo | None = None) -> None:
        """Mail a reset code to the user, if there is one; silent either way."""
        if not login_id or len(login_id) > 320:
            return
        throttle = self.core.throttle
        key = throttle.scoped_key("reset-request", f"{realm.id}:{login_id.strip().casefold()}",
                                  self.core.settings.throttle_free_attempts)
        await throttle.check([key])
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            # Every request counts, so nobody can flood a mailbox with codes.
            await throttle.record_failure(tx, [key])
            user = await tx.users.by_login_id(realm.id, login_id)
            if user is None or not user.email or user.status != "active":
                return
            await tx.codes.invalidate_for_user(user.id, RESET_PASSWORD, now)
            code = new_pin(6)
            await tx.codes.add(OneTimeCode(id=new_id(), realm_id=realm.id, user_id=user.id,
                                           purpose=RESET_PASSWORD,
                                           secret_hash=self._digest(RESET_PASSWORD, user.id,
                                                                    code),
                                           created_at=now, expires_at=now + RESET_TTL))
            await self.core.mail.enqueue(tx, realm_id=realm.id, to=user.email,
                                         template="reset_password",
                                         name=user.display_name or user.email, code=code,
                                         link="", minutes=int(RESET_TTL.total_seconds() // 60))
            await self.core.audit.record(tx, RESET_REQUESTED, realm_id=realm.id,
                                         user_id=user.id, client=client)

    async def reset_password(self, realm: Realm, login_id: str, code: str, password: str, *,
                             client: ClientInfo | None = None) -> User:
        """Set a new password with a mailed code; every session of the user ends."""
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            user = await tx.users.by_login_id(realm.id, login_id) if login_id else None
            live = await tx.codes.live_for_user(user.id, RESET_PASSWORD, now) if user else []
            live = [c for c in live if c.attempts < MAX_CODE_ATTEMPTS]
            wanted = self._digest(RESET_PASSWORD, user.id, (code or "").strip()) if user else ""
            match = next((c for c in live if c.secret_hash == wanted), None)
            if match is None:
                for other in live:
                    await tx.codes.add_attempt(other.id)
                await self.core.audit.record(tx, RESET_FAILED, realm_id=realm.id,
                                             user_id=user.id if user else None, client=client)
        if user is None or match is None:
            raise AuthError(ErrorCode.INVALID_CODE)
        # The policy is checked before the code is spent, so a weak password can be retried.
        self.core.users.policy.check(password, related=(user.email, user.username, user.phone))
        async with self.core.store.transaction(write=True) as tx:
            if not await tx.codes.consume(match.id, now):
                raise AuthError(ErrorCode.INVALID_CODE)
        await self.core.users.set_password(realm, user.id, password, client=client)
        return user
