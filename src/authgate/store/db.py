"""Connections and transactions for SQLite (embedded default) and PostgreSQL (production).

At run time SQLAlchemy is the compiler, not the executor: every statement is compiled by it and
run on the driver directly (``store/fastexec.py``), because its execution machinery costs more
than the queries. The SQLAlchemy engine serves migrations.

SQLite (WAL, ``synchronous=FULL``: every commit is on disk before it returns) runs on stdlib
``sqlite3`` connections on the event loop's thread; its statements take microseconds, and the
loop never waits for a lock:

- Writers in one process queue on an ``asyncio.Lock``, then take ``BEGIN IMMEDIATE`` without a
  busy wait, backing off with ``asyncio.sleep`` while another process holds the lock. Inside,
  nothing can wait for another writer.
- Group commit: writers that queue while one is working share its transaction, each inside a
  savepoint of its own (a writer that fails rolls back only its own changes). The last of them
  commits for all, and none returns before that commit is on disk: one fsync serves many
  writes, with the durability of one commit each. The commit runs in a thread of its own, the
  committer (sqlite3 releases the GIL), so other requests are served meanwhile; its outcome
  comes back to the event loop in one callback, which tells every member and releases the
  write lock. Awaited through asyncio's thread helpers, a task and ``shield``, the outcome had
  taken six or so turns of a busy event loop to reach the members and the next writer: under
  the refresh benchmark a commit of 0.6 ms held the write lock for 3 ms.
- Reads run in autocommit (each statement its own snapshot) on ``query_only`` connections, so a
  write attempted in a read transaction fails at once instead of waiting for a lock.

PostgreSQL runs on an asyncpg pool: reads in autocommit (one round trip per statement), writes
in a READ COMMITTED transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any

import asyncpg
import orjson
from prometheus_client import Histogram
from sqlalchemy import event, text
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from authgate.config import Settings
from authgate.core.models import Rotation, Session, User
from authgate.core.ports import StoreUnavailable
from authgate.store.batch import Batched, Failed
from authgate.store.fastexec import (
    Result,
    connection_lost,
    init_asyncpg_connection,
    json_text,
    is_open,
    keep_session,
    run_asyncpg,
    run_sqlite,
    run_sqlite_many,
    unavailable,
    unwrap,
)
from authgate.store.repositories import SqlTx

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_READ_BUSY_TIMEOUT_MS = 2_000
SQLITE_WRITE_LOCK_WAIT_S = 30.0
SQLITE_IDLE_READERS = 8
# Writers committed together at most: bounds the wait of the first of them.
SQLITE_GROUP_COMMIT_MAX = 32
# A PostgreSQL connection kept between transactions this long unused goes back to the pool.
PG_IDLE_SECONDS = 60.0

GROUP_SIZES = Histogram("authgate_sqlite_group_commit_writes",
                        "Write transactions per SQLite commit (group commit)",
                        buckets=(1, 2, 4, 8, 16, 32))
# Session reads out at once at most: those asked for meanwhile go out together when one comes
# back. Under the userinfo benchmark on PostgreSQL the event loop is the bottleneck and a third
# of the statements carried one read. Userinfo/trivial, alternated with no cap: a first version
# 0.608 against 0.558 (10 rounds, higher in 9); this one 0.573 against 0.569 (8 rounds, higher
# in 4), then 0.601 against 0.524 (6 rounds). One out at most measured lower than no cap,
# three no higher. A modest gain at best on this noisy machine, and no loss seen.
SESSION_READS_IN_FLIGHT = 2
# Refreshes' rotations: one statement out at a time, of at most eight. Sent all together, the
# rotations of a burst of refreshes came back together and were answered together, and the
# event loop had nothing to do while the next burst's statement was in the database (busy 78 %
# of the time under the refresh benchmark). In statements of eight, one out at a time, the
# next statement is in the database while the loop answers the last (store/batch.py).
# Refresh/trivial, this with the plans below, alternated over 6 rounds with the tree before:
# 0.355 against 0.269 (bench/RESULTS.md, session 20).
ROTATION_STATEMENTS_IN_FLIGHT = 1
ROTATIONS_PER_STATEMENT = 8
# On SQLite the rotations asked for meanwhile share one write transaction (one member of the
# group commit), each kind of write made by one statement run for each of them: a rotation's
# four statements, savepoint, lock and wait for the commit had cost the event loop about
# 160 µs, 105 µs this way. One transaction out at a time; two measured lower (0.25 against
# 0.30). Refresh/trivial, alternated over 4 rounds with the tree before (that and the commit's
# one callback, below): 0.299 against 0.237 (bench/RESULTS.md, session 21).
SQLITE_ROTATIONS_PER_TRANSACTION = 32
# Rotations are planned for the parameters and the tables as they are when they run, on
# connections of their own. asyncpg prepares each statement once per connection, and after
# five executions PostgreSQL may keep one generic plan for it, made for the tables as they
# were then: a connection that first rotated tokens while ``refresh_tokens`` was small kept
# updating the rotated tokens by reading the whole table (a sequential scan of 51,766 rows,
# 14 ms a statement instead of 1) until autovacuum next analysed it, which on a new database
# can take minutes. Planning each execution costs PostgreSQL tens of microseconds a statement:
# set on every connection, it cost userinfo/trivial 1.06 -> 0.91 (alternated; the bearer reads
# are written so that any plan reads each row by its key, and a test checks theirs).
ROTATION_PLAN_CACHE_MODE = "force_custom_plan"
_PER_STATEMENT = (1, 2, 4, 8, 16, 32, 64, 100)  # callers of a batch (store/batch.MAX_KEYS)
SESSION_READ_SIZES = Histogram("authgate_session_reads_per_statement",
                               "Bearer requests' session reads answered by one statement",
                               buckets=_PER_STATEMENT)
ROTATION_SIZES = Histogram("authgate_refresh_rotations_per_statement",
                           "Refresh-token rotations carried out by one statement",
                           buckets=_PER_STATEMENT)


def _is_memory(url: str) -> bool:
    database = make_url(url).database
    return not database or database == ":memory:"


def _sqlite_pragmas(connection: Any, *, read_only: bool, busy_timeout_ms: int) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    if read_only:
        cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def create_engine(url: str, *, pool_size: int = 2) -> AsyncEngine:
    """The SQLAlchemy engine: migrations, and in-memory SQLite. Its dialect's type processors
    serve the thin executor too."""
    codecs = {"json_serializer": json_text, "json_deserializer": orjson.loads}
    if not url.startswith("sqlite"):
        return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size,
                                   pool_recycle=1800, **codecs)
    engine = create_async_engine(url, poolclass=StaticPool if _is_memory(url) else None,
                                 connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                                 **codecs)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        _sqlite_pragmas(dbapi_connection, read_only=False, busy_timeout_ms=SQLITE_BUSY_TIMEOUT_MS)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class DriverConnection:
    """What a ``SqlTx``'s repositories execute on: one driver connection."""

    __slots__ = ("_raw", "dialect", "_sqlite")

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self._raw = raw
        self.dialect = dialect
        self._sqlite = isinstance(raw, sqlite3.Connection)

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        """``parameters``: a mapping; on SQLite also a list of mappings, the statement run
        once for each (as SQLAlchemy's ``execute`` takes them)."""
        if self._sqlite:
            if isinstance(parameters, list):
                return run_sqlite_many(self._raw, self.dialect, statement, parameters)
            return run_sqlite(self._raw, self.dialect, statement, parameters)
        if isinstance(parameters, list):  # a round trip each: the rows changed in all
            changed = 0
            for each in parameters:
                changed += (await run_asyncpg(self._raw, self.dialect, statement, each)).rowcount
            return Result([], changed)
        return await run_asyncpg(self._raw, self.dialect, statement, parameters)


