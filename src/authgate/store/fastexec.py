"""A thin executor for the repositories' prebuilt statements.

SQLAlchemy builds and compiles every statement here; what this module skips is its per-call
execution machinery, which costs more than the query (about 100 µs a statement on inline sqlite3,
400–600 µs through the asyncpg adapter, against 10–100 µs on the raw drivers). A prebuilt
statement is compiled once per dialect and set of parameter names, into SQL text, the order of
its parameters, and the type processors of its binds and result columns; then it runs straight
on the driver connection of the current transaction. Types behave exactly as under SQLAlchemy
because the same processors run. Integrity errors are re-raised as SQLAlchemy's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError

from authgate.core.ports import StoreUnavailable, UnstorableText, ValueTooLong


class Prebuilt:
    """A statement built once with bound parameters, marked for the thin executor. A ``keyed``
    statement (a bare ``insert(table)``) takes its columns from the names of the parameters."""

    __slots__ = ("statement", "keyed", "_compiled")

    def __init__(self, statement: Any, *, keyed: bool = False) -> None:
        self.statement = statement
        self.keyed = keyed
        self._compiled: dict[tuple[str, tuple[str, ...]], Compiled] = {}

    def compiled(self, dialect: Dialect, names: tuple[str, ...]) -> Compiled:
        key = (dialect.name, names)
        found = self._compiled.get(key)
        if found is None:
            found = self._compiled[key] = Compiled.of(self.statement, dialect, names)
        return found


@dataclass(slots=True)
class Compiled:
    sql: str
    # name, bind processor, and the value of a literal (``column + 1``: a bind SQLAlchemy made)
    binds: list[tuple[str, Callable[[Any], Any] | None, Any]]
    columns: list[tuple[str, Callable[[Any], Any] | None]]
    returns_rows: bool
    # The columns that have a processor, by position: most (text, integers) have none.
    processed: list[tuple[int, Callable[[Any], Any]]] = field(init=False)

    def __post_init__(self) -> None:
        self.processed = [(i, process) for i, (_, process) in enumerate(self.columns)
                          if process is not None]

    @classmethod
    def of(cls, statement: Any, dialect: Dialect, names: tuple[str, ...]) -> Compiled:
        is_dml = statement.is_dml
        compiled = statement.compile(dialect=dialect, column_keys=list(names) if names else None)
        binds = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            impl = bind.type.dialect_impl(dialect)
            binds.append((name, impl.bind_processor(dialect), bind.value))
        returns_rows = not is_dml or bool(compiled.effective_returning)
        return cls(compiled.string, binds, _columns(statement, compiled, dialect), returns_rows)

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        values = []
        for name, process, literal in self.binds:
            value = params.get(name, literal)
            values.append(process(value) if process is not None else value)
        return values

    def row(self, raw: Sequence[Any]) -> Row:
        if not self.columns:  # textual SQL: no declared columns, values as the driver gives
            return Row(list(raw), [(str(i), None) for i in range(len(raw))])
        values = list(raw)
        for i, process in self.processed:
            values[i] = process(values[i])
        return Row(values, self.columns)


def _columns(statement: Any, compiled: Any,
             dialect: Dialect) -> list[tuple[str, Callable[[Any], Any] | None]]:
    """The result columns and their processors: a query's selected columns, a DML statement's
    RETURNING columns."""
    selected = (getattr(statement, "selected_columns", ()) if not statement.is_dml
                else compiled.effective_returning or ())
    return [(column.name, column.type.dialect_impl(dialect).result_processor(dialect, None))
            for column in selected]


class Row:
    """A result row: by position, by slice, or by column name through ``_mapping``."""

    __slots__ = ("_values", "_columns")

    def __init__(self, values: list[Any], columns: list[tuple[str, Any]]) -> None:
        self._values = values
        self._columns = columns

    def __getitem__(self, index: Any) -> Any:
        return self._values[index]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    @property
    def _mapping(self) -> dict[str, Any]:
        return {name: value for (name, _), value in zip(self._columns, self._values)}


class Result:
    """The part of SQLAlchemy's result API the repositories use."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def first(self) -> Row | None:
        return self._rows[0] if self._rows else None

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows)

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise ValueError(f"expected one row, got {len(self._rows)}")
        return self._rows[0][0]


def _names(statement: Prebuilt, params: dict[str, Any] | None) -> tuple[str, ...]:
    return tuple(params) if params and statement.keyed else ()


def _prepared(statement: Any, dialect: Dialect,
              params: dict[str, Any] | None) -> tuple[Compiled, list[Any]]:
    if isinstance(statement, Prebuilt):
        params = params or {}
        compiled = statement.compiled(dialect, _names(statement, params))
        return compiled, compiled.arguments(params)
    return compile_dynamic(statement, dialect, params)


def run_sqlite(connection: sqlite3.Connection, dialect: Dialect, statement: Any,
               params: dict[str, Any] | None) -> Result:
    """Run a prebuilt or a per-call statement on a sqlite3 connection."""
    compiled, arguments = _prepared(statement, dialect, params)
    cursor = connection.cursor()
    try:
        cursor.execute(compiled.sql, arguments)
        rows = [compiled.row(raw) for raw in cursor.fetchall()] if compiled.returns_rows else []
        return Result(rows, cursor.rowcount)
    except sqlite3.IntegrityError as exc:
        raise IntegrityError(compiled.sql, None, exc) from None
    finally:
        cursor.close()


