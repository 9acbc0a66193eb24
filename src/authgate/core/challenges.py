"""Login challenges: short-lived, single-use handles for a sign-in that needs one more step.

One identity can hold accounts (memberships) in several organisations, and several roles in one.
A sign-in then goes in steps, each step handing the client an opaque handle (a *login token*):

1. ``begin``: the password proves the identity; every account the identity may sign in to gets
   a ``choose_account`` challenge per role, and every account its organisation refuses (locked,
   suspended, inactive) is listed with the reason and no handle.
2. ``choose``: the client picks one handle. Without a second factor the session starts; when the
   organisation requires MFA for that role, a 6-digit PIN is e-mailed (through the outbox, in the
   same transaction as its ``email_pin`` challenge) and a new handle for the PIN step is returned.
3. ``verify_pin`` (and ``resend_pin``): the right PIN, within 15 minutes and a bounded number of
   attempts, starts the session.

Handles are stored only as SHA-256 digests, PINs only as keyed MACs bound to their challenge.
Each challenge is bound to its user, its membership and role, and the client (address and user
agent) that started it; it is consumed atomically (``ChallengeRepo.consume``), so it works once.
Wrong passwords and wrong PINs count as failures in the organisations concerned
(``org_policy``), which lock the account there after the organisation's limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from authgate.core import audit as events
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, LoginChallenge, Realm, User
from authgate.core.organisations import Account
from authgate.core.sessions import Tokens
from authgate.crypto.tokens import digest, new_id, new_pin, new_token, same

if TYPE_CHECKING:
    from authgate.core.engine import Core
    from authgate.core.ports import Tx

CHOOSE_ACCOUNT = "choose_account"
EMAIL_PIN = "email_pin"

CHOOSE_TTL = timedelta(minutes=10)
PIN_TTL = timedelta(minutes=15)
PIN_DIGITS = 6
PIN_ATTEMPTS = 5
PIN_RESENDS = 3
MAX_HANDLE_LENGTH = 512

PIN_SENT = "challenge.pin_sent"
_PIN_MAC = "sign-in-pin"
_PIN = re.compile(rf"^[0-9]{{{PIN_DIGITS}}}$")


@dataclass(slots=True)
class AccountOption:
    """One role in one organisation account, as offered after the password step."""

    account: Account
    role: str | None
    login_token: str | None  # None when the organisation refuses the account
    refusal: ErrorCode | None
    mfa_required: bool

    @property
    def locked(self) -> bool:
        return self.refusal is ErrorCode.ACCOUNT_LOCKED


@dataclass(slots=True)
class AccountChoice:
    user: User
    options: list[AccountOption]

    @property
    def locked(self) -> bool:
        """Whether any of the identity's accounts is locked."""
        return any(option.locked for option in self.options)


@dataclass(slots=True)
class SignInStep:
    """What choosing an account (or entering its PIN) gave: a session, or a PIN step."""

    user: User
    account: Account
    role: str | None
    tokens: Tokens | None = None
    pin_token: str | None = None

    @property
    def mfa_required(self) -> bool:
        return self.tokens is None


