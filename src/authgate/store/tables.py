"""Authgate's tables (SQLAlchemy Core). Migrations in ``store/migrations`` create exactly these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect


_SQLITE_TEXT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"
_TEXTS_REMEMBERED = 256  # per processor: the moments of the writes in flight, and then some


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    # On SQLite a datetime is text, "YYYY-MM-DD HH:MM:SS.ffffff" in UTC: SQLAlchemy's own
    # storage format, so comparisons in SQL order correctly. These processors write and read
    # it with the datetime module's C functions instead of SQLAlchemy's generic ones (format
    # strings and a regular expression), which cost more than the query on hot paths; the
    # rules above (no naive datetimes, UTC) still apply.

    def bind_processor(self, dialect: Dialect) -> Any:
        """On SQLite, the text of each moment, remembered for the next binds: a write binds its
        moment several times (a refresh makes seven binds of three moments), and making the
        text costs CPython about 16,000 instructions where finding it again costs 1,300."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        to_utc = self.process_bind_param
        texts: dict[datetime, str] = {}

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            text = texts.get(value)
            if text is None:
                utc = value if value.tzinfo is UTC else to_utc(value, dialect)
                assert utc is not None
                text = _SQLITE_TEXT % (utc.year, utc.month, utc.day, utc.hour, utc.minute,
                                       utc.second, utc.microsecond)
                if len(texts) >= _TEXTS_REMEMBERED:
                    texts.clear()
                texts[value] = text
            return text

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        if dialect.name == "postgresql" and dialect.driver == "asyncpg":
            return None  # asyncpg reads timestamptz as a datetime in UTC already
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        from_utc = self.process_result_value

        def process(value: str | None) -> datetime | None:
            if value is None:
                return None
            try:  # the stored form: UTC with no offset, read as an aware datetime at once
                return datetime.fromisoformat(value + "+00:00")
            except ValueError:  # any other form ISO 8601 allows
                return from_utc(datetime.fromisoformat(value), dialect)

        return process


JSONType = JSON().with_variant(JSONB(), "postgresql")

naming = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=naming)

ID_LENGTH = 36  # a UUID's text form (crypto.tokens.new_id)
ID = String(ID_LENGTH)


def _id() -> Column[Any]:
    return Column("id", ID, primary_key=True)


def _created() -> Column[Any]:
    return Column("created_at", UTCDateTime(), nullable=False)


realms = Table(
    "realms", metadata,
    _id(),
    Column("name", String(64), nullable=False, unique=True),
    Column("display_name", String(200), nullable=False),
    Column("project_id", String(64), nullable=False, unique=True),
    Column("settings", JSONType, nullable=False),
    _created(),
)

users = Table(
    "users", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False),
    Column("email", String(320)),
    Column("username", String(320)),
    Column("phone", String(40)),
    Column("email_verified", Boolean, nullable=False),
    Column("phone_verified", Boolean, nullable=False),
    Column("name", String(200)),
    Column("given_name", String(200)),
    Column("middle_name", String(200)),
    Column("family_name", String(200)),
    Column("picture", String(2048)),
    Column("custom_attributes", JSONType, nullable=False),
    Column("roles", JSONType, nullable=False),
    Column("status", String(16), nullable=False),
    Column("is_anonymous", Boolean, nullable=False),
    Column("external_id", String(255)),
    _created(),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("last_sign_in_at", UTCDateTime()),
    Column("security_stamp", String(32), nullable=False),
    Index("ix_users_realm_created", "realm_id", "created_at"),
    # One user per external id in a realm (a customer's own user id): two first sign-ins with
    # one customer token must not make two users.
    Index("uq_users_realm_external", "realm_id", "external_id", unique=True),
)

# Every login id (e-mail, username, phone), normalised, unique within a realm.
login_ids = Table(
    "login_ids", metadata,
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), primary_key=True),
    Column("value", String(320), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
)

credentials = Table(
    "credentials", metadata,
    _id(),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("secret", Text, nullable=False),
    Column("data", JSONType, nullable=False),
    Column("confirmed", Boolean, nullable=False),
    _created(),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("last_used_at", UTCDateTime()),
    Index("ix_credentials_user_kind", "user_id", "kind"),
)

organisations = Table(
    "organisations", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("display_name", String(200), nullable=False),
    Column("account_name", String(200)),
    Column("is_active", Boolean, nullable=False),
    Column("is_suspended", Boolean, nullable=False),
    Column("is_paid", Boolean, nullable=False),
    Column("settings", JSONType, nullable=False),
    Column("secret_enc", LargeBinary),
    _created(),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("realm_id", "name", name="uq_organisations_realm_name"),
)