def run_sqlite_many(connection: sqlite3.Connection, dialect: Dialect, statement: Prebuilt,
                    params: Sequence[dict[str, Any]]) -> Result:
    """Run a prebuilt statement once for each set of ``params`` (``executemany``: one prepared
    statement, stepped in C for each set), all with the names of the first. Gives the rows
    changed in all."""
    compiled = statement.compiled(dialect, _names(statement, params[0]))
    cursor = connection.cursor()
    try:
        cursor.executemany(compiled.sql, [compiled.arguments(p) for p in params])
        return Result([], cursor.rowcount)
    except sqlite3.IntegrityError as exc:
        raise IntegrityError(compiled.sql, None, exc) from None
    finally:
        cursor.close()


def compile_dynamic(statement: Any, dialect: Dialect,
                    params: dict[str, Any] | None) -> tuple[Compiled, list[Any]]:
    """A statement built per call (rare paths): compiled now, with its literal values."""
    # Expanding parameters (IN lists) are rendered as one parameter per value.
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    values = compiled.construct_params(params or None)
    binds = []
    for name in compiled.positiontup or ():
        # An expanded IN parameter ("id_1_2") has the type of its base ("id_1").
        bind = compiled.binds.get(name)
        if bind is None:
            bind = compiled.binds[name.rsplit("_", 1)[0]]
        impl = bind.type.dialect_impl(dialect)
        binds.append((name, impl.bind_processor(dialect), None))  # literals are in ``values``
    returns_rows = not statement.is_dml or bool(compiled.effective_returning)
    shape = Compiled(compiled.string, binds, _columns(statement, compiled, dialect),
                     returns_rows)
    return shape, shape.arguments(values)


def unwrap(statement: Any) -> Any:
    """The SQLAlchemy statement, for connections that run everything through SQLAlchemy."""
    return statement.statement if isinstance(statement, Prebuilt) else statement


async def run_asyncpg(connection: asyncpg.Connection, dialect: Dialect, statement: Any,
                      params: dict[str, Any] | None) -> Result:
    """Run a prebuilt or a per-call statement on an asyncpg connection."""
    compiled, arguments = _prepared(statement, dialect, params)
    try:
        if compiled.returns_rows:
            records = await connection.fetch(compiled.sql, *arguments)
            return Result([compiled.row(record) for record in records], len(records))
        status = await connection.execute(compiled.sql, *arguments)
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(compiled.sql, None, exc) from None
    except (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError):
        raise UnstorableText("text with a character the database cannot keep") from None
    except asyncpg.StringDataRightTruncationError:
        raise ValueTooLong("a value longer than the database keeps") from None
    count = status.rsplit(" ", 1)[-1]
    return Result([], int(count) if count.isdigit() else 0)


async def init_asyncpg_connection(connection: asyncpg.Connection) -> None:
    """JSON travels as text: SQLAlchemy's bind processors serialise it, results are decoded
    here (the column types then have no result processor on this dialect)."""
    for name in ("json", "jsonb"):
        await connection.set_type_codec(name, schema="pg_catalog", format="text",
                                        encoder=_json_text, decoder=orjson.loads)


async def keep_session(connection: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (a round trip per transaction): Authgate
    never changes session state (no SET, LISTEN or advisory locks), and asyncpg still rolls
    back any transaction left open before this runs."""


def json_text(value: Any) -> str:
    """JSON columns as text: orjson, and json.dumps for what orjson cannot encode (integers
    beyond 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value)


def _json_text(value: Any) -> str:
    """asyncpg's encoder: SQLAlchemy's bind processors have usually serialised it already."""
    return value if isinstance(value, str) else json_text(value)


# Errors that say the database is unavailable for now (unreachable, the connection lost, out
# of a resource, a transaction rolled back to break a deadlock or a serialisation conflict),
# not that a statement was wrong: the request meeting one is answered 503 and may be retried.
# SQLite: the primary result codes BUSY, LOCKED, IOERR, FULL and CANTOPEN.
_SQLITE_UNAVAILABLE = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR,
                                 sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN})
_PG_UNAVAILABLE = (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError,
                   asyncpg.InsufficientResourcesError, asyncpg.TransactionRollbackError,
                   ConnectionError)


# A connection that was working and ended under a statement (its backend terminated or
# crashed, the socket reset): the database itself may well answer on another.
_PG_LOST = (asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError,
            asyncpg.CrashShutdownError, ConnectionResetError, BrokenPipeError,
            asyncpg.InterfaceError, asyncpg.InternalClientError)


def connection_lost(exc: StoreUnavailable) -> bool:
    """Whether ``exc`` is a lost connection rather than a database that cannot be reached,
    that refuses, or that cancelled a statement past its timeout."""
    return isinstance(exc.__cause__, _PG_LOST)


def is_open(connection: Any) -> bool:
    """Whether an asyncpg pool connection is still open. When the database closes one (a
    restart, an idle timeout, an administrator), asyncpg takes it back into its pool at once
    and detaches it: even asking it whether it is closed then raises."""
    try:
        return not connection.is_closed()
    except asyncpg.InterfaceError:
        return False


def unavailable(exc: BaseException, connection: Any = None) -> StoreUnavailable | None:
    """``exc`` as a ``StoreUnavailable`` when it says the database is unavailable (on
    PostgreSQL, ``connection`` is the one it was met on), else None."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        found = code is not None and code & 0xFF in _SQLITE_UNAVAILABLE
    else:
        found = isinstance(exc, _PG_UNAVAILABLE) or (
            isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError))
            and connection is not None and not is_open(connection)) or (
            # The server's FATAL message read, its closing of the socket not yet: the protocol
            # is left waiting for the end of an operation that will not come.
            isinstance(exc, asyncpg.InternalClientError)
            and "another operation (2)" in str(exc))
    return StoreUnavailable(type(exc).__name__) if found else None