class Challenges:
    def __init__(self, core: Core) -> None:
        self.core = core

    # Step 1: the password, and the accounts it opens.

    async def begin(self, realm: Realm, login_id: str, password: str,
                    client: ClientInfo | None = None) -> AccountChoice:
        client = client or ClientInfo()
        try:
            user = (await self.core.signin.password(realm, login_id, password, client)).user
        except AuthError as exc:
            if exc.code in (ErrorCode.INVALID_CREDENTIALS, ErrorCode.WRONG_PASSWORD):
                await self._count_password_failure(realm, login_id, client)
            raise
        accounts = [a for a in await self.core.organisations.accounts(user.id)
                    if a.organisation.realm_id == realm.id]
        if not accounts:
            # Told only to someone who knows the password.
            raise AuthError(ErrorCode.USER_NOT_FOUND, "The identity has no accounts.")
        policies = self.core.org_policy
        now = self.core.now()
        options: list[AccountOption] = []
        async with self.core.store.transaction(write=True) as tx:
            for account in accounts:
                refusal = policies.refusal(account)
                if refusal is None:
                    await policies.record_success(tx, account)
                for role in account.membership.roles or [None]:
                    token = None
                    if refusal is None:
                        token = new_token(48)
                        await tx.challenges.add(self._challenge(
                            CHOOSE_ACCOUNT, user, account, role, token, client,
                            now=now, ttl=CHOOSE_TTL))
                    options.append(AccountOption(account, role, token, refusal,
                                                 policies.requires_mfa(account, role)))
        return AccountChoice(user, options)

    async def _count_password_failure(self, realm: Realm, login_id: str,
                                      client: ClientInfo) -> None:
        """A wrong password for an identity is a failed sign-in in each of its organisations."""
        user = await self.core.users.find(realm, login_id)
        if user is None:
            return
        accounts = await self.core.organisations.accounts(user.id)
        if not accounts:
            return
        async with self.core.store.transaction(write=True) as tx:
            for account in accounts:
                await self.core.org_policy.record_failure(tx, account, client)

    # Step 2: the chosen account.

    async def choose(self, realm: Realm, login_token: str,
                     client: ClientInfo | None = None) -> SignInStep:
        client = client or ClientInfo()
        challenge = await self._load(realm, login_token, CHOOSE_ACCOUNT, client)
        now = self.core.now()
        if challenge.expires_at <= now:
            raise AuthError(ErrorCode.CHALLENGE_EXPIRED)
        user, account = await self._subject(challenge)
        self.core.org_policy.check(account)
        role = challenge.data.get("role")
        if not self.core.org_policy.requires_mfa(account, role):
            async with self.core.store.transaction(write=True) as tx:
                if not await tx.challenges.consume(challenge.id, now):
                    raise AuthError(ErrorCode.CHALLENGE_INVALID)
                await self.core.org_policy.record_success(tx, account)
            tokens = await self._start(realm, user, account, role, ["pwd"], client)
            return SignInStep(user, account, role, tokens=tokens)
        if not user.email:
            raise AuthError(ErrorCode.MFA_REQUIRED, "There is no e-mail address to send a PIN to.")
        token, pin = new_token(48), new_pin(PIN_DIGITS)
        pin_challenge = self._challenge(EMAIL_PIN, user, account, role, token, client,
                                        now=now, ttl=PIN_TTL)
        pin_challenge.pin_hash = self._pin_hash(pin_challenge.id, pin)
        pin_challenge.max_attempts = PIN_ATTEMPTS
        async with self.core.store.transaction(write=True) as tx:
            if not await tx.challenges.consume(challenge.id, now):
                raise AuthError(ErrorCode.CHALLENGE_INVALID)
            await tx.challenges.add(pin_challenge)
            await self._send_pin(tx, realm, user, account, pin, client)
        return SignInStep(user, account, role, pin_token=token)

    # Step 3: the e-mailed PIN.

    async def verify_pin(self, realm: Realm, login_token: str, pin: str,
                         client: ClientInfo | None = None) -> SignInStep:
        client = client or ClientInfo()
        challenge = await self._load(realm, login_token, EMAIL_PIN, client)
        now = self.core.now()
        if challenge.expires_at <= now:
            # Like a TOTP code outside its window, an expired PIN is simply not a valid code.
            raise AuthError(ErrorCode.INVALID_MFA_CODE, "The PIN has expired.",
                            details={"expired": True})
        user, account = await self._subject(challenge)
        self.core.org_policy.check(account)
        async with self.core.store.transaction(write=True) as tx:
            if not await tx.challenges.add_attempt(challenge.id):
                raise AuthError(ErrorCode.CHALLENGE_INVALID,
                                "No attempts are left for this PIN; sign in again.")
            # Read again under the attempt's row lock: a resend may have replaced the PIN.
            current = await tx.challenges.by_hash(challenge.token_hash) or challenge
            ok = (isinstance(pin, str) and bool(_PIN.match(pin)) and current.pin_hash is not None
                  and same(current.pin_hash, self._pin_hash(current.id, pin)))
            if not ok:
                await self.core.org_policy.record_failure(tx, account, client)
                await self.core.audit.record(
                    tx, events.SIGN_IN_FAILED, realm_id=realm.id, user_id=user.id,
                    organisation_id=account.organisation.id, client=client,
                    reason=ErrorCode.INVALID_MFA_CODE.value)
        if not ok:
            raise AuthError(ErrorCode.INVALID_MFA_CODE)
        async with self.core.store.transaction(write=True) as tx:
            if not await tx.challenges.consume(challenge.id, now):
                raise AuthError(ErrorCode.CHALLENGE_INVALID)
            await self.core.org_policy.record_success(tx, account)
        role = challenge.data.get("role")
        tokens = await self._start(realm, user, account, role, ["pwd", "otp", "mfa"], client)
        return SignInStep(user, account, role, tokens=tokens)

    async def resend_pin(self, realm: Realm, login_token: str,
                         client: ClientInfo | None = None) -> None:
        """Send a new PIN for a live PIN step (the old one stops working), a bounded number
        of times; the new PIN is valid for 15 minutes from now."""
        client = client or ClientInfo()
        challenge = await self._load(realm, login_token, EMAIL_PIN, client)
        now = self.core.now()
        if challenge.expires_at <= now:
            raise AuthError(ErrorCode.CHALLENGE_EXPIRED)
        user, account = await self._subject(challenge)
        self.core.org_policy.check(account)
        pin = new_pin(PIN_DIGITS)
        async with self.core.store.transaction(write=True) as tx:
            if not await tx.challenges.add_resend(challenge.id, PIN_RESENDS):
                raise AuthError(ErrorCode.TOO_MANY_ATTEMPTS,
                                "No more PINs can be sent for this sign-in; sign in again.")
            current = await tx.challenges.by_hash(challenge.token_hash) or challenge
            current.pin_hash = self._pin_hash(current.id, pin)
            current.expires_at = now + PIN_TTL
            await tx.challenges.update(current)
            await self._send_pin(tx, realm, user, account, pin, client)

    # Shared steps.

    def _challenge(self, kind: str, user: User, account: Account, role: str | None,
                   token: str, client: ClientInfo, *, now: datetime,
                   ttl: timedelta) -> LoginChallenge:
        return LoginChallenge(
            id=new_id(), realm_id=user.realm_id, user_id=user.id, kind=kind,
            token_hash=digest(token), created_at=now, expires_at=now + ttl,
            membership_id=account.membership.id,
            data={"role": role, "agent": self._agent(client)}, client_ip=client.ip)

    @staticmethod
    def _agent(client: ClientInfo) -> str:
        return digest(client.user_agent or "")[:32]

    def _pin_hash(self, challenge_id: str, pin: str) -> str:
        return self.core.box.mac(_PIN_MAC, f"{challenge_id}:{pin}")

    async def _load(self, realm: Realm, login_token: str, kind: str,
                    client: ClientInfo) -> LoginChallenge:
        """The live challenge of this kind that the handle names, for this client."""
        if not isinstance(login_token, str) or not login_token \
                or len(login_token) > MAX_HANDLE_LENGTH:
            raise AuthError(ErrorCode.CHALLENGE_INVALID)
        async with self.core.store.transaction() as tx:
            challenge = await tx.challenges.by_hash(digest(login_token))
        if (challenge is None or challenge.realm_id != realm.id or challenge.kind != kind
                or challenge.consumed_at is not None):
            raise AuthError(ErrorCode.CHALLENGE_INVALID)
        if (challenge.client_ip is not None and challenge.client_ip != client.ip) or \
                challenge.data.get("agent", self._agent(client)) != self._agent(client):
            raise AuthError(ErrorCode.CHALLENGE_INVALID)
        return challenge

    async def _subject(self, challenge: LoginChallenge) -> tuple[User, Account]:
        """The user and the account a challenge is bound to, as they are now."""
        async with self.core.store.transaction() as tx:
            user = await tx.users.get(challenge.user_id)
            membership = (await tx.memberships.get(challenge.membership_id)
                          if challenge.membership_id else None)
            org = (await tx.organisations.get(membership.organisation_id)
                   if membership is not None else None)
        if (user is None or membership is None or org is None
                or membership.user_id != user.id or org.realm_id != challenge.realm_id):
            raise AuthError(ErrorCode.CHALLENGE_INVALID)
        if user.status != "active":
            raise AuthError(ErrorCode.USER_DISABLED)
        role = challenge.data.get("role")
        if role is not None and role not in membership.roles:
            raise AuthError(ErrorCode.CHALLENGE_INVALID)  # the role was taken away meanwhile
        return user, Account(membership, org)

    async def _send_pin(self, tx: Tx, realm: Realm, user: User, account: Account, pin: str,
                        client: ClientInfo) -> None:
        assert user.email is not None
        await self.core.mail.enqueue(tx, realm_id=realm.id, to=user.email,
                                     template="sign_in_pin",
                                     name=user.display_name or user.email, code=pin,
                                     minutes=int(PIN_TTL.total_seconds() // 60))
        await self.core.audit.record(tx, PIN_SENT, realm_id=realm.id, user_id=user.id,
                                     organisation_id=account.organisation.id, client=client)

    async def _start(self, realm: Realm, user: User, account: Account, role: str | None,
                     amr: list[str], client: ClientInfo) -> Tokens:
        return await self.core.sessions.start(
            realm, user, amr=amr, client=client, organisation_id=account.organisation.id,
            extra_claims={"role": role} if role is not None else None, with_id_token=False)
