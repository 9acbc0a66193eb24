"""Time-based one-time passwords (RFC 6238) as a second factor, and recovery codes.

Enrolment makes an unconfirmed TOTP credential and hands out its secret once, as an
``otpauth://`` URI for authenticator apps; a first valid code confirms it and returns ten
recovery codes (shown once). The secret is kept encrypted under the master secret (bound to its
credential id); recovery codes are kept as keyed digests and each works once.

A code is accepted for the current 30-second step and one step either side (clock drift). A step
once used cannot be used again, nor can an earlier one: the credential's ``last_used_at`` holds
the start of the last accepted step and moves forward only by compare-and-set, so two concurrent
uses of one code cannot both succeed. Wrong codes are throttled per user.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyotp

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Credential, Realm, User
from authgate.crypto.tokens import new_id

if TYPE_CHECKING:
    from authgate.core.engine import Core
    from authgate.core.ports import Tx

STEP = 30
DIGITS = 6
DRIFT_STEPS = 1
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no look-alikes (0/o, 1/l/i)
_SECRET_PURPOSE = "totp-secret"
_RECOVERY_PURPOSE = "recovery-code"

TOTP_ENROLLED = "mfa.totp_enrolled"
TOTP_CONFIRMED = "mfa.totp_confirmed"
TOTP_DISABLED = "mfa.totp_disabled"
MFA_VERIFIED = "mfa.verified"
MFA_FAILED = "mfa.failed"
RECOVERY_CODES_REGENERATED = "mfa.recovery_codes_regenerated"


@dataclass(slots=True)
class Enrolment:
    secret: str
    uri: str


@dataclass(slots=True)
class TotpStatus:
    enabled: bool
    pending: bool
    recovery_codes_left: int


def _normalise_recovery(code: str) -> str:
    return "".join(ch for ch in code.lower() if ch.isalnum())


def _new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(10))
    return f"{raw[:5]}-{raw[5:]}"


class Totp:
    def __init__(self, core: Core) -> None:
        self.core = core

    # Secrets at rest.

    def _seal(self, credential_id: str, secret: str) -> str:
        sealed = self.core.box.encrypt(_SECRET_PURPOSE, secret.encode(), credential_id)
        return base64.urlsafe_b64encode(sealed).decode()

    def _open(self, credential: Credential) -> str:
        sealed = base64.urlsafe_b64decode(credential.secret.encode())
        return self.core.box.decrypt(_SECRET_PURPOSE, sealed, credential.id).decode()

    def _recovery_digest(self, code: str) -> str:
        return self.core.box.mac(_RECOVERY_PURPOSE, _normalise_recovery(code))

    # State.

    async def status(self, user: User) -> TotpStatus:
        async with self.core.store.transaction() as tx:
            totps = await tx.credentials.for_user(user.id, "totp")
            recovery = await tx.credentials.for_user(user.id, "recovery_code")
        return TotpStatus(enabled=any(c.confirmed for c in totps),
                          pending=any(not c.confirmed for c in totps),
                          recovery_codes_left=len(recovery))

    async def is_enabled(self, user: User) -> bool:
        """Whether sign-ins of this user need a second factor (one read: on every sign-in)."""
        async with self.core.store.transaction() as tx:
            return any(c.confirmed for c in await tx.credentials.for_user(user.id, "totp"))

    # Enrolment.

    async def enrol(self, realm: Realm, user: User, *,
                    client: ClientInfo | None = None) -> Enrolment:
        """Start (or restart) enrolment: a new secret, unconfirmed until a code proves it."""
        async with self.core.store.transaction(write=True) as tx:
            existing = await tx.credentials.for_user(user.id, "totp")
            if any(c.confirmed for c in existing):
                raise AuthError(ErrorCode.INVALID_REQUEST,
                                "TOTP is already enabled; disable it before enrolling again.")
            for old in existing:
                await tx.credentials.delete(old.id)
            secret = pyotp.random_base32()
            now = self.core.now()
            credential = Credential(id=new_id(), user_id=user.id, kind="totp", secret="",
                                    confirmed=False, created_at=now, updated_at=now,
                                    data={"digits": DIGITS, "period": STEP, "alg": "SHA1"})
            credential.secret = self._seal(credential.id, secret)
            await tx.credentials.add(credential)
            await self.core.audit.record(tx, TOTP_ENROLLED, realm_id=realm.id, user_id=user.id,
                                         client=client)
        account = user.email or user.username or user.phone or user.id
        issuer = realm.display_name or realm.name
        uri = pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(
            name=account, issuer_name=issuer)
        return Enrolment(secret=secret, uri=uri)

    async def confirm(self, realm: Realm, user: User, code: str, *,
                      client: ClientInfo | None = None) -> list[str]:
        """Confirm enrolment with a first code; returns the recovery codes (shown once)."""
        async with self.core.store.transaction() as tx:
            pending = [c for c in await tx.credentials.for_user(user.id, "totp")
                       if not c.confirmed]
        if not pending:
            raise AuthError(ErrorCode.INVALID_REQUEST, "There is no TOTP enrolment to confirm.")
        credential = pending[-1]
        async def attempt() -> str:
            return "otp" if await self._accept_totp(credential, code) else ""

        await self._throttled(realm, user, client, attempt)
        credential.confirmed = True
        credential.updated_at = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            current = await tx.credentials.for_user(user.id, "totp")
            if not any(c.id == credential.id for c in current):
                raise AuthError(ErrorCode.INVALID_REQUEST, "The enrolment was replaced.")
            credential.last_used_at = next(c.last_used_at for c in current
                                           if c.id == credential.id)
            await tx.credentials.update(credential)
            codes = await self._replace_recovery_codes(tx, user)
            await self.core.audit.record(tx, TOTP_CONFIRMED, realm_id=realm.id,
                                         user_id=user.id, client=client)
        return codes

    async def _replace_recovery_codes(self, tx: Tx, user: User) -> list[str]:
        await tx.credentials.delete_for_user(user.id, "recovery_code")
        now = self.core.now()
        codes = [_new_recovery_code() for _ in range(RECOVERY_CODES)]
        for code in codes:
            await tx.credentials.add(Credential(
                id=new_id(), user_id=user.id, kind="recovery_code",
                secret=self._recovery_digest(code), created_at=now, updated_at=now))
        return codes

    async def disable(self, realm: Realm, user: User, code: str, *,
                      client: ClientInfo | None = None) -> None:
        """Turn TOTP off, proven by a current code or a recovery code."""
        if not await self.is_enabled(user):
            raise AuthError(ErrorCode.INVALID_REQUEST, "TOTP is not enabled.")
        await self.verify(realm, user, code, client=client)
        async with self.core.store.transaction(write=True) as tx:
            await tx.credentials.delete_for_user(user.id, "totp")
            await tx.credentials.delete_for_user(user.id, "recovery_code")
            await self.core.audit.record(tx, TOTP_DISABLED, realm_id=realm.id, user_id=user.id,
                                         client=client)

    async def regenerate_recovery_codes(self, realm: Realm, user: User, code: str, *,
                                        client: ClientInfo | None = None) -> list[str]:
        """New recovery codes (the old ones stop working), proven by a current TOTP code."""
        if not await self.is_enabled(user):
            raise AuthError(ErrorCode.INVALID_REQUEST, "TOTP is not enabled.")
        method = await self.verify(realm, user, code, client=client, allow_recovery=False)
        assert method == "otp"
        async with self.core.store.transaction(write=True) as tx:
            codes = await self._replace_recovery_codes(tx, user)
            await self.core.audit.record(tx, RECOVERY_CODES_REGENERATED, realm_id=realm.id,
                                         user_id=user.id, client=client)
        return codes

    # Verification.

    async def second_factor(self, realm: Realm, user: User, code: str | None, *,
                            client: ClientInfo | None = None,
                            enabled: bool | None = None) -> list[str]:
        """The sign-in rule: a user with TOTP enabled must give a code. Returns the
        authentication methods (``amr``) of the whole sign-in. ``enabled`` says whether TOTP
        is enabled, when the caller has already read it."""
        if not (await self.is_enabled(user) if enabled is None else enabled):
            return ["pwd"]
        if not code:
            raise AuthError(ErrorCode.MFA_REQUIRED, details={"methods": ["otp"]})
        await self.verify(realm, user, code, client=client)
        return ["pwd", "otp", "mfa"]

    async def verify(self, realm: Realm, user: User, code: str, *,
                     client: ClientInfo | None = None, allow_recovery: bool = True) -> str:
        """Check a TOTP code (or a recovery code) of an enrolled user; returns ``otp`` or
        ``recovery_code``, or raises INVALID_MFA_CODE (TOO_MANY_ATTEMPTS when throttled)."""
        async with self.core.store.transaction() as tx:
            totps = [c for c in await tx.credentials.for_user(user.id, "totp") if c.confirmed]
            recovery = (await tx.credentials.for_user(user.id, "recovery_code")
                        if allow_recovery else [])
        if not totps:
            raise AuthError(ErrorCode.INVALID_MFA_CODE)

        async def attempt() -> str:
            if await self._accept_totp(totps[-1], code):
                return "otp"
            if recovery and await self._accept_recovery(recovery, code):
                return "recovery_code"
            return ""

        return await self._throttled(realm, user, client, attempt)

    async def _throttled(self, realm: Realm, user: User, client: ClientInfo | None,
                         attempt: Callable[[], Awaitable[str]]) -> str:
        throttle = self.core.throttle
        key = throttle.scoped_key("mfa", user.id, self.core.settings.throttle_free_attempts)
        async with throttle.attempting([key]) as pending:
            method = await attempt()

            async def record(tx: Tx) -> None:
                if method:
                    await self.core.audit.record(tx, MFA_VERIFIED, realm_id=realm.id,
                                                 user_id=user.id, client=client, method=method)
                else:
                    await self.core.audit.record(tx, MFA_FAILED, realm_id=realm.id,
                                                 user_id=user.id, client=client)

            await pending.ended(bool(method), also=record)
        if not method:
            raise AuthError(ErrorCode.INVALID_MFA_CODE)
        return method

    async def _accept_totp(self, credential: Credential, code: str) -> bool:
        """True once per time step: the matching step must be later than the last used one."""
        code = (code or "").strip().replace(" ", "")
        if len(code) != DIGITS or not code.isdigit():
            return False
        totp = pyotp.TOTP(self._open(credential), digits=DIGITS, interval=STEP)
        current = int(self.core.now().timestamp()) // STEP
        for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
            if hmac.compare_digest(totp.at(step * STEP), code):
                step_start = datetime.fromtimestamp(step * STEP, UTC)
                async with self.core.store.transaction(write=True) as tx:
                    return await tx.credentials.mark_used(credential.id, step_start)
        return False

    async def _accept_recovery(self, recovery: list[Credential], code: str) -> bool:
        if not code or len(code) > 64:
            return False
        wanted = self._recovery_digest(code)
        for credential in recovery:
            if hmac.compare_digest(credential.secret, wanted):
                # Compare-and-set from "never used" (NULL) to its creation time: only one
                # concurrent use of a code can win.
                async with self.core.store.transaction(write=True) as tx:
                    if not await tx.credentials.mark_used(credential.id, credential.created_at):
                        return False
                    await tx.credentials.delete(credential.id)
                return True
        return False
