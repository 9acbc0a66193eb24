"""The core's records: plain dataclasses that the store fills and the core reasons about.

They carry no behaviour that touches storage or HTTP. Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_security_stamp() -> str:
    """A user's security stamp: a new one ends every sign-in still in flight."""
    return secrets.token_urlsafe(16)


def has_nul(value: Any) -> bool:
    """Whether text anywhere in a JSON-like value holds a NUL character, which no store keeps
    (PostgreSQL refuses it in text and in JSON)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(item) for item in value)
    return False


def normalise_login_id(value: str) -> str:
    """Login ids match case-insensitively and without surrounding space."""
    return value.strip().casefold()


@dataclass(slots=True)
class Realm:
    id: str
    name: str
    display_name: str
    project_id: str
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)

    def setting(self, name: str, default: Any = None) -> Any:
        return self.settings.get(name, REALM_DEFAULTS.get(name, default))


# Realm settings that the core reads, with their defaults.
REALM_DEFAULTS: dict[str, Any] = {
    # Whether "user not found" and "wrong password" may be told apart (default: never).
    "reveal_unknown_users": False,
    # Whether self-service sign-up is open.
    "allow_signup": True,
    # Audience of access tokens; empty means the realm's issuer URL.
    "audience": "",
    # The scopes a native sign-in may ask for (core/scopes.py), and what one asking for none
    # is granted (RFC 6749 §3.3).
    "scopes": ("openid", "profile", "email", "phone", "offline_access"),
    "default_scope": "openid profile email phone",
}


@dataclass(slots=True)
class User:
    id: str
    realm_id: str
    email: str | None = None
    username: str | None = None
    phone: str | None = None
    email_verified: bool = False
    phone_verified: bool = False
    name: str | None = None
    given_name: str | None = None
    middle_name: str | None = None
    family_name: str | None = None
    picture: str | None = None
    custom_attributes: dict[str, Any] = field(default_factory=dict)
    roles: list[str] = field(default_factory=list)
    status: str = "active"  # active | disabled
    is_anonymous: bool = False
    external_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    last_sign_in_at: datetime | None = None
    # Changed with the password, the status, or a sign-out everywhere: a session opens only
    # while the stamp its sign-in read is still the user's (see SessionRepo.open).
    security_stamp: str = field(default_factory=new_security_stamp)

    @property
    def login_ids(self) -> list[str]:
        return [value for value in (self.email, self.username, self.phone) if value]

    @property
    def display_name(self) -> str | None:
        if self.name:
            return self.name
        joined = " ".join(p for p in (self.given_name, self.family_name) if p)
        return joined or None


@dataclass(slots=True)
class Credential:
    id: str
    user_id: str
    kind: str  # password | totp | recovery_code
    secret: str
    data: dict[str, Any] = field(default_factory=dict)
    confirmed: bool = True
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    last_used_at: datetime | None = None


@dataclass(slots=True)
class Organisation:
    id: str
    realm_id: str
    name: str
    display_name: str
    account_name: str | None = None
    is_active: bool = True
    is_suspended: bool = False
    is_paid: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    secret_enc: bytes | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass(slots=True)
class Membership:
    id: str
    realm_id: str
    organisation_id: str
    user_id: str
    roles: list[str] = field(default_factory=list)
    status: str = "active"  # active | inactive
    failed_attempts: int = 0
    locked_until: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass(slots=True)
class Session:
    id: str
    realm_id: str
    user_id: str
    amr: list[str]
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    organisation_id: str | None = None
    device_id: str | None = None
    client_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None
    scope: str | None = None  # granted at sign-in (native API); None: not scoped

    def is_live(self, now: datetime) -> bool:
        return self.revoked_at is None and self.expires_at > now


@dataclass(slots=True)
class RefreshToken:
    id: str
    session_id: str
    token_hash: str
    created_at: datetime
    expires_at: datetime
    parent_id: str | None = None
    rotated_at: datetime | None = None
    successor_id: str | None = None
    successor_enc: bytes | None = None


@dataclass(slots=True)
class SigningKey:
    kid: str
    realm_id: str
    alg: str
    public_jwk: dict[str, Any]
    private_enc: bytes
    status: str  # active | retired
    created_at: datetime
    retired_at: datetime | None = None
    # When the public key may leave the JWKS: no token it signed can still be valid then.
    publish_until: datetime | None = None


@dataclass(slots=True)
class Device:
    id: str
    realm_id: str
    user_id: str
    device_key: str
    device_group_key: str
    name: str | None
    created_at: datetime
    last_seen_at: datetime
    user_agent: str | None = None
    revoked_at: datetime | None = None


@dataclass(slots=True)
class ReauthToken:
    id: str
    device_id: str
    token_hash: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(slots=True)
class ApiKey:
    id: str
    realm_id: str
    name: str
    prefix: str
    key_hash: str
    created_at: datetime
    organisation_id: str | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(slots=True)
class LoginChallenge:
    id: str
    realm_id: str
    user_id: str
    kind: str  # choose_account | email_pin | totp
    token_hash: str
    created_at: datetime
    expires_at: datetime
    membership_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    pin_hash: str | None = None
    attempts: int = 0
    max_attempts: int = 5
    resends: int = 0
    client_ip: str | None = None
    consumed_at: datetime | None = None


@dataclass(slots=True)
class OneTimeCode:
    """An e-mailed code: e-mail verification or password reset."""

    id: str
    realm_id: str
    user_id: str
    purpose: str  # verify_email | reset_password
    secret_hash: str
    created_at: datetime
    expires_at: datetime
    consumed_at: datetime | None = None
    attempts: int = 0


@dataclass(slots=True)
class AuditEvent:
    type: str
    realm_id: str | None
    at: datetime = field(default_factory=utcnow)
    user_id: str | None = None
    session_id: str | None = None
    organisation_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(slots=True, eq=False)
class Rotation:
    """A refresh token's rotation, as the core asks the store to carry it out
    (``RefreshTokenRepo.rotate_live``): the token by its hash, its successor as made by the
    core, and the event to record. Compared by identity: two rotations of one token are two
    requests."""
    token_hash: str
    realm_id: str
    now: datetime
    successor_id: str
    successor_hash: str
    successor_expires_at: datetime
    successor_enc: bytes
    touch_before: datetime
    event: AuditEvent
    client_id: str | None = None


@dataclass(slots=True)
class OutboxMail:
    id: str
    realm_id: str | None
    recipient: str
    subject: str
    body_text: str
    template: str
    created_at: datetime
    next_attempt_at: datetime
    attempts: int = 0
    sent_at: datetime | None = None
    last_error: str | None = None


@dataclass(slots=True)
class ThrottleState:
    key: str
    failures: int
    window_started_at: datetime
    blocked_until: datetime | None = None
    pending: int = 0  # attempts admitted and still being checked
    pending_until: datetime | None = None  # when a crashed check's pending count lapses


@dataclass(slots=True, eq=False)
class Settlement:
    """A pending throttle attempt that ended well, for the store to write: every key loses
    the attempt and ``cleared`` (the login id's key) also its failures and its block
    (``ThrottleRepo.settle``). A sign-in hands it to the write that opens its session
    (``SessionRepo.open``), which marks it ``written``."""
    cleared: str
    taken_back: tuple[str, ...]
    at: datetime
    written: bool = False


@dataclass(slots=True)
class ClientInfo:
    """Who is asking: recorded on sessions and audit events, used by throttling."""

    ip: str | None = None
    user_agent: str | None = None
    device_key: str | None = None
