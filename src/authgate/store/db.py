"""Engines and transactions for SQLite (embedded default) and PostgreSQL (production).

SQLite runs in WAL mode with ``synchronous=FULL`` (every commit is on disk before it returns).
Its statements take microseconds, far less than the thread hop aiosqlite needs for each one, so
transactions run inline on the stdlib ``sqlite3`` driver, without ever waiting for a lock on the
event loop:

- Writers in one process queue on an ``asyncio.Lock``. A write transaction then tries
  ``BEGIN IMMEDIATE`` with no busy wait; if another process holds the write lock, it backs off
  with ``asyncio.sleep`` and tries again. Once the lock is held nothing inside can wait for
  another writer. The commit's fsync, the longest step, runs in a thread (sqlite3 releases the
  GIL), so other requests are served meanwhile; the lock is held until it is done.
- Reads run in autocommit mode (each statement is its own snapshot) on ``query_only``
  connections, so a write attempted in a read transaction fails at once.
- aiosqlite serves only migrations and in-memory databases.

PostgreSQL runs on an asyncpg pool of its own, with SQLAlchemy as the compiler only
(``store/fastexec.py``): reads in autocommit (one round trip per statement, no BEGIN/COMMIT),
writes in a READ COMMITTED transaction. The SQLAlchemy engine serves migrations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

import asyncpg

from authgate.store.fastexec import (
    Prebuilt,
    init_asyncpg_connection,
    run_asyncpg,
    run_sqlite,
    unwrap,
)
from authgate.store.repositories import SqlTx

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_READ_BUSY_TIMEOUT_MS = 2_000
SQLITE_WRITE_LOCK_WAIT_S = 30.0


def _is_memory(url: str) -> bool:
    database = make_url(url).database
    return not database or database == ":memory:"


def _sqlite_pragmas(dbapi_connection: Any, *, read_only: bool,
                    busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    if read_only:
        cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def _take_transaction_control(engine: Engine) -> None:
    """Let us issue BEGIN ourselves: IMMEDIATE for writes, deferred for reads."""

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("authgate_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_write_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, poolclass=StaticPool if _is_memory(url) else None,
                                 connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        _sqlite_pragmas(dbapi_connection, read_only=False)

    _take_transaction_control(engine.sync_engine)
    return engine


def _sqlite_inline_engine(url: str, *, read_only: bool) -> Engine:
    """Stdlib sqlite3 connections used on the event loop's thread. Overflow is unbounded, so a
    checkout never waits; writers never wait for a lock here (busy timeout 0)."""
    sync_url = make_url(url).set(drivername="sqlite")
    busy_ms = SQLITE_READ_BUSY_TIMEOUT_MS if read_only else 0
    engine = create_sync_engine(sync_url, pool_size=8 if read_only else 1, max_overflow=-1,
                                pool_reset_on_return=None if read_only else "rollback",
                                connect_args={"check_same_thread": False,
                                              "timeout": busy_ms / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        _sqlite_pragmas(dbapi_connection, read_only=read_only, busy_timeout_ms=busy_ms)

    if not read_only:
        _take_transaction_control(engine)
    return engine


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        return _sqlite_write_engine(url)
    # No pre-ping (a round trip per checkout); connections are recycled instead.
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size,
                               pool_recycle=1800)


class InlineConnection:
    """A synchronous sqlite3 connection behind the async ``execute`` the repositories call;
    prebuilt statements run on the driver directly (``store/fastexec.py``)."""

    __slots__ = ("_conn", "_raw", "dialect")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._raw = conn.connection.driver_connection
        self.dialect = conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        if isinstance(statement, Prebuilt):
            return run_sqlite(self._raw, self.dialect, statement, parameters)
        return self._conn.execute(statement, parameters)


class PlainConnection:
    """Everything through SQLAlchemy (in-memory SQLite and migrations)."""

    __slots__ = ("_conn", "dialect")

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self.dialect = conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return await self._conn.execute(unwrap(statement), parameters)


class PgConnection:
    """One connection of the asyncpg pool: every statement, prebuilt or not, is compiled by
    SQLAlchemy and run on asyncpg (``store/fastexec.py``)."""

    __slots__ = ("_raw", "dialect")

    def __init__(self, raw: asyncpg.Connection, dialect: Any) -> None:
        self._raw = raw
        self.dialect = dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return await run_asyncpg(self._raw, self.dialect, statement, parameters)


class SqlStore:
    """The core's ``Store``: hands out transactions whose repositories share one connection."""

    def __init__(self, engine: AsyncEngine, *, pool_size: int = 10) -> None:
        self.engine = engine
        self._pool_size = pool_size
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._read_engine: Engine | None = None
        self._write_engine: Engine | None = None
        if self.is_sqlite and not _is_memory(str(engine.url)):
            url = engine.url.render_as_string(hide_password=False)
            self._read_engine = _sqlite_inline_engine(url, read_only=True)
            self._write_engine = _sqlite_inline_engine(url, read_only=False)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._pg_pool: asyncpg.Pool | None = None
        self._pg_pool_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 10) -> SqlStore:
        return cls(create_engine(url, pool_size=2), pool_size=pool_size)

    @asynccontextmanager
    async def transaction(self, *, write: bool = False) -> AsyncIterator[SqlTx]:
        if write and self._write_engine is not None:
            async with self._writing():
                conn = await self._begin_immediate(self._write_engine)
                try:
                    yield SqlTx(InlineConnection(conn))  # type: ignore[arg-type]
                except BaseException:
                    conn.rollback()
                    raise
                else:
                    await asyncio.to_thread(conn.commit)
                finally:
                    conn.close()
            return
        if not self.is_sqlite:
            pool = await self._pool()
            async with pool.acquire() as raw:
                if write:
                    async with raw.transaction():
                        yield SqlTx(PgConnection(raw, self.engine.dialect))  # type: ignore
                else:  # autocommit: one round trip per statement
                    yield SqlTx(PgConnection(raw, self.engine.dialect))  # type: ignore
            return
        if write:
            async with self._writing():
                async with self.engine.connect() as conn:
                    conn = await conn.execution_options(authgate_write=True)
                    async with conn.begin():
                        yield SqlTx(PlainConnection(conn))  # type: ignore[arg-type]
            return
        if self._read_engine is not None:
            with self._read_engine.connect() as sync_conn:
                yield SqlTx(InlineConnection(sync_conn))  # type: ignore[arg-type]
            return
        async with self.engine.connect() as conn:  # in-memory SQLite
            async with conn.begin():
                yield SqlTx(PlainConnection(conn))  # type: ignore[arg-type]

    async def _pool(self) -> asyncpg.Pool:
        """The asyncpg pool (made on first use, on the running event loop)."""
        if self._pg_pool is None:
            async with self._pg_pool_lock:
                if self._pg_pool is None:
                    url = self.engine.url.set(drivername="postgresql")
                    self._pg_pool = await asyncpg.create_pool(
                        url.render_as_string(hide_password=False), min_size=1,
                        max_size=self._pool_size, init=init_asyncpg_connection)
        return self._pg_pool

    @staticmethod
    async def _begin_immediate(engine: Engine) -> Connection:
        """Take SQLite's write lock without blocking the event loop: back off while another
        process holds it."""
        deadline = time.monotonic() + SQLITE_WRITE_LOCK_WAIT_S
        delay = 0.001
        while True:
            conn = engine.connect().execution_options(authgate_write=True)
            try:
                conn.begin()
                return conn
            except OperationalError as exc:
                conn.close()
                if "locked" not in str(exc.orig) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        if self._write_lock is None:
            yield
            return
        async with self._write_lock:
            yield

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def ping(self) -> None:
        if not self.is_sqlite:
            async with (await self._pool()).acquire() as raw:
                await raw.fetchval("SELECT 1")
            return
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        if self._pg_pool is not None:
            await self._pg_pool.close()
        for inline in (self._read_engine, self._write_engine):
            if inline is not None:
                inline.dispose()
        await self.engine.dispose()
