"""Shared fixtures: a real store on SQLite and PostgreSQL, the app in process and on a real
server, and a real SMTP server that collects what Authgate sends.

Every test that uses ``core`` runs once per backend. PostgreSQL tests get a database of their
own, created for the run and dropped after it; if PostgreSQL cannot be reached they fail (never
skip). Each test gets a realm of its own, so tests never see each other's users.
"""

from __future__ import annotations

import asyncio
import email
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email.message import Message
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller

from authgate.api.app import build_core, create_app
from authgate.config import Settings, load_settings
from authgate.core.engine import Core
from authgate.core.models import Realm

PG_ADMIN_DSN = os.environ.get("AUTHGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
MASTER = "q" * 43  # 32 bytes of base64url: a fixed test master secret

FAST_HASHING = {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "argon2_parallelism": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=data_dir, database_url=database_url, master_secret=MASTER,
        issuer="http://authgate.test", **FAST_HASHING)
    values.update(overrides)
    return load_settings(**values)


async def _create_pg_database() -> tuple[str, str]:
    name = f"authgate_t_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required for the store tests and is unreachable at "
                    f"{PG_ADMIN_DSN}: {exc}", pytrace=False)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return name, f"{base}/{name}"


async def _drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def new_database(backend: str, directory: Path) -> AsyncIterator[str]:
    """The URL of an empty database: a SQLite file in ``directory``, or a PostgreSQL database
    of its own, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / 'authgate.db'}"
        return
    name, url = await _create_pg_database()
    try:
        yield url
    finally:
        await _drop_pg_database(name)


@asynccontextmanager
async def core_on_postgres(directory: Path) -> AsyncIterator[tuple[Core, Realm, str]]:
    """A core of its own on a new PostgreSQL database: the core, its default realm, and the
    database's URL (for connections of the test's own)."""
    async with new_database("postgres", directory) as url:
        core = await build_core(test_settings(url, directory))
        try:
            yield core, await core.realms.require("default"), url
        finally:
            await core.close()


@asynccontextmanager
async def holding(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to the database at ``url``, in a transaction that holds
    what the test locks with it until the end, then rolls back."""
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        transaction = connection.transaction()
        await transaction.start()
        try:
            yield connection
        finally:
            await transaction.rollback()
    finally:
        await connection.close()


async def waiting_on_locks(admin: asyncpg.Connection, url: str, count: int) -> list[int]:
    """The backends of the database at ``url`` that wait on a lock, once there are ``count``."""
    database = url.rsplit("/", 1)[1]
    for _ in range(200):
        waiting = [row["pid"] for row in await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
            "AND wait_event_type = 'Lock'", database)]
        if len(waiting) >= count:
            return waiting
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} statements never waited on a lock")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with new_database(request.param, tmp_path_factory.mktemp("sqlite")) as url:
        yield url


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
async def settings(database_url: str, data_dir: Path,
                   smtp_server: tuple[MailBox, int]) -> Settings:
    """Test settings: fast hashing, and mail delivered over SMTP to the test's SMTP server."""
    # Every in-process client comes from 127.0.0.1 and the dialect suites share the default
    # realm, so the per-address limit is raised here; tests/test_throttle.py tests it low.
    return test_settings(database_url, data_dir, mail_backend="smtp",
                         smtp_port=smtp_server[1], mail_poll_seconds=0.1,
                         throttle_ip_free_attempts=100_000,
                         throttle_guest_free_attempts=100_000)


@pytest.fixture(scope="session")
async def core(settings: Settings) -> AsyncIterator[Core]:
    core = await build_core(settings)
    try:
        yield core
    finally:
        await core.close()


@pytest.fixture
async def realm(core: Core) -> Realm:
    """A realm of this test's own."""
    return await core.realms.create(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
async def app(settings: Settings, core: Core) -> Any:
    return create_app(settings, core)


def asgi_client(app: Any, **options: Any) -> httpx.AsyncClient:
    """A client of ``app`` in process, from 127.0.0.1 (``options``: the transport's)."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000), **options)
    return httpx.AsyncClient(transport=transport, base_url="http://authgate.test")


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process (no network): for behaviour that does not depend on a real server."""
    async with asgi_client(app) as c:
        yield c


def recorded_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[list[Any]]:
    """What each call of the async method ``owner.name`` was given (its one argument, as a
    list), the call then made as it is."""
    calls: list[list[Any]] = []
    real = getattr(owner, name)

    async def recording(self: Any, items: Any) -> Any:
        calls.append(list(items))
        return await real(self, items)

    monkeypatch.setattr(owner, name, recording)
    return calls


def realm_url(realm: Realm, path: str) -> str:
    """A native API path inside the test's realm."""
    return f"/realms/{realm.name}{path}"


class LiveServer:
    """Authgate served by uvicorn on 127.0.0.1 in a thread of its own, with its own core and
    event loop, on the same database as the tests."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="session")
def live_server(settings: Settings, core: Core) -> Iterator[LiveServer]:
    """A real server (same settings and database as ``core``)."""
    server = LiveServer(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class MailBox:
    """What a real SMTP server (aiosmtpd) received."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.envelopes: list[Any] = []
        self._event = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.envelopes.append(envelope)
        self.messages.append(email.message_from_bytes(envelope.content))
        self._event.set()
        return "250 Message accepted for delivery"

    async def wait_for(self, to: str, timeout: float = 15.0) -> Message:
        """The newest message to ``to``, waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in reversed(self.messages):
                if to.lower() in (message.get("To") or "").lower():
                    return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"no mail to {to} within {timeout}s; got "
                             f"{[m.get('To') for m in self.messages]}")

    def count_to(self, to: str) -> int:
        return sum(1 for m in self.messages if to.lower() in (m.get("To") or "").lower())

    async def wait_for_count(self, to: str, count: int, timeout: float = 15.0) -> int:
        """How many messages to ``to`` there are once ``count`` have arrived (another
        server's outbox worker, on the same database, may be the one delivering them)."""
        deadline = time.monotonic() + timeout
        while self.count_to(to) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # and no more than that
        return self.count_to(to)


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[tuple[MailBox, int]]:
    """A real SMTP server on 127.0.0.1: (mailbox, port)."""
    box = MailBox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


PASSWORD = "correct horse battery staple"