memberships = Table(
    "memberships", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False),
    Column("organisation_id", ID, ForeignKey("organisations.id", ondelete="CASCADE"),
           nullable=False),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("roles", JSONType, nullable=False),
    Column("status", String(16), nullable=False),
    Column("failed_attempts", Integer, nullable=False),
    Column("locked_until", UTCDateTime()),
    _created(),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("organisation_id", "user_id", name="uq_memberships_org_user"),
)

sessions = Table(
    "sessions", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("organisation_id", ID, ForeignKey("organisations.id", ondelete="SET NULL")),
    Column("device_id", ID, ForeignKey("devices.id", ondelete="SET NULL"), index=True),
    Column("client_id", String(200)),
    Column("amr", JSONType, nullable=False),
    Column("ip", String(64)),
    Column("user_agent", String(512)),
    _created(),
    Column("last_used_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime()),
    Column("revoked_reason", String(64)),
    Column("scope", String(1000)),
)

refresh_tokens = Table(
    "refresh_tokens", metadata,
    _id(),
    Column("session_id", ID, ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("parent_id", ID),
    _created(),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("rotated_at", UTCDateTime()),
    Column("successor_id", ID),
    Column("successor_enc", LargeBinary),
    # Room on each page for the row's one update (migration 0007).
    postgresql_with={"fillfactor": 60},
)

signing_keys = Table(
    "signing_keys", metadata,
    Column("kid", String(64), primary_key=True),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("alg", String(16), nullable=False),
    Column("public_jwk", JSONType, nullable=False),
    Column("private_enc", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    _created(),
    Column("retired_at", UTCDateTime()),
    Column("publish_until", UTCDateTime()),
)

devices = Table(
    "devices", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("device_key", String(128), nullable=False, unique=True),
    Column("device_group_key", String(128), nullable=False),
    Column("name", String(200)),
    Column("user_agent", String(512)),
    _created(),
    Column("last_seen_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime()),
)

reauth_tokens = Table(
    "reauth_tokens", metadata,
    _id(),
    Column("device_id", ID, ForeignKey("devices.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    _created(),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime()),
    Column("revoked_at", UTCDateTime()),
)

api_keys = Table(
    "api_keys", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("organisation_id", ID, ForeignKey("organisations.id", ondelete="CASCADE")),
    Column("name", String(200), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    _created(),
    Column("last_used_at", UTCDateTime()),
    Column("revoked_at", UTCDateTime()),
)

login_challenges = Table(
    "login_challenges", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("membership_id", ID, ForeignKey("memberships.id", ondelete="CASCADE")),
    Column("data", JSONType, nullable=False),
    Column("pin_hash", String(64)),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("resends", Integer, nullable=False),
    Column("client_ip", String(64)),
    _created(),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("consumed_at", UTCDateTime()),
)

one_time_codes = Table(
    "one_time_codes", metadata,
    _id(),
    Column("realm_id", ID, ForeignKey("realms.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("secret_hash", String(64), nullable=False, unique=True),
    _created(),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("consumed_at", UTCDateTime()),
    Column("attempts", Integer, nullable=False),
    Index("ix_one_time_codes_user_purpose", "user_id", "purpose"),
)

audit_events = Table(
    "audit_events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("realm_id", ID),
    Column("at", UTCDateTime(), nullable=False),
    Column("type", String(64), nullable=False),
    Column("user_id", ID),
    Column("session_id", ID),
    Column("organisation_id", ID),
    Column("ip", String(64)),
    Column("user_agent", String(512)),
    Column("data", JSONType, nullable=False),
    Index("ix_audit_events_realm_at", "realm_id", "at"),
    Index("ix_audit_events_user_at", "user_id", "at"),
)

mail_outbox = Table(
    "mail_outbox", metadata,
    _id(),
    Column("realm_id", ID),
    Column("recipient", String(320), nullable=False),
    Column("subject", String(500), nullable=False),
    Column("body_text", Text, nullable=False),
    Column("template", String(64), nullable=False),
    _created(),
    Column("next_attempt_at", UTCDateTime(), index=True),
    Column("attempts", Integer, nullable=False),
    Column("sent_at", UTCDateTime()),
    Column("last_error", String(500)),
)

throttle_counters = Table(
    "throttle_counters", metadata,
    Column("key", String(400), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_started_at", UTCDateTime(), nullable=False),
    Column("blocked_until", UTCDateTime()),
    # Attempts admitted and still being checked; a crashed check's count lapses at the lease.
    Column("pending", Integer, nullable=False, server_default="0"),
    Column("pending_until", UTCDateTime()),
)