class PlainConnection:
    """Everything through SQLAlchemy (in-memory SQLite)."""

    __slots__ = ("_conn", "dialect")

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self.dialect = conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return await self._conn.execute(unwrap(statement), parameters)


class SqliteConnections:
    """One writer and a few idle readers, all used on the event loop's thread, and the
    committer: the thread the writer's commits run in (the write lock keeps the event loop
    off the writer meanwhile)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def committer(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._committer is None:
            self._committer = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="authgate-sqlite-commit")
        return self._committer

    def _open(self, *, read_only: bool) -> sqlite3.Connection:
        busy = SQLITE_READ_BUSY_TIMEOUT_MS if read_only else 0
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                     timeout=busy / 1000)
        _sqlite_pragmas(connection, read_only=read_only, busy_timeout_ms=busy)
        return connection

    @property
    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            self._writer = self._open(read_only=False)
        return self._writer

    def reader(self) -> sqlite3.Connection:
        return self._readers.pop() if self._readers else self._open(read_only=True)

    def release(self, connection: sqlite3.Connection) -> None:
        if connection.in_transaction:
            connection.rollback()
        if len(self._readers) < SQLITE_IDLE_READERS:
            self._readers.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        for connection in [*self._readers, *([self._writer] if self._writer else [])]:
            connection.close()
        self._readers.clear()
        self._writer = None


class _SqliteRead:
    """A read: an idle reader connection, in autocommit, handed back on exit. A class, not a
    generator-based context manager: every bearer request enters one, and the generator
    machinery cost more than the lookup it wraps."""

    __slots__ = ("_connections", "_dialect", "_connection")

    def __init__(self, connections: SqliteConnections, dialect: Dialect) -> None:
        self._connections, self._dialect = connections, dialect

    async def __aenter__(self) -> SqlTx:
        try:
            self._connection = self._connections.reader()
        except sqlite3.OperationalError as exc:
            if (down := unavailable(exc)) is not None:
                raise down from exc
            raise
        return SqlTx(DriverConnection(self._connection, self._dialect))  # type: ignore[arg-type]

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._connections.release(self._connection)
        if exc is not None and (down := unavailable(exc)) is not None and down is not exc:
            raise down from exc


class _PgTransaction:
    """A PostgreSQL write transaction, or a read whose statements run in autocommit (one round
    trip each), on a kept or pooled connection (``SqlStore._pg_acquire``). A class, not a
    generator-based context manager, for the reason ``_SqliteRead`` is one; asyncpg's own
    ``Transaction`` decides commit or rollback."""

    __slots__ = ("_store", "_write", "_raw", "_transaction")

    def __init__(self, store: SqlStore, write: bool) -> None:
        self._store, self._write = store, write

    def _acquire(self) -> Awaitable[Any]:
        return self._store._pg_acquire()

    def _give(self, raw: Any, clean: bool) -> Awaitable[None]:
        return self._store._pg_give(raw, clean)

    async def __aenter__(self) -> SqlTx:
        raw = self._raw = await self._acquire()
        if self._write:
            transaction = self._transaction = raw.transaction()
            try:
                await transaction.__aenter__()
            except BaseException as exc:
                down = unavailable(exc, raw)
                await self._give(raw, False)
                if down is not None:
                    raise down from exc
                raise
        return SqlTx(DriverConnection(raw, self._store.dialect))  # type: ignore[arg-type]

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        clean = False
        down = unavailable(exc, self._raw) if exc is not None else None
        try:
            if self._write:
                await self._transaction.__aexit__(exc_type, exc, traceback)
            clean = exc_type is None
        except Exception as failed:  # the COMMIT or ROLLBACK
            if (down := unavailable(failed, self._raw)) is not None:
                raise down from failed
            raise
        finally:
            await self._give(self._raw, clean)
        if down is not None and down is not exc:
            raise down from exc


class _PgRotation(_PgTransaction):
    """Rotations' statements, in autocommit, on the rotations' own connection: planned for
    the tables as they are (``ROTATION_PLAN_CACHE_MODE``)."""

    __slots__ = ()

    def __init__(self, store: SqlStore) -> None:
        super().__init__(store, write=False)

    def _acquire(self) -> Awaitable[Any]:
        return self._store._connect(self._store._rotation_pool)

    def _give(self, raw: Any, clean: bool) -> Awaitable[None]:
        return self._store._pg_hand_back(raw, self._store._pg_rotation_pool)


class _IdleConnections:
    """Connections taken from the asyncpg pool and kept between transactions, most recently
    used first. asyncpg's own hand-out and hand-back cost about 60 µs and three turns of the
    event loop (a shielded task, a timeout); taking a kept connection costs a list operation.
    Only a connection whose transaction ended cleanly is kept (an error or a cancellation
    hands it back to asyncpg, which resets or closes it); one left unused for
    ``PG_IDLE_SECONDS`` goes back to asyncpg, which closes what stays idle."""

    __slots__ = ("_kept", "_limit")

    def __init__(self, limit: int) -> None:
        self._kept: list[tuple[float, Any]] = []
        self._limit = limit

    def take(self) -> Any | None:
        """The most recently kept connection, open or not (``is_open`` tells)."""
        return self._kept.pop()[1] if self._kept else None

    def keep(self, connection: Any) -> bool:
        """Keep ``connection``, whose transaction ended cleanly (so none is open on it), unless
        enough are kept; False: the caller hands it back."""
        if len(self._kept) >= self._limit:
            return False
        self._kept.append((time.monotonic(), connection))
        return True

    def any_stale(self) -> bool:
        """Whether the longest-kept connection has been unused too long."""
        return bool(self._kept) and self._kept[0][0] < time.monotonic() - PG_IDLE_SECONDS

    def stale(self) -> Any | None:
        """The longest-kept connection, if it has been unused too long."""
        return self._kept.pop(0)[1] if self.any_stale() else None

    def drain(self) -> list[Any]:
        kept, self._kept = [connection for _, connection in self._kept], []
        return kept

    def __len__(self) -> int:
        return len(self._kept)


class _Group:
    """Write transactions that share one SQLite transaction and one commit."""

    __slots__ = ("_over", "_waiters", "cause", "error", "lost", "size")

    def __init__(self) -> None:
        self.size = 0  # writers that joined
        self.lost = False  # a failure rolled back the whole transaction
        self.cause: BaseException | None = None  # that failure
        self.error: BaseException | None = None
        self._over = False
        self._waiters: list[asyncio.Future[None]] = []

    def over(self, error: BaseException | None) -> None:
        """The commit is over (``error``: it failed): every member waiting is told at once."""
        self.error, self._over = error, True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def durable(self) -> None:
        """Wait until the group's commit is on disk; raise if it failed. A member cancelled
        meanwhile stops waiting; the commit and the other members go on."""
        if not self._over:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self.error is not None:
            cause = self.error.__cause__ or self.error
            if (down := unavailable(cause)) is not None:
                raise down from self.error
            raise sqlite3.OperationalError(f"the write was not committed: {self.error}")


def _undo_savepoint(connection: sqlite3.Connection, group: _Group) -> None:
    """Roll back one writer's changes. If SQLite already rolled back the whole transaction
    (some errors do), the writes of the whole group are lost with it."""
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK TO tx")
            connection.execute("RELEASE tx")
            return
        except sqlite3.Error:
            pass
    group.lost = True


def _setting_default(name: str) -> Any:
    """A setting's default, for a store made without settings (tests, tools): config.py
    says what it is, once."""
    return Settings.model_fields[name].default


class SqlStore:
    """The core's ``Store``: hands out transactions whose repositories share one connection."""

    def __init__(self, engine: AsyncEngine, *,
                 pool_size: int = _setting_default("db_pool_size"),
                 statement_timeout: float = _setting_default("db_statement_timeout"),
                 idle_transaction_timeout: float = _setting_default(
                     "db_idle_transaction_timeout")) -> None:
        self.engine = engine
        # PostgreSQL session settings of every connection: no request waits on the database
        # for ever, and no stopped client holds its locks for ever.
        self._pg_settings = {
            "statement_timeout": str(max(1, round(statement_timeout * 1000))),
            "idle_in_transaction_session_timeout":
                str(max(1, round(idle_transaction_timeout * 1000))),
        }
        self.dialect = engine.dialect
        self.is_sqlite = engine.dialect.name == "sqlite"
        self.round_trips = not self.is_sqlite
        self._pool_size = pool_size
        self._sqlite: SqliteConnections | None = None
        if self.is_sqlite and not _is_memory(str(engine.url)):
            self._sqlite = SqliteConnections(str(make_url(str(engine.url)).database))
        self._write_lock = asyncio.Lock()
        self._writers_waiting = 0
        self._group: _Group | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._pg_pool: asyncpg.Pool | None = None
        # The rotations' own connections (ROTATION_PLAN_CACHE_MODE), one statement out at once.
        self._pg_rotation_pool: asyncpg.Pool | None = None
        self._pg_idle = _IdleConnections(pool_size)
        self._pg_waiting = 0
        self._pg_closing = False
        self._pg_sweep: asyncio.TimerHandle | None = None
        self._pg_pool_lock = asyncio.Lock()
        # Bearer requests' session reads, sent together, two statements out at most.
        self._session_reads: Batched[str, tuple[Session, User]] = Batched(
            self._sessions_with_users, in_flight=SESSION_READS_IN_FLIGHT)
        # Refreshes' rotations, sent together, one statement (SQLite: transaction) out at a time.
        self._rotations: Batched[Rotation, tuple[Session, User]] = Batched(
            self._rotate_many,
            limit=SQLITE_ROTATIONS_PER_TRANSACTION if self.is_sqlite else ROTATIONS_PER_STATEMENT,
            in_flight=ROTATION_STATEMENTS_IN_FLIGHT)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SqlStore:
        """``options``: ``__init__``'s keywords."""
        return cls(create_engine(url), **options)

    def transaction(self, *, write: bool = False,
                    single: bool = False) -> AbstractAsyncContextManager[SqlTx]:
        """``single``: the body makes one repository call, atomic by itself; PostgreSQL runs it
        in autocommit (no BEGIN and COMMIT round trips). The backend's own context manager is
        returned, not wrapped: every request enters one."""
        if self._sqlite is not None:
            return self._sqlite_write() if write else self._sqlite_read()
        if not self.is_sqlite:
            return _PgTransaction(self, write and not single)
        return self._plain_transaction(write)

    # SQLite.

    @asynccontextmanager
    async def _sqlite_write(self) -> AsyncIterator[SqlTx]:
        """A write transaction: a savepoint in the current group's transaction, durable when
        the context exits without error."""
        assert self._sqlite is not None
        try:
            connection = self._sqlite.writer
            group = await self._join_group(connection)  # holds the write lock from here
            try:
                connection.execute("SAVEPOINT tx")
                try:
                    tx = SqlTx(DriverConnection(connection, self.dialect))  # type: ignore[arg-type]
                    yield tx
                    connection.execute("RELEASE tx")
                except BaseException as exc:
                    _undo_savepoint(connection, group)
                    if group.lost and group.cause is None:
                        group.cause = exc.__cause__ or exc
                    raise
            finally:
                self._leave_group(connection, group)
            await group.durable()
        except sqlite3.OperationalError as exc:  # locked past the wait, disk full, I/O error
            if (down := unavailable(exc)) is not None:
                raise down from exc
            raise

    async def _join_group(self, connection: sqlite3.Connection) -> _Group:
        self._writers_waiting += 1
        try:
            await self._write_lock.acquire()
        except asyncio.CancelledError:
            self._writers_waiting -= 1
            self._commit_if_orphaned()
            raise
        self._writers_waiting -= 1
        try:
            if self._group is None:
                await self._begin_immediate(connection)
                self._group = _Group()
        except BaseException:
            self._write_lock.release()
            self._commit_if_orphaned()
            raise
        self._group.size += 1
        return self._group

    def _leave_group(self, connection: sqlite3.Connection, group: _Group) -> None:
        """Hand the open transaction to the next queued writer, or commit it (roll it back, if
        lost). The commit runs in the committer's thread, the write lock held until it is
        over; ``_committed`` then tells the members and releases the lock, in one callback on
        the event loop."""
        if self._writers_waiting and not group.lost and group.size < SQLITE_GROUP_COMMIT_MAX:
            self._write_lock.release()
            return
        self._group = None
        if group.lost:
            lost = sqlite3.OperationalError("the transaction was rolled back by an error in a "
                                            "write committed with it")
            lost.__cause__ = group.cause
            self._end_group(connection, group, lost)
            return
        assert self._sqlite is not None
        loop = asyncio.get_running_loop()
        try:
            commit = self._sqlite.committer.submit(connection.commit)
        except RuntimeError as exc:  # the store is closing
            self._end_group(connection, group, exc)
            return

        def committed(commit: concurrent.futures.Future[None]) -> None:  # the committer's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(self._committed, connection, group, commit)

        commit.add_done_callback(committed)

    def _committed(self, connection: sqlite3.Connection, group: _Group,
                   commit: concurrent.futures.Future[None]) -> None:
        error = commit.exception()
        if error is None:
            GROUP_SIZES.observe(group.size)
        self._end_group(connection, group, error)

    def _end_group(self, connection: sqlite3.Connection, group: _Group,
                   error: BaseException | None) -> None:
        """Tell the members the outcome and release the write lock; a failed commit is rolled
        back first, so that the next writer starts afresh."""
        try:
            if error is not None and connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.rollback()
        finally:
            group.over(error)
            self._write_lock.release()

    def _commit_if_orphaned(self) -> None:
        """A queued writer was cancelled: if the open group was waiting for it, commit the
        group from a task of its own (an empty write joins it and commits it)."""
        if self._group is not None and not self._writers_waiting and \
                not self._write_lock.locked():
            task = asyncio.get_running_loop().create_task(self._close_group())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _close_group(self) -> None:
        async with self._sqlite_write():
            pass

    @staticmethod
    async def _begin_immediate(connection: sqlite3.Connection) -> None:
        """Take SQLite's write lock without blocking the event loop: back off while another
        process holds it."""
        deadline = time.monotonic() + SQLITE_WRITE_LOCK_WAIT_S
        delay = 0.001
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _sqlite_read(self) -> _SqliteRead:
        assert self._sqlite is not None
        return _SqliteRead(self._sqlite, self.dialect)

    @asynccontextmanager
    async def _plain_transaction(self, write: bool) -> AsyncIterator[SqlTx]:
        async with self._write_lock if write else _nothing():
            async with self.engine.connect() as conn:
                async with conn.begin():
                    yield SqlTx(PlainConnection(conn))  # type: ignore[arg-type]

    # PostgreSQL.

    async def _pg_acquire(self) -> Any:
        """A kept connection, else one from asyncpg's pool (counted as waiting meanwhile)."""
        while (raw := self._pg_idle.take()) is not None:
            if is_open(raw):
                return raw
            await self._pg_hand_back(raw)  # asyncpg's cleanup, where it has not run yet
        self._pg_waiting += 1
        try:
            return await self._connect(self._pool)
        finally:
            self._pg_waiting -= 1

    @staticmethod
    async def _connect(pool: Callable[[], Awaitable[asyncpg.Pool]]) -> Any:
        """A connection from ``pool()``; StoreUnavailable when none could be made (refused,
        timed out, refused by the server)."""
        try:
            return await (await pool()).acquire()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    async def _pg_give(self, raw: Any, clean: bool) -> None:
        """Keep a connection whose transaction ended cleanly, else hand it back to asyncpg."""
        # While another transaction waits on asyncpg, a connection kept here would starve it.
        if not (clean and not self._pg_waiting and not self._pg_closing
                and self._pg_idle.keep(raw)):
            await self._pg_hand_back(raw)
        if self._pg_idle.any_stale():
            await self._release_stale()
        self._arm_sweep()

    async def _pg_hand_back(self, raw: Any, pool: asyncpg.Pool | None = None) -> None:
        """Give ``raw`` back to the pool it came from (``pool``, else the main one)."""
        pool = pool if pool is not None else self._pg_pool
        assert pool is not None  # it handed out every connection there is
        try:
            await pool.release(raw)
        except Exception:  # noqa: BLE001 - a failed reset: asyncpg terminated it already
            pass

    async def _release_stale(self) -> None:
        """Hand back what was kept unused too long."""
        while (stale := self._pg_idle.stale()) is not None:
            await self._pg_hand_back(stale)

    def _arm_sweep(self) -> None:
        """While anything is kept, a timer comes back to it: with no traffic, no transaction
        ends to hand back what was kept too long."""
        if self._pg_idle and self._pg_sweep is None and not self._pg_closing:
            self._pg_sweep = asyncio.get_running_loop().call_later(PG_IDLE_SECONDS, self._sweep)

    def _sweep(self) -> None:
        self._pg_sweep = None
        task = asyncio.get_running_loop().create_task(self._swept())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _swept(self) -> None:
        await self._release_stale()
        self._arm_sweep()

    async def _pool(self) -> asyncpg.Pool:
        """The asyncpg pool, made on first use on the running event loop."""
        if self._pg_pool is None:
            async with self._pg_pool_lock:
                if self._pg_pool is None:
                    self._pg_pool = await self._new_pool(self._pool_size, self._pg_settings)
        return self._pg_pool

    async def _rotation_pool(self) -> asyncpg.Pool:
        """The rotations' pool: a connection for each statement out at once, planning each
        execution (ROTATION_PLAN_CACHE_MODE)."""
        if self._pg_rotation_pool is None:
            async with self._pg_pool_lock:
                if self._pg_rotation_pool is None:
                    self._pg_rotation_pool = await self._new_pool(
                        ROTATION_STATEMENTS_IN_FLIGHT,
                        {**self._pg_settings, "plan_cache_mode": ROTATION_PLAN_CACHE_MODE})
        return self._pg_rotation_pool

    async def _new_pool(self, size: int, settings: dict[str, str]) -> asyncpg.Pool:
        url = self.engine.url.set(drivername="postgresql")
        return await asyncpg.create_pool(
            url.render_as_string(hide_password=False), min_size=1, max_size=size,
            init=init_asyncpg_connection, reset=keep_session, server_settings=settings)

    def _rotating(self) -> AbstractAsyncContextManager[SqlTx]:
        """``transaction(write=True, single=True)`` for the rotations' statements: on
        PostgreSQL on the rotations' own connection."""
        if self.round_trips:
            return _PgRotation(self)
        return self.transaction(write=True, single=True)

    # Both.

    async def session_with_user(self, session_id: str) -> tuple[Session, User] | None:
        """A session and its user, as every bearer request reads them: with the other such
        reads of the same turn of the event loop, in one statement (``store/batch``)."""
        return await self._session_reads.get(session_id)

    async def _sessions_with_users(self, session_ids: list[str]
                                   ) -> list[tuple[Session, User] | None]:
        """One read for up to ``MAX_KEYS`` callers. A read whose connection was lost (its
        backend terminated, the socket reset) is sent once more, on another connection: it
        changes nothing, and every caller in it would otherwise fail with the one connection."""
        SESSION_READ_SIZES.observe(len(session_ids))
        try:
            async with self.transaction() as tx:
                return await tx.sessions.many_with_user(session_ids)
        except StoreUnavailable as exc:
            if not connection_lost(exc):
                raise
        async with self.transaction() as tx:
            return await tx.sessions.many_with_user(session_ids)

    async def rotate_live(self, rotation: Rotation) -> tuple[Session, User] | None:
        """A refresh's rotation, with the other rotations asked for in the same turn of the
        event loop (``store/batch``): on PostgreSQL in one statement; on SQLite in one write
        transaction of the group commit, each kind of write by one statement run for each."""
        if self.round_trips or self._sqlite is not None:
            return await self._rotations.get(rotation)
        async with self.transaction(write=True, single=True) as tx:
            return await tx.refresh_tokens.rotate_live(rotation)

    async def _rotate_many(self, rotations: list[Rotation]
                           ) -> list[tuple[Session, User] | Failed | None]:
        """One statement (SQLite: one transaction) for a batch of rotations: all of them or,
        when it fails, none. A lost connection fails every caller (nothing is sent again: the
        statement may have been carried out, and a client that tries again finds its token
        rotated, within the grace window). A statement refused for its values (one caller's
        text the database cannot keep, say) changed nothing either: each rotation is then
        sent alone, so that only the caller it belongs to fails; if the database becomes
        unavailable meanwhile, the rotations already made keep their answers."""
        ROTATION_SIZES.observe(len(rotations))
        try:
            async with self._rotating() as tx:
                return list(await tx.refresh_tokens.rotate_live_many(rotations))
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - each alone; a failure of its own goes to its caller
            if len(rotations) == 1:
                raise
        answers: list[tuple[Session, User] | Failed | None] = []
        for at, rotation in enumerate(rotations):
            try:
                async with self._rotating() as tx:
                    answers.append(await tx.refresh_tokens.rotate_live(rotation))
            except StoreUnavailable as exc:  # those rotated keep their answers
                return answers + [Failed(exc)] * (len(rotations) - at)
            except Exception as exc:  # noqa: BLE001 - this caller's own failure
                answers.append(Failed(exc))
        return answers

    async def ping(self) -> None:
        async with self.transaction() as tx:
            await tx.conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        self._pg_closing = True
        if self._pg_sweep is not None:
            self._pg_sweep.cancel()
        await self._session_reads.close()
        await self._rotations.close()
        if self._pg_pool is not None:
            for connection in self._pg_idle.drain():
                await self._pg_hand_back(connection)
            await self._pg_pool.close()
        if self._pg_rotation_pool is not None:
            await self._pg_rotation_pool.close()
        if self._sqlite is not None:
            async with self._write_lock:  # a commit under way is over first
                pass
            self._sqlite.close()
        await self.engine.dispose()


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield
