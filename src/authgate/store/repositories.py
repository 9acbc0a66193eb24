"""SQL implementations of the core's repository interfaces (see ``core/ports.py``).

Each repository wraps the one connection of its transaction. Rows map to the core's dataclasses
by column name, so a table and its record stay in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    LargeBinary,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    column,
    delete,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from authgate.core import models as m
from authgate.core.models import normalise_login_id
from authgate.core.ports import Conflict, StaleUser, Tx
from authgate.store import tables as t
from authgate.store.fastexec import Prebuilt, json_text

R = TypeVar("R")


def _record(cls: type[R], row: Any) -> R:
    return cls(**dict(row._mapping))


def _loader(table: Table, cls: type[R]) -> Any:
    """A function from a row of ``table``'s columns, in table order, to a ``cls``: by position
    (the fields need not be in column order), cheaper than by keyword."""
    names = [c.name for c in table.c]
    order = [names.index(f.name) for f in fields(cls)]  # type: ignore[arg-type]
    if sorted(order) != list(range(len(names))):
        raise TypeError(f"{cls.__name__} does not match the columns of {table.name}")
    return lambda values: cls(*[values[i] for i in order])


_FIELD_NAMES: dict[tuple[type[Any], tuple[str, ...]], tuple[str, ...]] = {}


def _one_or_all(rows: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    """A statement's parameters for ``rows``: one row alone as a mapping, so that it runs as a
    plain execute on every connection (SQLAlchemy's included), several as a list."""
    return rows[0] if len(rows) == 1 else rows


def _values(obj: Any, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """A record's fields by name, but ``skip``: the names are worked out once per class."""
    key = (type(obj), tuple(skip))
    names = _FIELD_NAMES.get(key)
    if names is None:
        names = _FIELD_NAMES[key] = tuple(f.name for f in fields(obj) if f.name not in skip)
    return {name: getattr(obj, name) for name in names}


# Statements of a fixed shape are built once, with bound parameters, and reused: building a
# statement and its cache key costs more than executing it.
_STATEMENTS: dict[tuple[Any, ...], Prebuilt] = {}


def _statement(key: tuple[Any, ...], build: Any, *, keyed: bool = False) -> Prebuilt:
    """The statement of this shape, built once; the thin executor runs it (store/fastexec)."""
    statement = _STATEMENTS.get(key)
    if statement is None:
        statement = _STATEMENTS[key] = Prebuilt(build(), keyed=keyed)
    return statement


def _listed(name: str, postgres: bool) -> Any:
    """The list parameter ``name`` as a table of (``n``, ``value``), ``n`` each value's
    position from 0, one row per value (a value listed twice is two rows): ``unnest`` of a
    text array on PostgreSQL, ``json_each`` of a JSON array on SQLite."""
    if postgres:
        rows = func.unnest(bindparam(name, type_=ARRAY(Text))).table_valued(
            "value", with_ordinality="ordinality").render_derived()
        return select((rows.c.ordinality - literal_column("1")).label("n"),
                      rows.c.value).subquery()
    rows = func.json_each(bindparam(name, type_=Text)).table_valued("key", "value")
    return select(rows.c.key.label("n"), rows.c.value).subquery()


def _session_with_user() -> Any:
    """The session whose id is the parameter ``id``, and its user (one row or none)."""
    return (select(t.sessions, t.users).join(t.users, t.users.c.id == t.sessions.c.user_id)
            .where(t.sessions.c.id == bindparam("id")))


def _sessions_with_users(postgres: bool) -> Any:
    """(position in the ``ids`` list parameter, the session's columns, its user's columns)
    for each listed id that is a session's, each row read by its key."""
    ids = _listed("ids", postgres)
    if not postgres:  # SQLite looks each up by its key, json_each the outer loop
        return (select(ids.c.n, t.sessions, t.users)
                .select_from(ids.join(t.sessions, t.sessions.c.id == ids.c.value)
                             .join(t.users, t.users.c.id == t.sessions.c.user_id)))
    # Each session, then its user, by its key: LATERAL subqueries the planner may not merge
    # (OFFSET 0). Left to its estimates, on tables not yet analysed, PostgreSQL planned this
    # join (and an = ANY) from the users, reading every session of each.
    session = select(t.sessions).where(t.sessions.c.id == ids.c.value).offset(0).lateral("s")
    user = select(t.users).where(t.users.c.id == session.c.user_id).offset(0).lateral("u")
    return select(ids.c.n, session, user).select_from(ids.join(session, true()).join(user, true()))


def _order(table: Table, order_by: str | None) -> Any:
    if order_by is None:
        return None
    column = table.c[order_by.lstrip("-")]
    return column.desc() if order_by.startswith("-") else column


def _select_eq(table: Table, columns: tuple[str, ...], order_by: str | None = None,
               for_update: bool = False) -> Any:
    def build() -> Any:
        query = select(table).where(*(table.c[c] == bindparam(f"w_{c}") for c in columns))
        if order_by is not None:
            query = query.order_by(_order(table, order_by))
        return query.with_for_update() if for_update else query

    return _statement(("select", table.name, columns, order_by, for_update), build)


def _params(eq: dict[str, Any], prefix: str = "w_") -> dict[str, Any]:
    return {prefix + key: value for key, value in eq.items()}


class _Repo:
    table: Table
    record: type[Any]

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def _insert(self, obj: Any, *, skip: Sequence[str] = ()) -> None:
        await self._insert_rows(_values(obj, skip=skip))

    async def _insert_many(self, objs: Sequence[Any], *, skip: Sequence[str] = ()) -> None:
        """Several records of one class, by one statement run for each (SQLite's
        ``executemany``)."""
        if objs:
            await self._insert_rows(_one_or_all([_values(obj, skip=skip) for obj in objs]))

    async def _insert_rows(self, rows: dict[str, Any] | list[dict[str, Any]]) -> None:
        statement = _statement(("insert", self.table.name), lambda: insert(self.table),
                               keyed=True)
        try:
            await self.conn.execute(statement, rows)
        except IntegrityError as exc:
            raise Conflict(str(exc.orig)) from None

    async def _get(self, *, lock: bool = False, **eq: Any) -> Any:
        """The one row whose columns equal ``eq``, as a record (or None)."""
        statement = _select_eq(self.table, tuple(eq), for_update=lock)
        row = (await self.conn.execute(statement, _params(eq))).first()
        return _record(self.record, row) if row is not None else None

    async def _all(self, order_by: str | None = None, **eq: Any) -> list[Any]:
        """Every row whose columns equal ``eq``; ``order_by`` names a column, '-' for desc."""
        statement = _select_eq(self.table, tuple(eq), order_by)
        return [_record(self.record, row)
                for row in await self.conn.execute(statement, _params(eq))]

    async def _cas(self, key: str, value: Any, *, unset: tuple[str, ...] = (),
                   **values: Any) -> int:
        """Compare-and-set: update the row whose ``key`` is ``value`` only while the ``unset``
        columns are still NULL. Returns the rows changed (0 or 1)."""
        return await self._cas_many(key, [(value, values)], unset=unset)

    async def _cas_many(self, key: str, changes: Sequence[tuple[Any, dict[str, Any]]], *,
                        unset: tuple[str, ...] = ()) -> int:
        """``_cas`` for each (key value, values) of ``changes``, all setting the same columns:
        one statement, run for each on SQLite (``executemany``). Returns the rows changed."""
        if not changes:
            return 0
        names = tuple(changes[0][1])

        def build() -> Any:
            c = self.table.c
            return (update(self.table)
                    .where(c[key] == bindparam("w_key"), *(c[u].is_(None) for u in unset))
                    .values({name: bindparam(f"v_{name}") for name in names}))

        statement = _statement(("cas", self.table.name, key, unset, names), build)
        result = await self.conn.execute(statement, _one_or_all(
            [{"w_key": value, **_params(values, "v_")} for value, values in changes]))
        return result.rowcount

    async def _one(self, *where: Any) -> Any:
        row = (await self.conn.execute(select(self.table).where(*where))).first()
        return _record(self.record, row) if row is not None else None

    async def _many(self, *where: Any, order_by: Any = None, limit: int | None = None,
                    offset: int = 0) -> list[Any]:
        query = select(self.table).where(*where)
        if order_by is not None:
            query = query.order_by(order_by)
        if limit is not None:
            query = query.limit(limit).offset(offset)
        return [_record(self.record, row) for row in await self.conn.execute(query)]

    async def _update(self, obj: Any, key: str = "id", *, skip: Sequence[str] = ()) -> None:
        await self._cas(key, getattr(obj, key), **_values(obj, skip=(key, *skip)))

    async def _set(self, where: Any, **values: Any) -> int:
        result = await self.conn.execute(update(self.table).where(where).values(**values))
        return result.rowcount


class RealmRepo(_Repo):
    table, record = t.realms, m.Realm

    async def add(self, realm: m.Realm) -> None:
        await self._insert(realm)

    async def get(self, realm_id: str) -> m.Realm | None:
        return await self._get(id=realm_id)

    async def lock(self, realm_id: str) -> m.Realm | None:
        """The realm, its row locked until the end of the write transaction (PostgreSQL: FOR
        NO KEY UPDATE, which the foreign-key checks of sign-ins do not wait for; SQLite's write
        transaction is exclusive): changes to a realm's keys or settings made under it happen
        one after the other."""
        statement = _statement(("realm_lock",), lambda: select(t.realms).where(
            t.realms.c.id == bindparam("w_id")).with_for_update(key_share=True))
        row = (await self.conn.execute(statement, {"w_id": realm_id})).first()
        return _record(m.Realm, row) if row is not None else None

    async def by_name(self, name: str) -> m.Realm | None:
        return await self._get(name=name)

    async def by_project_id(self, project_id: str) -> m.Realm | None:
        return await self._get(project_id=project_id)

    async def list(self) -> list[m.Realm]:
        return await self._all("created_at")

    async def update_settings(self, realm_id: str, settings: dict[str, Any]) -> None:
        await self._set(t.realms.c.id == realm_id, settings=settings)


# Written only by their own methods, never by ``UserRepo.update`` from a possibly stale copy.
_USER_OWN_WRITES = ("status", "security_stamp", "last_sign_in_at")


def _touch_signing_in() -> Any:
    """Set the last sign-in (``s_created_at``) of the user of a session being opened
    (``s_user_id``) while it is active and still has the security stamp its sign-in read
    (``stamp``): the guard of ``SessionRepo.open``, whose row lock orders it against a new
    stamp."""
    u = t.users.c
    return (update(t.users)
            .where(u.id == bindparam("s_user_id"), u.status == bindparam("active"),
                   u.security_stamp == bindparam("stamp"))
            .values(last_sign_in_at=bindparam("s_created_at")))


class UserRepo(_Repo):
    table, record = t.users, m.User

    async def add(self, user: m.User) -> None:
        await self._insert(user)
        await self._write_login_ids(user)

    async def _write_login_ids(self, user: m.User) -> None:
        await self.conn.execute(delete(t.login_ids).where(t.login_ids.c.user_id == user.id))
        rows = {}
        for kind in ("email", "username", "phone"):
            value = getattr(user, kind)
            if value:
                rows.setdefault(normalise_login_id(value), kind)
        for value, kind in rows.items():
            try:
                await self.conn.execute(insert(t.login_ids).values(
                    realm_id=user.realm_id, value=value, kind=kind, user_id=user.id))
            except IntegrityError:
                raise Conflict(f"login id taken: {kind}") from None

    async def get(self, user_id: str) -> m.User | None:
        return await self._get(id=user_id)

    async def by_login_id(self, realm_id: str, login_id: str) -> m.User | None:
        query = _statement(("users_by_login_id",), lambda: (
            select(t.users)
            .join(t.login_ids, t.login_ids.c.user_id == t.users.c.id)
            .where(t.login_ids.c.realm_id == bindparam("realm_id"),
                   t.login_ids.c.value == bindparam("value"))))
        row = (await self.conn.execute(query, {"realm_id": realm_id,
                                               "value": normalise_login_id(login_id)})).first()
        return _record(m.User, row) if row is not None else None

    async def for_sign_in(self, realm_id: str,
                          login_id: str) -> tuple[m.User, list[m.Credential]] | None:
        query = _statement(("users_for_sign_in",), lambda: (
            select(t.users, t.credentials).select_from(_signing_in())
            .where(_named_by_login_id()).order_by(t.credentials.c.created_at)))
        rows = list(await self.conn.execute(query, _sign_in_params(realm_id, login_id)))
        return _user_and_credentials(rows)

    async def for_sign_in_and_counters(
            self, realm_id: str, login_id: str, keys: Sequence[str],
    ) -> tuple[tuple[m.User, list[m.Credential]] | None, list[m.ThrottleState | None]]:
        """``for_sign_in`` and ``ThrottleRepo.read_many(keys)`` at once. PostgreSQL: one
        statement (a round trip less), the user's rows joined to one row that always exists,
        each counter joined to every row. Elsewhere the two reads, one after the other."""
        if self.conn.dialect.name != "postgresql":
            return (await self.for_sign_in(realm_id, login_id),
                    await ThrottleRepo(self.conn).read_many(keys))
        rows = list(await self.conn.execute(
            _statement(("users_for_sign_in_and_counters", len(keys)),
                       lambda: _for_sign_in_and_counters(len(keys))),
            {**_sign_in_params(realm_id, login_id),
             **{f"k{i}": key for i, key in enumerate(keys)}}))
        counters, at = len(t.throttle_counters.c), len(t.users.c) + len(t.credentials.c)
        first = rows[0]  # the joined row exists whatever the login id
        states = [_COUNTER(first[i:i + counters]) if first[i] is not None else None
                  for i in range(at, at + len(keys) * counters, counters)]
        return _user_and_credentials(rows), states

    async def by_external_id(self, realm_id: str, external_id: str) -> m.User | None:
        return await self._get(realm_id=realm_id, external_id=external_id)

    async def update(self, user: m.User) -> None:
        await self._update(user, skip=_USER_OWN_WRITES)
        await self._write_login_ids(user)

    async def set_status(self, user_id: str, status: str, at: datetime) -> str:
        stamp = m.new_security_stamp()
        await self._cas("id", user_id, status=status, updated_at=at, security_stamp=stamp)
        return stamp

    async def new_stamp(self, user_id: str) -> str:
        stamp = m.new_security_stamp()
        await self._cas("id", user_id, security_stamp=stamp)
        return stamp

    async def touch_sign_in(self, user_id: str, at: datetime, stamp: str) -> bool:
        """Set the last sign-in while the user is active with this stamp; False if not."""
        statement = _statement(("touch_sign_in",), _touch_signing_in)
        result = await self.conn.execute(statement, {
            "s_user_id": user_id, "s_created_at": at, "stamp": stamp, "active": "active"})
        return result.rowcount == 1

    async def list(self, realm_id: str, *, limit: int = 100, offset: int = 0) -> list[m.User]:
        return await self._many(t.users.c.realm_id == realm_id, order_by=t.users.c.created_at,
                                limit=limit, offset=offset)

    async def count(self, realm_id: str) -> int:
        query = select(func.count()).select_from(t.users).where(t.users.c.realm_id == realm_id)
        return int((await self.conn.execute(query)).scalar_one())


class CredentialRepo(_Repo):
    table, record = t.credentials, m.Credential

    async def add(self, credential: m.Credential) -> None:
        await self._insert(credential)

    async def for_user(self, user_id: str, kind: str) -> list[m.Credential]:
        return await self._all("created_at", user_id=user_id, kind=kind)

    async def update(self, credential: m.Credential) -> None:
        await self._update(credential)

    async def delete(self, credential_id: str) -> None:
        await self.conn.execute(delete(t.credentials).where(t.credentials.c.id == credential_id))

    async def delete_for_user(self, user_id: str, kind: str) -> int:
        result = await self.conn.execute(delete(t.credentials).where(
            t.credentials.c.user_id == user_id, t.credentials.c.kind == kind))
        return result.rowcount

    async def mark_used(self, credential_id: str, at: datetime) -> bool:
        c = t.credentials.c
        return await self._set(and_(c.id == credential_id,
                                    or_(c.last_used_at.is_(None), c.last_used_at < at)),
                               last_used_at=at) == 1


class OrganisationRepo(_Repo):
    table, record = t.organisations, m.Organisation

    async def add(self, org: m.Organisation) -> None:
        await self._insert(org)

    async def get(self, org_id: str) -> m.Organisation | None:
        return await self._get(id=org_id)

    async def by_name(self, realm_id: str, name: str) -> m.Organisation | None:
        return await self._get(realm_id=realm_id, name=name)

    async def list(self, realm_id: str) -> list[m.Organisation]:
        return await self._all("created_at", realm_id=realm_id)

    async def update(self, org: m.Organisation) -> None:
        await self._update(org)


class MembershipRepo(_Repo):
    table, record = t.memberships, m.Membership

    async def add_if_absent(self, membership: m.Membership) -> bool:
        """Insert unless the user is already a member (then False): on PostgreSQL a membership
        being made by another transaction is waited for, not a unique-key error."""
        dialect = self.conn.dialect.name
        values = _values(membership)

        def build() -> Any:
            upsert = pg_insert if dialect == "postgresql" else sqlite_insert
            return (upsert(t.memberships)
                    .values({name: bindparam(name, type_=t.memberships.c[name].type)
                             for name in values})
                    .on_conflict_do_nothing(index_elements=["organisation_id", "user_id"])
                    .returning(t.memberships.c.id))

        statement = _statement(("membership_add_if_absent", dialect, tuple(values)), build)
        return (await self.conn.execute(statement, values)).first() is not None

    async def get(self, membership_id: str) -> m.Membership | None:
        return await self._get(id=membership_id)

    async def find(self, organisation_id: str, user_id: str) -> m.Membership | None:
        return await self._get(organisation_id=organisation_id, user_id=user_id)

    async def for_user(self, user_id: str) -> list[m.Membership]:
        return await self._all("created_at", user_id=user_id)

    async def for_organisation(self, organisation_id: str) -> list[m.Membership]:
        return await self._all("created_at", organisation_id=organisation_id)

    async def update(self, membership: m.Membership) -> None:
        await self._update(membership)

    async def record_failure(self, membership_id: str, lock_after: int | None,
                             locked_until: datetime) -> m.Membership | None:
        """Count one failure atomically; lock when the count reaches ``lock_after``. Prebuilt:
        it runs on every wrong password of an identity with organisations."""
        c = t.memberships.c
        counted = _statement(("membership_failure",), lambda: update(t.memberships).where(
            c.id == bindparam("id")).values(failed_attempts=c.failed_attempts + 1))
        await self.conn.execute(counted, {"id": membership_id})
        if lock_after is not None:
            locked = _statement(("membership_lock",), lambda: update(t.memberships).where(
                c.id == bindparam("id"), c.failed_attempts >= bindparam("lock_after"),
                c.locked_until.is_(None)).values(
                    locked_until=bindparam("locked_until", type_=c.locked_until.type)))
            await self.conn.execute(locked, {"id": membership_id, "lock_after": lock_after,
                                             "locked_until": locked_until})
        return await self.get(membership_id)


class SessionRepo(_Repo):
    table, record = t.sessions, m.Session

    async def add(self, session: m.Session) -> None:
        await self._insert(session)

    async def open(self, session: m.Session, token: m.RefreshToken, event: m.AuditEvent,
                   stamp: str, settlement: m.Settlement | None = None) -> None:
        """PostgreSQL: one statement (each write a data-modifying CTE that proceeds only from
        the guarded update of the user row), so one round trip in autocommit; the row lock of
        that update orders it against a new stamp. Elsewhere: the guarded update first, then
        the writes, in the caller's write transaction (SQLite's writes are serialised).
        ``settlement`` is marked written once the statement or the transaction's writes ran
        (the caller's commit still decides)."""
        if self.conn.dialect.name != "postgresql":
            if not await UserRepo(self.conn).touch_sign_in(session.user_id, session.created_at,
                                                           stamp):
                raise StaleUser(session.user_id)
            await self.add(session)
            await RefreshTokenRepo(self.conn).add(token)
            await AuditRepo(self.conn).add(event)
            if settlement is not None:
                await ThrottleRepo(self.conn).settle(settlement)
                settlement.written = True
            return
        params = {**_params(_values(session), "s_"), **_params(_values(token), "r_"),
                  **_params(_values(event, skip=("id",)), "e_"),
                  "stamp": stamp, "active": "active"}
        keys: list[str] = []
        if settlement is not None:
            keys = _settled_keys(settlement)
            params.update(_settle_params(settlement, keys))
        try:
            opened = await self.conn.execute(
                _statement(("open_session", len(keys)), lambda: _open_session_cte(len(keys))),
                params)
        except IntegrityError as exc:
            raise Conflict(str(exc.orig)) from None
        if opened.first() is None:
            raise StaleUser(session.user_id)
        if settlement is not None:
            settlement.written = True

    async def get(self, session_id: str) -> m.Session | None:
        return await self._get(id=session_id)

    async def for_user(self, user_id: str, *, live_at: datetime | None = None) -> list[m.Session]:
        c = t.sessions.c
        where = [c.user_id == user_id]
        if live_at is not None:
            where += [c.revoked_at.is_(None), c.expires_at > live_at]
        return await self._many(*where, order_by=c.created_at.desc())

    async def touch_many(self, touches: Sequence[tuple[str, datetime]]) -> None:
        """Record each (session id, when) of ``touches`` as its session's last use, by one
        statement."""
        await self._cas_many("id", [(session_id, {"last_used_at": at})
                                    for session_id, at in touches])

    async def get_with_user(self, session_id: str) -> tuple[m.Session, m.User] | None:
        """A session and its user in one query."""
        query = _statement(("session_with_user",), _session_with_user)
        row = (await self.conn.execute(query, {"id": session_id})).first()
        return _session_and_user(row) if row is not None else None

    async def many_with_user(self, session_ids: list[str]
                             ) -> list[tuple[m.Session, m.User] | None]:
        """Each id's session and its user (None if it has none), in order, in one statement
        whatever the number of ids: they travel as one list parameter (``_listed``). An id
        listed twice is read twice, so each answer is objects of its own. An id no session
        can have (longer than an id, a NUL, not ASCII: a lone surrogate would fail the whole
        statement) is left out before it.

        One id alone is read by ``get_with_user``'s statement: PostgreSQL plans the list's
        statement again for each execution while it is given a few ids (its plan for any list
        assumes ten), ~90 µs of planning that one read would pay alone."""
        answers: list[tuple[m.Session, m.User] | None] = [None] * len(session_ids)
        asked = [(at, i) for at, i in enumerate(session_ids)
                 if len(i) <= t.ID_LENGTH and "\x00" not in i and i.isascii()]
        if not asked:
            return answers
        if len(asked) == 1:
            at, session_id = asked[0]
            answers[at] = await self.get_with_user(session_id)
            return answers
        postgres = self.conn.dialect.name == "postgresql"
        query = _statement(("sessions_with_users", postgres),
                           lambda: _sessions_with_users(postgres))
        ids = [i for _, i in asked]
        for row in await self.conn.execute(query, {"ids": ids if postgres else json_text(ids)}):
            answers[asked[row[0]][0]] = _session_and_user(row[1:])
        return answers

    async def set_organisation(self, session_id: str, organisation_id: str | None) -> None:
        await self._set(t.sessions.c.id == session_id, organisation_id=organisation_id)

    async def add_amr(self, session_id: str, amr: list[str]) -> None:
        session = await self.get(session_id)
        if session is not None:
            merged = list(dict.fromkeys([*session.amr, *amr]))
            await self._set(t.sessions.c.id == session_id, amr=merged)

    async def revoke(self, session_id: str, at: datetime, reason: str) -> bool:
        return await self._cas("id", session_id, unset=("revoked_at",), revoked_at=at,
                               revoked_reason=reason) > 0

    async def _revoke_where(self, where: Any, at: datetime, reason: str) -> list[str]:
        c = t.sessions.c
        live = and_(where, c.revoked_at.is_(None))
        ids = [row[0] for row in await self.conn.execute(select(c.id).where(live))]
        if ids:
            await self._set(c.id.in_(ids), revoked_at=at, revoked_reason=reason)
        return ids

    async def revoke_for_user(self, user_id: str, at: datetime, reason: str,
                              *, except_session_id: str | None = None) -> list[str]:
        c = t.sessions.c
        where = c.user_id == user_id
        if except_session_id is not None:
            where = and_(where, c.id != except_session_id)
        return await self._revoke_where(where, at, reason)

    async def revoke_for_device(self, device_id: str, at: datetime, reason: str) -> list[str]:
        return await self._revoke_where(t.sessions.c.device_id == device_id, at, reason)


class RefreshTokenRepo(_Repo):
    table, record = t.refresh_tokens, m.RefreshToken

    async def add(self, token: m.RefreshToken) -> None:
        await self._insert(token)

    async def by_hash(self, token_hash: str, *, lock: bool = False) -> m.RefreshToken | None:
        """``lock`` holds the row until commit (PostgreSQL: FOR UPDATE; SQLite's writer lock,
        taken by BEGIN IMMEDIATE, already serialises)."""
        return await self._get(lock=lock, token_hash=token_hash)

    async def get(self, token_id: str) -> m.RefreshToken | None:
        return await self._get(id=token_id)

    async def mark_rotated(self, token_id: str, at: datetime, successor_id: str,
                           successor_enc: bytes) -> bool:
        return await self.mark_rotated_many([(token_id, at, successor_id, successor_enc)]) == 1

    async def mark_rotated_many(self, marks: Sequence[tuple[str, datetime, str, bytes]]) -> int:
        """``mark_rotated`` each (token id, when, successor id, sealed successor) of ``marks``,
        by one statement; the tokens marked (those that were not rotated yet)."""
        return await self._cas_many("id", [
            (token_id, {"rotated_at": at, "successor_id": successor_id,
                        "successor_enc": successor_enc})
            for token_id, at, successor_id, successor_enc in marks], unset=("rotated_at",))

    async def rotate_live(self, rotation: m.Rotation) -> tuple[m.Session, m.User] | None:
        """PostgreSQL: one statement (a guarded UPDATE and the writes that follow it as
        data-modifying CTEs), so one round trip in autocommit. Elsewhere: one guarded read,
        then the writes, inside the caller's write transaction."""
        if self.conn.dialect.name == "postgresql":
            params = {**_rotation_values(rotation), "user_status": "active"}
            statement = _statement(("rotate_live", "postgresql"), _rotate_live_cte)
            row = (await self.conn.execute(statement, params)).first()
            return _session_and_user(row[1:]) if row is not None else None
        return (await self._rotate_in_transaction([rotation]))[0]

    async def _rotate_in_transaction(self, rotations: Sequence[m.Rotation]
                                     ) -> list[tuple[m.Session, m.User] | None]:
        """Rotations of distinct tokens inside the caller's write transaction (SQLite): each
        token read by the guarded read, then each kind of write made for all the live ones by
        one statement run for each (``executemany``), which costs the event loop a fraction of
        a statement apiece."""
        read = _statement(("rotate_live", "read"), lambda: (
            select(t.refresh_tokens.c.id, t.sessions, t.users)
            .select_from(t.refresh_tokens).where(_live_token())))
        answers: list[tuple[m.Session, m.User] | None] = []
        successors: list[m.RefreshToken] = []
        rotated: list[tuple[str, datetime, str, bytes]] = []
        touched: list[tuple[str, datetime]] = []
        events: list[m.AuditEvent] = []
        for r in rotations:
            row = (await self.conn.execute(read, {
                "token_hash": r.token_hash, "realm_id": r.realm_id, "client_id": r.client_id,
                "now": r.now, "user_status": "active"})).first()
            if row is None:
                answers.append(None)
                continue
            token_id, (session, user) = row[0], _session_and_user(row[1:])
            successors.append(m.RefreshToken(
                id=r.successor_id, session_id=session.id, token_hash=r.successor_hash,
                created_at=r.now, expires_at=min(r.successor_expires_at, session.expires_at),
                parent_id=token_id))
            rotated.append((token_id, r.now, r.successor_id, r.successor_enc))
            if session.last_used_at < r.touch_before:
                touched.append((session.id, r.now))
            r.event.user_id, r.event.session_id = user.id, session.id
            events.append(r.event)
            answers.append((session, user))
        await self._insert_many(successors)
        if await self.mark_rotated_many(rotated) != len(rotated):
            raise Conflict("refresh token rotated concurrently")  # the write lock prevents it
        await SessionRepo(self.conn).touch_many(touched)
        await AuditRepo(self.conn).add_many(events)
        return answers

    async def rotate_live_many(self, rotations: Sequence[m.Rotation]
                               ) -> list[tuple[m.Session, m.User] | None]:
        """PostgreSQL, for several: one statement whatever their number, the rotations'
        values travelling as one list parameter each (``_rotations``). They are sent in the
        order of their tokens' hashes, the order in which the statement locks the tokens, so
        two such statements never wait for each other in a cycle; one alone goes by
        ``rotate_live``. Elsewhere (SQLite): all of them in the caller's transaction, each
        kind of write by one statement run for each (``_rotate_in_transaction``)."""
        answers: list[tuple[m.Session, m.User] | None] = [None] * len(rotations)
        first: dict[str, int] = {}  # a token's first rotation; the others find it rotated
        for at, rotation in enumerate(rotations):
            first.setdefault(rotation.token_hash, at)
        if self.conn.dialect.name != "postgresql":
            firsts = sorted(first.values())
            rotated = await self._rotate_in_transaction([rotations[at] for at in firsts])
            for at, answer in zip(firsts, rotated):
                answers[at] = answer
            return answers
        if len(first) == 1:
            for at in first.values():
                answers[at] = await self.rotate_live(rotations[at])
            return answers
        sent = sorted(first.values(), key=lambda at: rotations[at].token_hash)
        params: dict[str, Any] = {name: [] for name, _ in _ROTATION_VALUES}
        for at in sent:
            values = _rotation_values(rotations[at])
            values["data"] = json_text(values["data"])  # a list of JSON texts, cast in SQL
            for name, _ in _ROTATION_VALUES:
                params[name].append(values[name])
        params["user_status"] = "active"
        statement = _statement(("rotate_live", "many"), _rotations)
        for row in await self.conn.execute(statement, params):
            answers[sent[row[0] - 1]] = _session_and_user(row[1:])
        return answers


def _rotation_values(r: m.Rotation) -> dict[str, Any]:
    """A rotation's values, by the names both rotation statements bind them to (one value
    each in ``_rotate_live_cte``, one list each in ``_rotations``)."""
    event = r.event
    return {"token_hash": r.token_hash, "realm_id": r.realm_id, "client_id": r.client_id,
            "now": r.now, "touch_before": r.touch_before, "successor_id": r.successor_id,
            "successor_hash": r.successor_hash, "successor_expires_at": r.successor_expires_at,
            "successor_enc": r.successor_enc, "event_type": event.type,
            "organisation_id": event.organisation_id, "ip": event.ip,
            "user_agent": event.user_agent, "data": event.data}


def _live_token(rt: Any = t.refresh_tokens.c, s: Any = t.sessions.c,
                u: Any = t.users.c, asked: Any = None) -> Any:
    """The refresh token named by ``token_hash`` is live: not rotated, not expired, its session
    in ``realm_id`` neither revoked nor expired and issued to ``client_id`` (when both name
    one), its user active. ``rt``, ``s`` and ``u``: the columns the rows are read from;
    ``asked``: the columns ``token_hash``, ``realm_id``, ``client_id`` and ``now`` are read
    from (a list of rotations), else they are bound parameters."""
    if asked is None:
        asked = {"now": bindparam("now", type_=t.UTCDateTime()),
                 "client_id": bindparam("client_id", type_=s.client_id.type),
                 "token_hash": bindparam("token_hash"), "realm_id": bindparam("realm_id")}
    now = asked["now"]
    # client_id NULL: coalesce makes the comparison true.
    same_client = or_(s.client_id.is_(None),
                      s.client_id == func.coalesce(asked["client_id"], s.client_id))
    return and_(rt.token_hash == asked["token_hash"], rt.rotated_at.is_(None),
                rt.expires_at > now, s.id == rt.session_id, s.realm_id == asked["realm_id"],
                s.revoked_at.is_(None), s.expires_at > now, same_client, u.id == s.user_id,
                u.status == bindparam("user_status"))


def _by_key(table: Table, key: Any, name: str) -> Any:
    """The row of ``table`` whose primary key is ``key`` (a column of a row read before), as
    a LATERAL subquery that the planner may not merge into the join (OFFSET 0): it is read by
    its key, whatever the planner estimates."""
    return select(table).where(table.c.id == key).offset(0).lateral(name)


def _rotate_live_cte() -> Any:
    """``RefreshTokenRepo.rotate_live`` as one PostgreSQL statement. Every part runs on the
    same snapshot; the guarded UPDATE locks the token row, so of two concurrent rotations of
    one token the second finds it rotated and changes nothing.

    The token is found by its hash, then its session and user by their keys (``_by_key``): left
    to its estimates (small tables, or none analysed yet), the planner had started from the
    realm's active users and looked the token up once for each of their sessions, or read
    the session's whole chain of rotated tokens: work growing with a user's sessions."""
    rt, s, u, a = t.refresh_tokens, t.sessions, t.users, t.audit_events

    def param(name: str, column: Any) -> Any:
        return bindparam(name, type_=column.type)

    now = param("now", rt.c.created_at)
    found = rt.alias("found")
    session = _by_key(s, found.c.session_id, "found_session")
    user = _by_key(u, session.c.user_id, "found_user")
    live = (select(found.c.id.label("token_id"),
                   *(session.c[c.name].label(f"s_{c.name}") for c in s.c),
                   *(user.c[c.name].label(f"u_{c.name}") for c in u.c))
            .select_from(found.join(session, true()).join(user, true()))
            .where(_live_token(found.c, session.c, user.c))
            .cte("live").prefix_with("MATERIALIZED"))
    rotated = (
        # By its hash again: the unique index finds the row (the planner, estimating, had
        # scanned every unrotated token to join them to ``live``).
        update(rt).where(rt.c.token_hash == bindparam("token_hash"), rt.c.id == live.c.token_id,
                         rt.c.rotated_at.is_(None))
        .values(rotated_at=now, successor_id=bindparam("successor_id"),
                successor_enc=bindparam("successor_enc"))
        .returning(*live.c)
        .cte("rotated"))
    successor = insert(rt).from_select(
        ["id", "session_id", "token_hash", "parent_id", "created_at", "expires_at"],
        select(param("successor_id", rt.c.id), rotated.c.s_id,
               param("successor_hash", rt.c.token_hash), rotated.c.token_id, now,
               func.least(param("successor_expires_at", rt.c.expires_at),
                          rotated.c.s_expires_at, type_=rt.c.expires_at.type)),
    ).cte("successor")
    touched = (update(s).where(s.c.id == rotated.c.s_id,
                               s.c.last_used_at < param("touch_before", s.c.last_used_at))
               .values(last_used_at=now).cte("touched"))
    audited = insert(a).from_select(
        ["realm_id", "at", "type", "user_id", "session_id", "organisation_id", "ip",
         "user_agent", "data"],
        select(param("realm_id", a.c.realm_id), now, param("event_type", a.c.type),
               rotated.c.u_id, rotated.c.s_id, param("organisation_id", a.c.organisation_id),
               param("ip", a.c.ip), param("user_agent", a.c.user_agent),
               param("data", a.c.data)),
    ).cte("audited")
    return select(*rotated.c).add_cte(successor, touched, audited)


# A list of rotations as ``RefreshTokenRepo.rotate_live_many`` sends it: one list parameter
# of each name, the n-th rotation the n-th value of each (the event's JSON data as text).
_ROTATION_VALUES = (
    ("token_hash", Text()), ("realm_id", Text()), ("client_id", Text()),
    ("now", t.UTCDateTime()), ("touch_before", t.UTCDateTime()), ("successor_id", Text()),
    ("successor_hash", Text()), ("successor_expires_at", t.UTCDateTime()),
    ("successor_enc", LargeBinary()), ("event_type", Text()), ("organisation_id", Text()),
    ("ip", Text()), ("user_agent", Text()), ("data", Text()))


def _rotations() -> Any:
    """``_rotate_live_cte`` for a list of rotations, in one PostgreSQL statement: each row of
    the list (``asked``, numbered ``n`` from 1) rotates its token as the one-token statement
    does, and the statement returns ``n`` and the session and user of each rotated token.

    Each token is locked as it is found, in the list's order (FOR UPDATE, then checked live):
    two statements listing the same tokens lock them in the same order (the repository sends
    them ordered by hash), and a token another statement rotated meanwhile is found rotated.
    Then the token, its session and its user are each read by their keys (``_by_key``)."""
    rt, s, u, a = t.refresh_tokens, t.sessions, t.users, t.audit_events
    lists = {name: bindparam(name, type_=ARRAY(type_)) for name, type_ in _ROTATION_VALUES}
    asked = func.unnest(*lists.values()).table_valued(
        *(column(name, type_) for name, type_ in _ROTATION_VALUES),
        with_ordinality="n").render_derived()
    found = (select(rt).where(rt.c.token_hash == asked.c.token_hash).offset(0)
             .with_for_update().lateral("found"))
    session = _by_key(s, found.c.session_id, "found_session")
    user = _by_key(u, session.c.user_id, "found_user")
    live = (select(asked.c.n, found.c.id.label("token_id"),
                   *(asked.c[name] for name, _ in _ROTATION_VALUES),
                   *(session.c[c.name].label(f"s_{c.name}") for c in s.c),
                   *(user.c[c.name].label(f"u_{c.name}") for c in u.c))
            .select_from(asked.join(found, true()).join(session, true()).join(user, true()))
            .where(_live_token(found.c, session.c, user.c, asked.c))
            .cte("live").prefix_with("MATERIALIZED"))
    # The tokens are also named by their hashes, a condition on the table's own index: left
    # to its estimate of ``live`` (one row), the planner had read a small table whole and
    # ``live`` once for each of its rows, until autovacuum analysed it.
    rotated = (
        update(rt).where(rt.c.id == live.c.token_id, rt.c.rotated_at.is_(None),
                         rt.c.token_hash == any_(lists["token_hash"]))
        .values(rotated_at=live.c.now, successor_id=live.c.successor_id,
                successor_enc=live.c.successor_enc)
        .returning(*live.c)
        .cte("rotated"))
    successor = insert(rt).from_select(
        ["id", "session_id", "token_hash", "parent_id", "created_at", "expires_at"],
        select(rotated.c.successor_id, rotated.c.s_id, rotated.c.successor_hash,
               rotated.c.token_id, rotated.c.now,
               func.least(rotated.c.successor_expires_at, rotated.c.s_expires_at,
                          type_=rt.c.expires_at.type)),
    ).cte("successor")
    # The touch is informational: a session another transaction holds (signing its user out
    # everywhere, say) is left as it is (SKIP LOCKED). Waiting for it while holding the list's
    # tokens, in an order no one chose, could close a cycle with that transaction's own order.
    lockable = (select(s.c.id).where(s.c.id == rotated.c.s_id,
                                     s.c.last_used_at < rotated.c.touch_before)
                .with_for_update(skip_locked=True, key_share=True).lateral("lockable"))
    touching = (select(lockable.c.id, rotated.c.now)
                .select_from(rotated.join(lockable, true())).cte("touching"))
    touched = (update(s).where(s.c.id == touching.c.id)
               .values(last_used_at=touching.c.now).cte("touched"))
    audited = insert(a).from_select(
        ["realm_id", "at", "type", "user_id", "session_id", "organisation_id", "ip",
         "user_agent", "data"],
        select(rotated.c.realm_id, rotated.c.now, rotated.c.event_type, rotated.c.u_id,
               rotated.c.s_id, rotated.c.organisation_id, rotated.c.ip, rotated.c.user_agent,
               cast(rotated.c.data, a.c.data.type)),
    ).cte("audited")
    returned = [rotated.c.n, *(rotated.c[f"s_{c.name}"] for c in s.c),
                *(rotated.c[f"u_{c.name}"] for c in u.c)]
    return select(*returned).add_cte(successor, touched, audited)


def _open_session_cte(settled_keys: int = 0) -> Any:
    """``SessionRepo.open`` as one PostgreSQL statement. Foreign keys are checked at the end of
    the statement, when the session row the token refers to exists. With ``settled_keys``, the
    sign-in's throttle settlement too, after the user row's lock (the counters are locked in
    key order, as every write of them locks them; no writer of the counters locks a user)."""
    def values(table: Table, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        return {c.name: bindparam(prefix + c.name, type_=c.type)
                for c in table.c if c.name not in skip}

    def after(table: Table, prefix: str, source: Any, skip: tuple[str, ...] = ()) -> Any:
        """An insert of one row of bound values for each row of ``source`` (one or none)."""
        row = values(table, prefix, skip)
        return insert(table).from_select(list(row), select(*row.values()).select_from(source))

    user = _touch_signing_in().returning(t.users.c.id).cte("signed_in")
    session = after(t.sessions, "s_", user).returning(t.sessions.c.id).cte("opened")
    token = after(t.refresh_tokens, "r_", session).cte("first_token")
    ctes = [user, session, token]
    if settled_keys:
        ctes.append(_settle_update(settled_keys, select(user.c.id).exists()).cte("settled"))
    return (after(t.audit_events, "e_", user, skip=("id",))
            .returning(t.audit_events.c.user_id).add_cte(*ctes))


def _signing_in() -> Any:
    """Users, each joined to its login ids and to its password and TOTP credentials (a row
    each, or one row without)."""
    c = t.credentials.c
    return (t.users.join(t.login_ids, t.login_ids.c.user_id == t.users.c.id)
            .outerjoin(t.credentials, and_(
                c.user_id == t.users.c.id,
                or_(c.kind == bindparam("password"), c.kind == bindparam("totp")))))


def _named_by_login_id() -> Any:
    return and_(t.login_ids.c.realm_id == bindparam("realm_id"),
                t.login_ids.c.value == bindparam("value"))


def _sign_in_params(realm_id: str, login_id: str) -> dict[str, Any]:
    return {"realm_id": realm_id, "value": normalise_login_id(login_id),
            "password": "password", "totp": "totp"}


def _user_and_credentials(rows: Sequence[Any]) -> tuple[m.User, list[m.Credential]] | None:
    """The user and its credentials from ``_signing_in``'s rows (users' columns, then
    credentials'), or None when there is no user."""
    width, credentials = len(t.users.c), len(t.credentials.c)
    if not rows or rows[0][0] is None:
        return None
    return _USER(rows[0][:width]), [_CREDENTIAL(row[width:width + credentials])
                                    for row in rows if row[width] is not None]


def _for_sign_in_and_counters(count: int) -> Any:
    """``UserRepo.for_sign_in_and_counters`` on PostgreSQL: a one-row relation, the user's rows
    (``_signing_in``) left-joined to it on the login id, and each counter left-joined by its
    key."""
    counters = [t.throttle_counters.alias(f"counter{i}") for i in range(count)]
    one = select(literal_column("1").label("one")).subquery("one")
    joined = one.outerjoin(_signing_in(), _named_by_login_id())
    for i, counter in enumerate(counters):
        joined = joined.outerjoin(counter, counter.c.key == bindparam(f"k{i}"))
    return (select(*t.users.c, *t.credentials.c, *[col for counter in counters
                                                   for col in counter.c])
            .select_from(joined).order_by(t.credentials.c.created_at))


_SESSION, _USER = _loader(t.sessions, m.Session), _loader(t.users, m.User)
_CREDENTIAL = _loader(t.credentials, m.Credential)
_COUNTER = _loader(t.throttle_counters, m.ThrottleState)
_SESSION_WIDTH = len(t.sessions.c)


def _session_and_user(values: Sequence[Any]) -> tuple[m.Session, m.User]:
    """A session and its user from one row holding their columns in table order."""
    return _SESSION(values[:_SESSION_WIDTH]), _USER(values[_SESSION_WIDTH:])


class SigningKeyRepo(_Repo):
    table, record = t.signing_keys, m.SigningKey

    async def add(self, key: m.SigningKey) -> None:
        await self._insert(key)

    async def active(self, realm_id: str) -> m.SigningKey | None:
        c = t.signing_keys.c
        keys = await self._many(c.realm_id == realm_id, c.status == "active",
                                order_by=c.created_at.desc(), limit=1)
        return keys[0] if keys else None

    async def get(self, kid: str) -> m.SigningKey | None:
        return await self._get(kid=kid)

    async def published(self, realm_id: str, now: datetime) -> list[m.SigningKey]:
        c = t.signing_keys.c
        return await self._many(
            c.realm_id == realm_id,
            or_(c.status == "active", c.publish_until.is_(None), c.publish_until > now),
            order_by=c.created_at.desc(),
        )

    async def list(self, realm_id: str) -> list[m.SigningKey]:
        c = t.signing_keys.c
        return await self._many(c.realm_id == realm_id, order_by=c.created_at.desc())

    async def retire(self, kid: str, at: datetime, publish_until: datetime) -> None:
        c = t.signing_keys.c
        await self._set(and_(c.kid == kid, c.status == "active"), status="retired",
                        retired_at=at, publish_until=publish_until)


class DeviceRepo(_Repo):
    table, record = t.devices, m.Device

    async def add(self, device: m.Device) -> None:
        await self._insert(device)

    async def get(self, device_id: str) -> m.Device | None:
        return await self._get(id=device_id)

    async def by_key(self, device_key: str) -> m.Device | None:
        return await self._get(device_key=device_key)

    async def for_user(self, user_id: str) -> list[m.Device]:
        return await self._all("created_at", user_id=user_id)

    async def touch(self, device_id: str, at: datetime, name: str | None = None) -> None:
        values: dict[str, Any] = {"last_seen_at": at}
        if name:
            values["name"] = name
        await self._set(t.devices.c.id == device_id, **values)

    async def revoke(self, device_id: str, at: datetime) -> bool:
        c = t.devices.c
        return await self._set(and_(c.id == device_id, c.revoked_at.is_(None)),
                               revoked_at=at) > 0


class ReauthTokenRepo(_Repo):
    table, record = t.reauth_tokens, m.ReauthToken

    async def add(self, token: m.ReauthToken) -> None:
        await self._insert(token)

    async def by_hash(self, token_hash: str) -> m.ReauthToken | None:
        return await self._get(token_hash=token_hash)

    async def consume(self, token_id: str, at: datetime) -> bool:
        c = t.reauth_tokens.c
        return await self._set(and_(c.id == token_id, c.used_at.is_(None),
                                    c.revoked_at.is_(None)), used_at=at) == 1

    async def revoke_for_device(self, device_id: str, at: datetime) -> int:
        c = t.reauth_tokens.c
        return await self._set(and_(c.device_id == device_id, c.revoked_at.is_(None),
                                    c.used_at.is_(None)), revoked_at=at)


class ApiKeyRepo(_Repo):
    table, record = t.api_keys, m.ApiKey

    async def add(self, key: m.ApiKey) -> None:
        await self._insert(key)

    async def by_hash(self, key_hash: str) -> m.ApiKey | None:
        return await self._get(key_hash=key_hash)

    async def list(self, realm_id: str) -> list[m.ApiKey]:
        return await self._all("created_at", realm_id=realm_id)

    async def touch(self, key_id: str, at: datetime) -> None:
        await self._set(t.api_keys.c.id == key_id, last_used_at=at)

    async def revoke(self, key_id: str, at: datetime) -> bool:
        c = t.api_keys.c
        return await self._set(and_(c.id == key_id, c.revoked_at.is_(None)), revoked_at=at) > 0


class ChallengeRepo(_Repo):
    table, record = t.login_challenges, m.LoginChallenge

    async def add(self, challenge: m.LoginChallenge) -> None:
        await self._insert(challenge)

    async def by_hash(self, token_hash: str) -> m.LoginChallenge | None:
        return await self._get(token_hash=token_hash)

    async def update(self, challenge: m.LoginChallenge) -> None:
        await self._update(challenge)

    async def consume(self, challenge_id: str, at: datetime) -> bool:
        c = t.login_challenges.c
        return await self._set(and_(c.id == challenge_id, c.consumed_at.is_(None)),
                               consumed_at=at) == 1

    async def add_attempt(self, challenge_id: str) -> bool:
        c = t.login_challenges.c
        return await self._set(and_(c.id == challenge_id, c.consumed_at.is_(None),
                                    c.attempts < c.max_attempts),
                               attempts=c.attempts + 1) == 1

    async def add_resend(self, challenge_id: str, max_resends: int) -> bool:
        c = t.login_challenges.c
        return await self._set(and_(c.id == challenge_id, c.consumed_at.is_(None),
                                    c.resends < max_resends),
                               resends=c.resends + 1) == 1


class OneTimeCodeRepo(_Repo):
    table, record = t.one_time_codes, m.OneTimeCode

    async def add(self, code: m.OneTimeCode) -> None:
        await self._insert(code)

    async def by_hash(self, secret_hash: str) -> m.OneTimeCode | None:
        return await self._get(secret_hash=secret_hash)

    async def live_for_user(self, user_id: str, purpose: str,
                            now: datetime) -> list[m.OneTimeCode]:
        c = t.one_time_codes.c
        return await self._many(c.user_id == user_id, c.purpose == purpose,
                                c.consumed_at.is_(None), c.expires_at > now,
                                order_by=c.created_at.desc())

    async def consume(self, code_id: str, at: datetime) -> bool:
        c = t.one_time_codes.c
        return await self._set(and_(c.id == code_id, c.consumed_at.is_(None)),
                               consumed_at=at) == 1

    async def add_attempt(self, code_id: str) -> None:
        c = t.one_time_codes.c
        await self._set(c.id == code_id, attempts=c.attempts + 1)

    async def invalidate_for_user(self, user_id: str, purpose: str, at: datetime) -> None:
        c = t.one_time_codes.c
        statement = _statement(("codes_invalidate",), lambda: update(t.one_time_codes).where(
            c.user_id == bindparam("user_id"), c.purpose == bindparam("purpose"),
            c.consumed_at.is_(None)).values(consumed_at=bindparam("at", type_=c.consumed_at.type)))
        await self.conn.execute(statement, {"user_id": user_id, "purpose": purpose, "at": at})


class AuditRepo(_Repo):
    table, record = t.audit_events, m.AuditEvent

    async def add(self, event: m.AuditEvent) -> None:
        await self._insert(event, skip=("id",))

    async def add_many(self, events: Sequence[m.AuditEvent]) -> None:
        """``add`` each of ``events``, by one statement."""
        await self._insert_many(events, skip=("id",))

    async def recent(self, realm_id: str | None, *, limit: int = 50, user_id: str | None = None,
                     types: Sequence[str] = ()) -> list[m.AuditEvent]:
        c = t.audit_events.c
        where = []
        if realm_id is not None:
            where.append(c.realm_id == realm_id)
        if user_id is not None:
            where.append(c.user_id == user_id)
        if types:
            where.append(c.type.in_(list(types)))
        return await self._many(*where, order_by=c.id.desc(), limit=limit)


class OutboxRepo(_Repo):
    table, record = t.mail_outbox, m.OutboxMail

    async def add(self, mail: m.OutboxMail) -> None:
        await self._insert(mail)

    async def due(self, now: datetime, limit: int) -> list[m.OutboxMail]:
        c = t.mail_outbox.c
        return await self._many(c.sent_at.is_(None), c.next_attempt_at.is_not(None),
                                c.next_attempt_at <= now, order_by=c.next_attempt_at,
                                limit=limit)

    async def claim(self, mail_id: str, now: datetime, lease_until: datetime) -> bool:
        """Take a due mail for delivery; the lease keeps other nodes off it meanwhile."""
        c = t.mail_outbox.c
        return await self._set(and_(c.id == mail_id, c.sent_at.is_(None),
                                    c.next_attempt_at <= now),
                               next_attempt_at=lease_until, attempts=c.attempts + 1) == 1

    async def mark_sent(self, mail_id: str, at: datetime) -> None:
        await self._set(t.mail_outbox.c.id == mail_id, sent_at=at, next_attempt_at=None,
                        last_error=None)

    async def mark_failed(self, mail_id: str, error: str,
                          next_attempt_at: datetime | None) -> None:
        await self._set(t.mail_outbox.c.id == mail_id, last_error=error[:500],
                        next_attempt_at=next_attempt_at)


def _states_by_key(rows: Any) -> dict[str, m.ThrottleState]:
    return {state.key: state for state in (_record(m.ThrottleState, row) for row in rows)}


def _locked_in_key_order(*where: Any, skip_locked: bool = False) -> Any:
    """The keys of the throttle counters ``where`` holds, locked in key order (``skip_locked``:
    leaving out those another transaction holds). Every write of the counters locks them so
    first (``lock_many``'s upsert in the order of its sorted values): a statement otherwise
    locks in the order it scans, and two orders deadlock."""
    c = t.throttle_counters.c
    return select(c.key).where(*where).order_by(c.key).with_for_update(skip_locked=skip_locked)


# What an admission decides on, beside the pending count (``replace_if_unchanged``).
_DECIDING = ("failures", "window_started_at", "blocked_until")


def _settled_keys(settlement: m.Settlement) -> list[str]:
    return sorted({settlement.cleared, *settlement.taken_back})


def _settle_params(settlement: m.Settlement, keys: list[str]) -> dict[str, Any]:
    return {"settle_now": settlement.at, "cleared": settlement.cleared,
            **{f"settle_k{i}": key for i, key in enumerate(keys)}}


def _settle_update(count: int, *proceed: Any) -> Any:
    """``ThrottleRepo.settle`` of ``count`` keys, run only where ``proceed`` holds."""
    table = t.throttle_counters
    c = table.c
    when = bindparam("settle_now", type_=t.UTCDateTime())
    is_cleared = c.key == bindparam("cleared")
    lapsed = and_(c.pending_until.is_not(None), c.pending_until <= when)
    left = case((c.pending > 1, c.pending - 1), else_=0)
    locked = _locked_in_key_order(
        c.key.in_([bindparam(f"settle_k{i}") for i in range(count)]), *proceed).cte("locked")
    return (update(table)
            .where(c.key.in_(select(locked.c.key)))
            .values(pending=case((lapsed, 0), else_=left),
                    failures=case((is_cleared, 0), else_=c.failures),
                    blocked_until=case((is_cleared, null()), else_=c.blocked_until)))


class ThrottleRepo(_Repo):
    table, record = t.throttle_counters, m.ThrottleState

    async def get(self, key: str) -> m.ThrottleState | None:
        return await self._get(key=key)

    async def lock_many(self, keys: Sequence[str], now: datetime) -> list[m.ThrottleState]:
        """The counters of ``keys`` (made, at zero, where absent), locked until the end of the
        write transaction, in the order given: one statement, an upsert that changes nothing
        and returns the rows. Rows are made and locked in key order, so two transactions
        locking overlapping keys cannot deadlock; SQLite's write transaction is exclusive."""
        ordered = sorted(set(keys))
        dialect = self.conn.dialect.name
        table = t.throttle_counters

        def build() -> Any:
            upsert = pg_insert if dialect == "postgresql" else sqlite_insert
            statement = upsert(table).values([
                {"key": bindparam(f"k{i}"), "failures": bindparam("zero"),
                 "pending": bindparam("zero"),
                 "window_started_at": bindparam("now", type_=t.UTCDateTime())}
                for i in range(len(ordered))])
            return statement.on_conflict_do_update(
                index_elements=["key"], set_={"failures": table.c.failures}  # no change
            ).returning(*table.c)

        statement = _statement(("throttle_lock", dialect, len(ordered)), build)
        rows = await self.conn.execute(statement, {"zero": 0, "now": now, **{
            f"k{i}": key for i, key in enumerate(ordered)}})
        states = _states_by_key(rows)
        return [states[key] for key in keys]

    async def read_many(self, keys: Sequence[str]) -> list[m.ThrottleState | None]:
        """The counters of ``keys`` as they are now (None where absent), without a lock."""
        table = t.throttle_counters
        statement = _statement(("throttle_read", len(keys)), lambda: select(table).where(
            table.c.key.in_([bindparam(f"k{i}") for i in range(len(keys))])))
        rows = await self.conn.execute(statement, {f"k{i}": key for i, key in enumerate(keys)})
        found = _states_by_key(rows)
        return [found.get(key) for key in keys]

    async def replace_if_unchanged(self, expected: Sequence[m.ThrottleState],
                                   new: Sequence[m.ThrottleState], *,
                                   pending_at_most: Sequence[int | None] = (),
                                   now: datetime | None = None) -> bool:
        """Write ``new`` over the counters of the same keys if every one of them is still as
        ``expected`` (compare-and-set), all or none, in one statement that is atomic by itself:
        the rows are locked in key order first, as ``lock_many`` and ``settle`` lock them, and
        a row changed meanwhile is not counted as locked (PostgreSQL checks the row's latest
        version), so that nothing is written. Returns whether it was written.

        A key given a number in ``pending_at_most`` (in the order of ``expected``) is instead
        one more pending attempt on what it holds now: it qualifies while its failures, window
        and block are as expected, it holds between 1 and that many pending attempts whose
        lease has not lapsed by ``now``, and it gets one more, with ``new``'s lease. (Other
        attempts on a busy address change its pending count, not what decides an admission.)"""
        counted = list(pending_at_most) or [None] * len(expected)
        triples = sorted(zip(expected, new, counted, strict=True),
                         key=lambda triple: triple[0].key)
        if any(old.key != state.key for old, state, _ in triples):
            raise ValueError("expected and new counters must name the same keys")
        if any(at_most is not None and (now is None or any(
                getattr(old, name) != getattr(state, name) for name in _DECIDING))
               for old, state, at_most in triples):
            raise ValueError("a counted key keeps its failures, window and block, given now")
        table = t.throttle_counters
        names = [c.name for c in table.c if c.name != "key"]
        shape = tuple(at_most is not None for _, _, at_most in triples)

        def build() -> Any:
            c = table.c

            def qualifies(i: int, by_count: bool) -> Any:
                compared = _DECIDING if by_count else names
                same = [c[name].is_not_distinct_from(
                    bindparam(f"e_{name}{i}", type_=c[name].type)) for name in compared]
                if by_count:
                    same += [c.pending.between(1, bindparam(f"m{i}")),
                             c.pending_until > bindparam("now", type_=t.UTCDateTime())]
                return and_(c.key == bindparam(f"k{i}"), *same)

            def written(i: int, name: str, by_count: bool) -> Any:
                if by_count and name == "pending":
                    return c.pending + 1
                return bindparam(f"n_{name}{i}", type_=c[name].type)

            unchanged = or_(*(qualifies(i, by_count) for i, by_count in enumerate(shape)))
            locked = _locked_in_key_order(unchanged).cte("locked")
            all_locked = select(func.count()).select_from(locked).scalar_subquery() == len(shape)
            return (update(table)
                    .where(c.key.in_([bindparam(f"k{i}") for i in range(len(shape))]),
                           all_locked)
                    .values({name: case(*((c.key == bindparam(f"k{i}"),
                                           written(i, name, by_count))
                                          for i, by_count in enumerate(shape)))
                             for name in names})
                    .returning(c.key))  # sqlite3 counts no rows for a statement led by WITH

        statement = _statement(("throttle_replace", shape), build)
        params: dict[str, Any] = {}
        for i, (old, state, at_most) in enumerate(triples):
            params[f"k{i}"] = old.key
            for name in names:
                params[f"e_{name}{i}"] = getattr(old, name)
                params[f"n_{name}{i}"] = getattr(state, name)
            if at_most is not None:
                params[f"m{i}"] = at_most
        if any(shape):
            params["now"] = now
        written = len(list(await self.conn.execute(statement, params)))
        if written not in (0, len(triples)):  # the statement writes all or none: never partly
            raise RuntimeError("throttle counters replaced in part")
        return written == len(triples)

    async def save(self, *states: m.ThrottleState) -> None:
        """Write counters back (an upsert: the rows exist once locked, but a counter may be
        saved without being locked first)."""
        states = tuple({state.key: state for state in states}.values())  # each row once
        dialect = self.conn.dialect.name
        table = t.throttle_counters
        names = [c.name for c in table.c]

        def build() -> Any:
            upsert = pg_insert if dialect == "postgresql" else sqlite_insert
            statement = upsert(table).values([
                {name: bindparam(f"{name}_{i}", type_=table.c[name].type) for name in names}
                for i in range(len(states))])
            return statement.on_conflict_do_update(index_elements=["key"], set_={
                name: statement.excluded[name] for name in names if name != "key"})

        statement = _statement(("throttle_save", dialect, len(states)), build)
        await self.conn.execute(statement, {f"{name}_{i}": value for i, state in
                                            enumerate(states)
                                            for name, value in _values(state).items()})

    async def settle(self, settlement: m.Settlement) -> None:
        """A pending attempt ended well, in one statement that is atomic by itself (its row
        locks, taken in key order, on PostgreSQL; the writer lock on SQLite): every key loses the
        attempt (all its pending attempts once their lease lapsed by the settlement's time),
        and ``cleared`` also loses its failures and its block. Counters left at zero stay for
        the purge."""
        keys = _settled_keys(settlement)
        statement = _statement(("throttle_settle", self.conn.dialect.name, len(keys)),
                               lambda: _settle_update(len(keys)))
        await self.conn.execute(statement, _settle_params(settlement, keys))

    async def clear(self, key: str) -> None:
        c = t.throttle_counters.c
        statement = _statement(("throttle_clear",), lambda: delete(t.throttle_counters).where(
            c.key == bindparam("key")))
        await self.conn.execute(statement, {"key": key})


class HousekeepingRepo:
    """Deletes what has outlived its use. Rotated refresh tokens go only with their session,
    so reuse detection keeps working while the session lives; audit events are never deleted."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def _delete(self, table: Table, *where: Any) -> int:
        return (await self.conn.execute(delete(table).where(*where))).rowcount

    async def purge(self, now: datetime, cutoff: datetime, throttle_window: int) -> dict[str, int]:
        if self.conn.dialect.name == "postgresql":
            # A backlog of ended rows may take longer to delete than a request may wait; this
            # runs in the background, for no request (the setting ends with the transaction).
            await self.conn.execute(text("SET LOCAL statement_timeout = 0"))
        s, rt = t.sessions.c, t.reauth_tokens.c
        ended = or_(s.expires_at < cutoff, s.revoked_at < cutoff)
        # Refresh tokens first (PostgreSQL and SQLite both cascade, but be explicit).
        ended_ids = select(s.id).where(ended).scalar_subquery()
        counts = {
            "refresh_tokens": await self._delete(t.refresh_tokens,
                                                 t.refresh_tokens.c.session_id.in_(ended_ids)),
            "sessions": await self._delete(t.sessions, ended),
            "login_challenges": await self._delete(
                t.login_challenges, t.login_challenges.c.expires_at < cutoff),
            "one_time_codes": await self._delete(
                t.one_time_codes, t.one_time_codes.c.expires_at < cutoff),
            "reauth_tokens": await self._delete(
                t.reauth_tokens, or_(rt.expires_at < cutoff, rt.used_at < cutoff,
                                     rt.revoked_at < cutoff)),
            "mail_outbox": await self._delete(
                t.mail_outbox, t.mail_outbox.c.created_at < cutoff,
                or_(t.mail_outbox.c.sent_at.is_not(None),
                    t.mail_outbox.c.next_attempt_at.is_(None))),
        }
        stale = now - timedelta(seconds=throttle_window)
        c = t.throttle_counters.c
        # Skipping what a sign-in holds now.
        idle = _locked_in_key_order(
            c.window_started_at < stale,
            or_(c.blocked_until.is_(None), c.blocked_until < now),
            # Not while an attempt is in flight (its lease not lapsed): it would be forgotten.
            or_(c.pending == 0, c.pending_until.is_(None), c.pending_until <= now),
            skip_locked=True)
        counts["throttle_counters"] = await self._delete(t.throttle_counters, c.key.in_(idle))
        return counts


class SqlTx(Tx):
    """One transaction's repositories (the attributes of ``Tx``), all on the same connection,
    each made on first use (a transaction uses one to three of them)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    def __getattr__(self, name: str) -> Any:
        repo_class = _REPOSITORIES.get(name)
        if repo_class is None:
            raise AttributeError(name)
        repo = repo_class(self.conn)
        setattr(self, name, repo)
        return repo


# The repository class of each attribute of ``Tx``: the class of this module with the name of
# the protocol it implements.
_REPOSITORIES: dict[str, type[Any]] = {name: globals()[kind]
                                       for name, kind in Tx.__annotations__.items()}
