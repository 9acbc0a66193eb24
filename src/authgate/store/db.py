"""Engines and transactions for SQLite (embedded default) and PostgreSQL (production).

SQLite runs in WAL mode with ``synchronous=FULL`` and a busy timeout. Write transactions start
with ``BEGIN IMMEDIATE`` so that two writers queue for the lock instead of failing when one
upgrades a read snapshot; read transactions stay deferred and never block writers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from authgate.store.repositories import SqlTx

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, poolclass=_sqlite_pool_class(url),
                                 connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN is ours to issue.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("authgate_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _sqlite_pool_class(url: str) -> Any:
    # An in-memory database lives only as long as its one connection.
    if ":memory:" in url or url.rstrip("/").endswith("sqlite+aiosqlite:"):
        from sqlalchemy.pool import StaticPool

        return StaticPool
    return None


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size,
                               pool_pre_ping=True)


class SqlStore:
    """The core's ``Store``: hands out transactions whose repositories share one connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SqlStore:
        return cls(create_engine(url, **kwargs))

    @asynccontextmanager
    async def transaction(self, *, write: bool = False) -> AsyncIterator[SqlTx]:
        async with self.engine.connect() as conn:
            if write:
                conn = await conn.execution_options(authgate_write=True)
            async with conn.begin():
                yield SqlTx(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()


