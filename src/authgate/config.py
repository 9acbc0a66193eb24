"""Authgate's settings, in one place.

Every setting is read from an ``AUTHGATE_<NAME>`` environment variable or from the TOML file
named by ``AUTHGATE_CONFIG`` (environment wins). Settings are typed and validated once at start;
a bad one stops the server with a message naming it.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "AUTHGATE_"
DIALECTS = ("tiledesk", "descope", "deskera", "webapi", "classroom")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        env_nested_delimiter=None,
    )

    # Where and how to serve.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    issuer: str = ""
    data_dir: Path = Path("data")
    database_url: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    trusted_proxies: list[str] = Field(default_factory=list)
    # PostgreSQL: a statement running or waiting on a lock longer than this is cancelled (the
    # request is answered 503 and may be retried), and a transaction left idle this long
    # (a node stopped mid-transaction) is ended, releasing its locks. Seconds.
    db_statement_timeout: float = Field(15.0, gt=0, le=3600)
    db_idle_transaction_timeout: float = Field(60.0, gt=0, le=86_400)
    # PostgreSQL: connections this process opens at most (each is a backend process).
    db_pool_size: int = Field(10, ge=1, le=1000)

    # The master secret protects private keys and secrets at rest.
    master_secret: SecretStr | None = None

    # Token and session lifetimes, in seconds.
    access_token_ttl: int = Field(900, ge=30, le=86_400)
    id_token_ttl: int = Field(3600, ge=30, le=86_400)
    refresh_token_ttl: int = Field(30 * 86_400, ge=60, le=365 * 86_400)
    session_ttl: int = Field(90 * 86_400, ge=60, le=3 * 365 * 86_400)
    refresh_grace_seconds: int = Field(10, ge=0, le=120)
    reauth_token_ttl: int = Field(30 * 86_400, ge=60, le=365 * 86_400)
    signing_alg: Literal["EdDSA", "ES256", "RS256"] = "ES256"
    key_cache_seconds: float = Field(5.0, ge=0, le=300)

    # Password policy and hashing (OWASP's Argon2id row: m=19 MiB, t=2, p=1).
    password_min_length: int = Field(8, ge=6, le=128)
    password_max_length: int = Field(256, ge=16, le=4096)
    password_reject_common: bool = True
    argon2_memory_kib: int = Field(19_456, ge=8, le=4 * 1024 * 1024)
    argon2_time_cost: int = Field(2, ge=1, le=20)
    argon2_parallelism: int = Field(1, ge=1, le=16)
    hash_workers: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1, le=256)

    # Throttling: per (realm, login id) and per client address.
    throttle_free_attempts: int = Field(5, ge=1, le=1000)
    throttle_ip_free_attempts: int = Field(50, ge=1, le=100_000)
    # Anonymous guests a client address may create per window before back-off.
    throttle_guest_free_attempts: int = Field(30, ge=1, le=100_000)
    throttle_base_delay: float = Field(1.0, gt=0, le=3600)
    throttle_max_delay: float = Field(900.0, gt=0, le=86_400)
    throttle_window: int = Field(3600, ge=1, le=86_400 * 7)

    # Housekeeping: ended sessions, expired codes and challenges, sent mail and stale throttle
    # counters are deleted this many days after they stop mattering. Audit events are kept.
    retention_days: int = Field(30, ge=1, le=3650)
    housekeeping_interval: int = Field(600, ge=10, le=86_400)

    # Mail.
    mail_backend: Literal["log", "smtp"] = "log"
    mail_from: str = "Authgate <no-reply@localhost>"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_username: str = ""
    smtp_password: SecretStr | None = None
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout: float = Field(10.0, gt=0, le=300)
    mail_max_attempts: int = Field(8, ge=1, le=100)
    mail_poll_seconds: float = Field(1.0, gt=0, le=3600)
    public_url: str = ""

    # Surfaces.
    dialects: list[str] = Field(default_factory=lambda: list(DIALECTS))
    dialects_at_root: list[str] = Field(default_factory=list)
    # The realm each dialect without a realm-naming credential serves (Descope's project id and
    # the web API's APIKey name their realm themselves).
    tiledesk_realm: str = "default"
    # Lifetime of the tokens the Tiledesk dialect issues (Tiledesk's own never expire; its
    # clients have no refresh, so these live a working day by default).
    tiledesk_token_ttl: int = Field(86_400, ge=60, le=30 * 86_400)
    deskera_token_ttl: int = Field(3600, ge=60, le=86_400)
    deskera_realm: str = "default"
    classroom_realm: str = "default"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get(ENV_PREFIX + "CONFIG")
        if toml_path:
            # A file named but absent would otherwise be read as empty: every setting in it
            # silently replaced by a default (another database, a new master secret).
            if not Path(toml_path).is_file():
                raise OSError(f"{ENV_PREFIX}CONFIG names {toml_path!r}, which is not a "
                              "readable file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @field_validator("dialects", "dialects_at_root")
    @classmethod
    def _known_dialects(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(DIALECTS))
        if unknown:
            raise ValueError(f"unknown dialect(s) {unknown}; known: {list(DIALECTS)}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value

    @field_validator("issuer", "public_url")
    @classmethod
    def _url_without_slash(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def listen_url(self) -> str:
        """The URL the server listens on, an IPv6 address in brackets (RFC 3986)."""
        try:
            bracketed = ipaddress.ip_address(self.host).version == 6
        except ValueError:  # a host name
            bracketed = False
        host = f"[{self.host}]" if bracketed else self.host
        return f"http://{host}:{self.port}"

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.issuer:
            self.issuer = self.listen_url
        if not self.public_url:
            self.public_url = self.issuer
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'authgate.db'}"
        if not set(self.dialects_at_root) <= set(self.dialects):
            raise ValueError(f"{ENV_PREFIX}DIALECTS_AT_ROOT must name dialects that are also "
                             f"in {ENV_PREFIX}DIALECTS")
        if self.throttle_max_delay < self.throttle_base_delay:
            raise ValueError(f"{ENV_PREFIX}THROTTLE_MAX_DELAY must be at least "
                             f"{ENV_PREFIX}THROTTLE_BASE_DELAY")
        return self

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings, raising ConfigError that names each bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            label = f"{ENV_PREFIX}{name.upper()}" if error["loc"] else "settings"
            problems.append(f"{label}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed TOML file
        raise ConfigError(f"invalid configuration file: {exc}") from None


MASTER_KEY_FILE = "master.key"


def load_master_secret(settings: Settings) -> bytes:
    """Return the master secret, creating it (mode 0600) under the data directory if absent.

    The secret is never logged. A secret given in the environment must decode to 32+ bytes.
    """
    if settings.master_secret is not None:
        return load_master_secret_text(
            settings.master_secret.get_secret_value(), f"{ENV_PREFIX}MASTER_SECRET"
        )
    path = settings.data_dir / MASTER_KEY_FILE
    if not path.exists():
        _create_master_secret(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path}: the master secret file must not be readable by others "
                          f"(mode {oct(mode)}); run chmod 600 on it")
    return load_master_secret_text(path.read_text().strip(), str(path))


def _create_master_secret(path: Path) -> None:
    """Write a new secret whole, then link it into place: of several processes starting at
    once (server workers), one secret wins and every process reads that one, never a file
    still being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
                         .rstrip("=") + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process won
    finally:
        draft.unlink(missing_ok=True)


def load_master_secret_text(text: str, where: str) -> bytes:
    try:
        secret = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        secret = b""
    if len(secret) < 32:
        raise ConfigError(f"{where}: the master secret must be at least 32 bytes, base64url")
    return secret
