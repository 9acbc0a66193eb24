"""Password reset requests: a single-use code e-mailed to the account's address.

Every request answers alike whether or not the login id exists. Requests are throttled per
(realm, login id), so nobody can flood a mailbox. The code is stored only as a digest and
replaces any earlier one. Redeeming the code is the job of the e-mail flows (see the
``one_time_codes`` table, purpose ``reset_password``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from authgate.core import audit as events
from authgate.core.models import ClientInfo, OneTimeCode, Realm, normalise_login_id
from authgate.crypto.tokens import digest, new_id, new_token

if TYPE_CHECKING:
    from authgate.core.engine import Core

PURPOSE = "reset_password"
CODE_MINUTES = 30


class PasswordReset:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def request(self, realm: Realm, login_id: str,
                      client: ClientInfo | None = None) -> None:
        """E-mail a reset code to the user of ``login_id`` if there is one with an address.
        Raises TOO_MANY_ATTEMPTS when the login id has asked too often."""
        throttle = self.core.throttle
        key = throttle.scoped_key("reset", f"{realm.id}:{normalise_login_id(login_id)}",
                                  self.core.settings.throttle_free_attempts)
        await throttle.check([key])
        async with self.core.store.transaction() as tx:
            user = await tx.users.by_login_id(realm.id, login_id)
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            await throttle.record_failure(tx, [key])  # every request counts
            if user is None or not user.email or user.status != "active":
                return
            secret = new_token(32)
            await tx.codes.invalidate_for_user(user.id, PURPOSE, now)
            await tx.codes.add(OneTimeCode(
                id=new_id(), realm_id=realm.id, user_id=user.id, purpose=PURPOSE,
                secret_hash=digest(secret), created_at=now,
                expires_at=now + timedelta(minutes=CODE_MINUTES)))
            await self.core.mail.enqueue(tx, realm_id=realm.id, to=user.email,
                                         template="reset_password",
                                         name=user.display_name or user.email, code=secret,
                                         link="", minutes=CODE_MINUTES)
            await self.core.audit.record(tx, events.PASSWORD_RESET_REQUESTED,
                                         realm_id=realm.id, user_id=user.id, client=client)
