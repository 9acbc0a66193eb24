"""The storage contract, run on SQLite and PostgreSQL alike (one suite, both backends)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from authgate.api.app import build_core
from authgate.config import ConfigError
from authgate.core.engine import Core
from authgate.core.models import (
    Credential,
    OutboxMail,
    Realm,
    RefreshToken,
    Rotation,
    Session,
    ThrottleState,
    User,
    utcnow,
)
from authgate.core.ports import Conflict, StaleUser
from authgate.crypto.tokens import digest, new_id, new_token
from authgate.store import tables as t
from authgate.store import db
from authgate.store.db import SqlStore
from tests.conftest import PASSWORD, PG_ADMIN_DSN, new_database, unique_email
from tests.conftest import test_settings as settings_for


def a_user(realm: Realm, **fields: object) -> User:
    return User(id=new_id(), realm_id=realm.id, **fields)  # type: ignore[arg-type]


def a_session(realm: Realm, user: User) -> Session:
    now = utcnow()
    return Session(id=new_id(), realm_id=realm.id, user_id=user.id, amr=["pwd"],
                   created_at=now, last_used_at=now, expires_at=now + timedelta(hours=1))


async def test_login_ids_match_case_insensitively_and_are_unique_per_realm(core: Core,
                                                                           realm: Realm):
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(a_user(realm, email="Mixed.Case@Example.com", username="Ann"))
    async with core.store.transaction() as tx:
        assert (await tx.users.by_login_id(realm.id, "mixed.case@example.COM")) is not None
        assert (await tx.users.by_login_id(realm.id, " ann ")) is not None
        assert (await tx.users.by_login_id(realm.id, "someone-else")) is None
    with pytest.raises(Conflict):
        async with core.store.transaction(write=True) as tx:
            await tx.users.add(a_user(realm, email="mixed.case@example.com"))
    other = await core.realms.create(realm.name + "-b")
    async with core.store.transaction(write=True) as tx:  # another realm: no conflict
        await tx.users.add(a_user(other, email="mixed.case@example.com"))


async def test_a_failed_transaction_leaves_nothing_behind(core: Core, realm: Realm):
    user = a_user(realm, email="rollback@example.com")
    with pytest.raises(RuntimeError):
        async with core.store.transaction(write=True) as tx:
            await tx.users.add(user)
            raise RuntimeError("abort")
    async with core.store.transaction() as tx:
        assert await tx.users.get(user.id) is None
        assert await tx.users.by_login_id(realm.id, "rollback@example.com") is None


async def test_more_concurrent_transactions_than_connections_all_finish(database_url: str):
    """A store keeps connections between transactions; one that another transaction is
    waiting for must go to that transaction, reads and failed writes included."""
    store = SqlStore.from_url(database_url, pool_size=2)

    async def one(n: int) -> int:
        if n % 5 == 0:
            with pytest.raises(RuntimeError):
                async with store.transaction(write=True) as tx:
                    await tx.conn.execute(text("SELECT 1"))
                    raise RuntimeError("abort")
        async with store.transaction(write=n % 2 == 0) as tx:
            await asyncio.sleep(0.005)
            return (await tx.conn.execute(text(f"SELECT {n}"))).scalar_one()

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(40))), 20)
        assert results == list(range(40))
        await store.ping()
    finally:
        await store.close()


async def test_postgres_connections_closed_by_the_database_are_replaced(tmp_path: Path):
    """A connection PostgreSQL closes while the store keeps it between transactions (a
    restart, an idle timeout, an administrator) is replaced: the next transactions succeed.
    (SQLite's connections are files of this process; nothing else closes them.)"""
    async with new_database("postgres", tmp_path) as database_url:
        await _survives_terminated_connections(database_url)


async def _survives_terminated_connections(database_url: str) -> None:
    store = SqlStore.from_url(database_url, pool_size=2)
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    database = database_url.rsplit("/", 1)[1]

    async def read(n: int) -> int:
        async with store.transaction() as tx:
            await asyncio.sleep(0.01)
            return (await tx.conn.execute(text(f"SELECT {n}"))).scalar_one()

    try:
        for _ in range(4):
            assert await asyncio.gather(read(1), read(2)) == [1, 2]  # both connections kept
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1 AND pid <> pg_backend_pid()", database)
            await asyncio.sleep(0.2)  # the store's connections see the end of their sockets
        assert await asyncio.wait_for(asyncio.gather(read(3), read(4)), 10) == [3, 4]
    finally:
        await admin.close()
        await store.close()


async def test_postgres_connections_kept_unused_go_back_to_the_pool_without_traffic(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(db, "PG_IDLE_SECONDS", 0.2)
    async with new_database("postgres", tmp_path) as database_url:
        store = SqlStore.from_url(database_url, pool_size=3)

        async def read() -> None:
            async with store.transaction() as tx:
                await asyncio.sleep(0.01)
                await tx.conn.execute(text("SELECT 1"))

        try:
            await asyncio.gather(read(), read(), read())
            pool = store._pg_pool
            assert pool is not None and pool.get_idle_size() < pool.get_size()  # kept
            await asyncio.sleep(0.7)  # no traffic at all
            assert pool.get_idle_size() == pool.get_size()  # all back with asyncpg
            await read()  # and the store goes on
        finally:
            await store.close()


async def test_changing_a_users_email_frees_the_old_login_id(core: Core, realm: Realm):
    user = a_user(realm, email="old@example.com")
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
    user.email = "new@example.com"
    async with core.store.transaction(write=True) as tx:
        await tx.users.update(user)
    async with core.store.transaction() as tx:
        assert await tx.users.by_login_id(realm.id, "old@example.com") is None
        assert (await tx.users.by_login_id(realm.id, "new@example.com")).id == user.id


async def test_times_and_json_round_trip_exactly(core: Core, realm: Realm):
    created = datetime(2026, 3, 1, 17, 30, 5, 123456, tzinfo=timezone(timedelta(hours=5)))
    user = a_user(realm, email="rt@example.com", custom_attributes={"plan": "pro", "seats": 3,
                                                                     "tags": ["a", "b"]},
                  roles=["admin"], created_at=created)
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
    async with core.store.transaction() as tx:
        loaded = await tx.users.get(user.id)
    assert loaded is not None
    assert loaded.custom_attributes == {"plan": "pro", "seats": 3, "tags": ["a", "b"]}
    assert loaded.roles == ["admin"]
    assert loaded.created_at == created
    assert loaded.created_at.tzinfo is UTC  # read back in UTC, whatever zone it was given in
    assert loaded.created_at.hour == 12


async def test_only_one_of_two_concurrent_rotations_of_a_refresh_token_wins(core: Core,
                                                                            realm: Realm):
    user = a_user(realm, email="cas@example.com")
    session = a_session(realm, user)
    now = utcnow()
    token = RefreshToken(id=new_id(), session_id=session.id, token_hash=digest(new_token()),
                         created_at=now, expires_at=now + timedelta(hours=1))
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
        await tx.sessions.add(session)
        await tx.refresh_tokens.add(token)

    async def rotate(successor: str) -> bool:
        async with core.store.transaction(write=True) as tx:
            return await tx.refresh_tokens.mark_rotated(token.id, utcnow(), successor, b"x")

    results = await asyncio.gather(rotate(new_id()), rotate(new_id()))
    assert sorted(results) == [False, True]


async def test_revoking_a_users_sessions_can_spare_one(core: Core, realm: Realm):
    user = a_user(realm, email="revoke@example.com")
    sessions = [a_session(realm, user) for _ in range(3)]
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
        for session in sessions:
            await tx.sessions.add(session)
        revoked = await tx.sessions.revoke_for_user(user.id, utcnow(), "test",
                                                    except_session_id=sessions[0].id)
    assert sorted(revoked) == sorted(s.id for s in sessions[1:])
    async with core.store.transaction() as tx:
        live = await tx.sessions.for_user(user.id, live_at=utcnow())
    assert [s.id for s in live] == [sessions[0].id]


async def test_throttle_counters_upsert(core: Core):
    key = f"test:{new_id()}"
    now = utcnow()
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(ThrottleState(key=key, failures=1, window_started_at=now))
        await tx.throttle.save(ThrottleState(key=key, failures=2, window_started_at=now,
                                             blocked_until=now + timedelta(seconds=5)))
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key)
    assert state is not None and state.failures == 2 and state.blocked_until is not None
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.clear(key)
        assert await tx.throttle.get(key) is None


async def test_an_outbox_mail_is_claimed_by_one_worker_only(core: Core):
    now = utcnow()
    mail = OutboxMail(id=new_id(), realm_id=None, recipient="x@example.com", subject="s",
                      body_text="b", template="t", created_at=now,
                      next_attempt_at=now - timedelta(seconds=1))
    async with core.store.transaction(write=True) as tx:
        await tx.outbox.add(mail)

    async def claim() -> bool:
        async with core.store.transaction(write=True) as tx:
            return await tx.outbox.claim(mail.id, utcnow(), utcnow() + timedelta(seconds=60))

    assert sorted(await asyncio.gather(claim(), claim())) == [False, True]
    async with core.store.transaction(write=True) as tx:
        await tx.outbox.mark_sent(mail.id, utcnow())
        assert mail.id not in [m.id for m in await tx.outbox.due(utcnow(), 100)]


async def test_retired_keys_stay_published_until_their_tokens_expire(core: Core, realm: Realm):
    first = (await core.keys.list(realm))[0]
    second = await core.keys.rotate(realm)
    now = utcnow()
    async with core.store.transaction() as tx:
        published = {k.kid for k in await tx.signing_keys.published(realm.id, now)}
        later = {k.kid for k in await tx.signing_keys.published(
            realm.id, now + core.keys.max_token_lifetime + timedelta(minutes=5))}
        active = await tx.signing_keys.active(realm.id)
    assert published == {first.kid, second.kid}
    assert later == {second.kid}
    assert active is not None and active.kid == second.kid


async def test_concurrent_key_rotations_leave_one_active_key(core: Core, realm: Realm):
    """Rotations of one realm's key are serialised: each retires the key the one before it
    made, so exactly one key is active after any number of them."""
    import asyncio

    first = (await core.keys.list(realm))[0]
    made = await asyncio.gather(*(core.keys.rotate(realm) for _ in range(4)))
    keys = await core.keys.list(realm)
    active = [key.kid for key in keys if key.status == "active"]
    assert len(active) == 1 and active[0] in {key.kid for key in made}
    assert {key.kid for key in keys} == {first.kid, *(key.kid for key in made)}
    assert all(key.publish_until is not None for key in keys if key.status == "retired")


async def test_a_realm_locked_for_a_change_still_lets_users_sign_in(core: Core, realm: Realm):
    """The lock that orders key rotations and settings changes is not one that the foreign
    key checks of a new session wait for (PostgreSQL: FOR NO KEY UPDATE). SQLite's writes
    take turns anyway: there, the session opens once the change is done."""
    import asyncio

    from authgate.core.users import NewUser

    user = await core.users.create(realm, NewUser(email=unique_email(), password=PASSWORD))
    locked, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with core.store.transaction(write=True) as tx:
            await tx.realms.lock(realm.id)
            locked.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await locked.wait()
    opening = asyncio.create_task(core.sessions.start(realm, user, amr=["pwd"]))
    try:
        if not core.store.is_sqlite:
            assert (await asyncio.wait_for(asyncio.shield(opening), 5)).access_token
    finally:
        release.set()
        await holder
    assert (await opening).access_token


@asynccontextmanager
async def _never_analysed(backend: str, tmp_path: Path, tables: tuple[str, ...]
                          ) -> AsyncIterator[tuple[SqlStore, Realm, User]]:
    """A store on a new database whose ``tables`` autovacuum leaves alone, never analysed
    (a new deployment), with a realm and a user."""
    from authgate.store.migrate import upgrade

    realm = Realm(id=new_id(), name="plan", display_name="plan", project_id="Pplan",
                  settings={}, created_at=utcnow())
    user = a_user(realm, email="plan@example.com")
    async with new_database(backend, tmp_path) as url:
        store = SqlStore.from_url(url)
        try:
            await upgrade(store.engine)
            async with store.transaction(write=True) as tx:
                if not store.is_sqlite:
                    for table in tables:
                        await tx.conn.execute(text(
                            f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
                await tx.realms.add(realm)
                await tx.users.add(user)
            yield store, realm, user
        finally:
            await store.close()


async def _pg_generic_plan(raw: Any, sql: str, placeholders: str) -> str:
    """The plan PostgreSQL caches for ``sql`` as a prepared statement (a generic plan)."""
    await raw.execute("SET plan_cache_mode = force_generic_plan")
    await raw.execute(f"PREPARE plan_of AS {sql}")
    try:
        return "\n".join(row[0] for row in await raw.fetch(
            f"EXPLAIN EXECUTE plan_of({placeholders})"))
    finally:
        await raw.execute("DEALLOCATE plan_of")
        await raw.execute("RESET plan_cache_mode")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_refresh_reads_each_row_by_its_key_whatever_the_user_holds(backend: str,
                                                                            tmp_path: Path):
    """The rotation's plan, as the database caches it for every later refresh (a generic plan)
    on tables not yet analysed (a new deployment; a new database here, its tables kept from
    autovacuum), reads the token by its hash and the session and user by their keys: nothing
    that grows with the user's other sessions or the session's rotated tokens. The planner,
    left to its estimates, had done both."""
    from sqlalchemy import select

    from authgate.store.repositories import _live_token, _rotate_live_cte, _rotations

    async with _never_analysed(backend, tmp_path,
                               ("users", "sessions", "refresh_tokens")) as (store, realm, user):
        async with store.transaction(write=True) as tx:
            for _ in range(30):
                session = a_session(realm, user)
                await tx.sessions.add(session)
                for _ in range(5):
                    await tx.refresh_tokens.add(RefreshToken(
                        id=new_id(), session_id=session.id, token_hash=digest(new_token()),
                        created_at=utcnow(), expires_at=utcnow() + timedelta(hours=1),
                        rotated_at=utcnow()))
            if not store.is_sqlite:
                # And a table of a real deployment's size (5,000 tokens): on a table of a few
                # pages a scan is the cheaper plan, and is replanned once autovacuum first
                # analyses the table; at this size it would read every page for every refresh.
                await tx.conn.execute(text(
                    "INSERT INTO refresh_tokens (id, session_id, token_hash, created_at, "
                    "expires_at, rotated_at) SELECT md5('i' || g), :session, md5('h' || g), "
                    "now(), now() + interval '1 hour', now() FROM generate_series(1, 5000) g"),
                    {"session": session.id})
        async with store.transaction() as tx:
            raw = tx.conn._raw
            if store.is_sqlite:
                compiled = (select(t.refresh_tokens.c.id, t.sessions, t.users)
                            .select_from(t.refresh_tokens).where(_live_token())
                            .compile(dialect=tx.conn.dialect))
                plan = [row[-1] for row in raw.execute(
                    "EXPLAIN QUERY PLAN " + compiled.string,
                    [None] * len(compiled.positiontup))]
                assert len(plan) == 3 and all(step.startswith("SEARCH") for step in plan)
                assert not any("ix_" in step for step in plan), plan
                return
            text_plans = []
            for statement in (_rotate_live_cte(), _rotations()):  # one token; a list of them
                compiled = statement.compile(dialect=tx.conn.dialect)
                text_plans.append(await _pg_generic_plan(raw, compiled.string, ", ".join(
                    f"NULL::{_pg_type(compiled, n)}" for n in compiled.positiontup)))
    for text_plan in text_plans:
        assert "Seq Scan" not in text_plan, text_plan
        assert "uq_refresh_tokens_token_hash" in text_plan, text_plan
        assert "ix_sessions_user_id" not in text_plan and "ix_refresh_tokens_session_id" \
            not in text_plan, text_plan
    # The list's tokens are locked as each is found, in the list's order (store/repositories:
    # two statements never wait for each other in a cycle): a lock under the loop over the
    # list, on the token found by its hash.
    listed = text_plans[1]
    assert listed.index("Function Scan on anon_1") < listed.index("LockRows") \
        < listed.index("uq_refresh_tokens_token_hash"), listed


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_batched_session_reads_read_each_row_by_its_key(backend: str, tmp_path: Path):
    """The plan of the bearer requests' batched read (``SessionRepo.many_with_user``), as the
    database caches it, on tables not yet analysed, finds each listed session by its key and
    its user by its key: nothing that grows with the sessions a user holds. Left to its
    estimates, PostgreSQL had planned it from the users through ``ix_sessions_user_id``."""
    from authgate.store.repositories import _session_with_user, _sessions_with_users

    async with _never_analysed(backend, tmp_path, ("users", "sessions")) as (store, realm, user):
        async with store.transaction(write=True) as tx:
            for _ in range(200):
                await tx.sessions.add(a_session(realm, user))
        async with store.transaction() as tx:
            raw = tx.conn._raw
            many = _sessions_with_users(not store.is_sqlite).compile(dialect=tx.conn.dialect)
            one = _session_with_user().compile(dialect=tx.conn.dialect)
            if store.is_sqlite:
                plans = [[row[-1] for row in raw.execute("EXPLAIN QUERY PLAN " + sql, [arg])]
                         for sql, arg in ((many.string, '["a", "b"]'), (one.string, "a"))]
                assert [step.split()[:2] for step in plans[0]] == [
                    ["SCAN", "anon_2"], ["SEARCH", "sessions"], ["SEARCH", "users"]], plans
                assert [step.split()[:2] for step in plans[1]] == [
                    ["SEARCH", "sessions"], ["SEARCH", "users"]], plans
                assert not any("ix_" in step for plan in plans for step in plan), plans
                return
            text_plans = [
                await _pg_generic_plan(raw, many.string,
                                       "NULL::TEXT[], NULL::INTEGER, NULL::INTEGER"),
                await _pg_generic_plan(raw, one.string, "NULL::VARCHAR")]
    for text_plan in text_plans:
        assert "pk_sessions" in text_plan, text_plan
        assert "Seq Scan on sessions" not in text_plan, text_plan
        assert "ix_sessions_user_id" not in text_plan, text_plan


async def test_bearer_reads_one_at_a_time_are_not_planned_each_time(tmp_path: Path):
    """PostgreSQL plans a prepared statement for its values five times, then keeps its general
    plan unless planning for the values looks cheaper. For the batched read given one id it
    always did (~90 µs of planning a read); one id alone is read by a statement whose general
    plan PostgreSQL keeps."""
    async with _never_analysed("postgres", tmp_path, ()) as (store, realm, user):
        sessions = [a_session(realm, user) for _ in range(5)]
        async with store.transaction(write=True) as tx:
            for session in sessions:
                await tx.sessions.add(session)
        for _ in range(6):
            for session in sessions:  # one at a time: batches of one
                found = await store.session_with_user(session.id)
                assert found is not None and found[0].id == session.id
        async with store.transaction() as tx:  # the same (kept) connection
            prepared = (await tx.conn.execute(text(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%FROM sessions%' OR statement LIKE '%unnest%'")))
    prepared = [tuple(row) for row in prepared if "pg_prepared_statements" not in row[0]]
    assert prepared, "no session read was prepared on the connection"
    for statement, generic, custom in prepared:
        assert custom <= 5 and generic >= 25, (statement[:80], generic, custom)


def _pg_type(compiled: object, name: str) -> str:
    """The SQL type of a bound parameter, as the statement casts it."""
    from sqlalchemy.dialects import postgresql

    bind = compiled.binds[name]  # type: ignore[attr-defined]
    return bind.type.compile(dialect=postgresql.dialect())


async def test_a_value_longer_than_its_column_is_bad_input_not_a_server_error(core: Core,
                                                                              realm: Realm):
    """PostgreSQL refuses a value longer than its column; the store says so as bad input
    (``ValueTooLong``), which every surface answers 400. SQLite keeps it."""
    from starlette.requests import Request as StarletteRequest

    from authgate.api.errors import native
    from authgate.core.ports import ValueTooLong

    user = a_user(realm, email=f"{'x' * 400}@example.com")
    if core.store.is_sqlite:
        async with core.store.transaction(write=True) as tx:
            await tx.users.add(user)
    else:
        with pytest.raises(ValueTooLong):
            async with core.store.transaction(write=True) as tx:
                await tx.users.add(user)
        async with core.store.transaction() as tx:  # the store goes on working
            assert await tx.users.get(user.id) is None
    request = StarletteRequest({"type": "http", "method": "POST", "path": "/signup",
                                "headers": [], "app": None})
    answer = native.handle(request, ValueTooLong("a value longer than the database keeps"))
    assert answer.status_code == 400 and b"too long" in answer.body


async def test_concurrent_changes_to_a_realms_settings_all_stay(core: Core, realm: Realm):
    import asyncio

    stale = await core.realms.require(realm.name)
    await asyncio.gather(core.realms.update_settings(stale, {"allow_signup": False}),
                         core.realms.update_settings(stale, {"audience": "https://api.test"}),
                         core.realms.update_settings(stale, {"reveal_unknown_users": True}))
    stored = await core.realms.get(realm.id)
    assert stored.settings == {"allow_signup": False, "audience": "https://api.test",
                               "reveal_unknown_users": True}


async def test_audit_events_are_listed_newest_first(core: Core, realm: Realm):
    async with core.store.transaction(write=True) as tx:
        for n in range(3):
            await core.audit.record(tx, f"test.event{n}", realm_id=realm.id, n=n)
    events = await core.audit.recent(realm.id, limit=3)
    assert [e.type for e in events] == ["test.event2", "test.event1", "test.event0"]
    assert events[0].data == {"n": 2}


async def test_a_duplicate_key_is_a_conflict_on_the_fast_path_too(core: Core, realm: Realm):
    user = a_user(realm, email="dup-key@example.com")
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
    clone = a_user(realm, email="other-dup@example.com")
    clone.id = user.id
    with pytest.raises(Conflict):
        async with core.store.transaction(write=True) as tx:
            await tx.users.add(clone)
    async with core.store.transaction() as tx:
        assert (await tx.users.get(user.id)).email == "dup-key@example.com"
        assert await tx.users.by_login_id(realm.id, "other-dup@example.com") is None


async def test_housekeeping_deletes_only_what_has_outlived_its_use(core: Core, realm: Realm):
    import base64

    from authgate.core.models import LoginChallenge
    from tests.conftest import MASTER

    user = a_user(realm, email="purge@example.com")
    now = utcnow()
    ended, live = a_session(realm, user), a_session(realm, user)
    ended.revoked_at = now
    old_token = RefreshToken(id=new_id(), session_id=live.id, token_hash=digest(new_token()),
                             created_at=now, expires_at=now + timedelta(days=400),
                             rotated_at=now)  # rotated long ago but its session lives
    live.expires_at = now + timedelta(days=400)
    challenge = LoginChallenge(id=new_id(), realm_id=realm.id, user_id=user.id,
                               kind="choose_account", token_hash=digest(new_token()),
                               created_at=now, expires_at=now + timedelta(minutes=5))
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
        for session in (ended, live):
            await tx.sessions.add(session)
        await tx.refresh_tokens.add(old_token)
        await tx.challenges.add(challenge)
    later = now + timedelta(days=core.settings.retention_days + 1)
    master = base64.urlsafe_b64decode(MASTER + "=" * (-len(MASTER) % 4))
    future = Core(core.settings, core.store, master, clock=lambda: later)
    try:
        counts = await future.housekeeping.purge()
    finally:
        future.hasher.close()
    assert counts["sessions"] >= 1 and counts["login_challenges"] >= 1
    async with core.store.transaction() as tx:
        assert await tx.sessions.get(ended.id) is None
        assert await tx.sessions.get(live.id) is not None
        assert await tx.refresh_tokens.get(old_token.id) is not None  # reuse detection intact
        assert await tx.challenges.by_hash(challenge.token_hash) is None
        assert await tx.users.get(user.id) is not None


async def test_housekeeping_keeps_a_throttle_counter_with_an_attempt_in_flight(core: Core):
    """A counter whose window passed long ago but whose attempt is still being checked stays:
    deleting it would forget that attempt."""
    from authgate.core.models import ThrottleState

    now = utcnow()
    long_ago = now - timedelta(seconds=core.settings.throttle_window * 3)
    in_flight, lapsed, idle = (f"test:{new_id()}" for _ in range(3))
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(
            ThrottleState(key=in_flight, failures=0, window_started_at=long_ago, pending=1,
                          pending_until=now + timedelta(seconds=60)),
            ThrottleState(key=lapsed, failures=0, window_started_at=long_ago, pending=1,
                          pending_until=now - timedelta(seconds=1)),
            ThrottleState(key=idle, failures=3, window_started_at=long_ago))
    await core.housekeeping.purge()
    async with core.store.transaction() as tx:
        assert await tx.throttle.get(in_flight) is not None
        assert await tx.throttle.get(lapsed) is None and await tx.throttle.get(idle) is None


async def test_a_realms_first_key_is_published_at_once(core: Core, realm: Realm):
    """A JWKS cached while the realm had no key (made by an older version, or its keys
    deleted by hand) is dropped when the first key is made."""
    import orjson
    from sqlalchemy import delete

    async with core.store.transaction(write=True) as tx:
        await tx.conn.execute(delete(t.signing_keys).where(t.signing_keys.c.realm_id == realm.id))
    core.keys._signers.pop(realm.id)
    core.keys._jwks.pop(realm.id)
    assert orjson.loads(await core.keys.jwks(realm)) == {"keys": []}
    signer = await core.keys.signer(realm)
    assert [key["kid"] for key in orjson.loads(await core.keys.jwks(realm))["keys"]] == \
        [signer.kid]


async def _live_token(core: Core, realm: Realm, *, session_ttl: timedelta = timedelta(hours=1),
                      **user_fields: object) -> tuple[User, Session, RefreshToken]:
    user = a_user(realm, email=f"{new_id()}@example.com", **user_fields)
    session = a_session(realm, user)
    session.expires_at = session.created_at + session_ttl
    session.last_used_at = session.created_at - timedelta(minutes=5)
    token = RefreshToken(id=new_id(), session_id=session.id, token_hash=digest(new_token()),
                         created_at=session.created_at, expires_at=session.expires_at)
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
        await tx.sessions.add(session)
        await tx.refresh_tokens.add(token)
    return user, session, token


def a_rotation(core: Core, realm: Realm, token_hash: str, *, successor_enc: bytes = b"sealed",
               successor_expires_in: timedelta = timedelta(days=30),
               **event: object) -> Rotation:
    """The rotation of the token whose hash is ``token_hash``, as the core would ask for it
    (``event``: the audit event's data)."""
    now = utcnow()
    return Rotation(token_hash=token_hash, realm_id=realm.id, now=now, successor_id=new_id(),
                    successor_hash=digest(new_token()),
                    successor_expires_at=now + successor_expires_in,
                    successor_enc=successor_enc, touch_before=now - timedelta(minutes=1),
                    event=core.audit.event("session.refreshed", realm_id=realm.id, **event))


async def _rotate_live(core: Core, realm: Realm, token_hash: str, *,
                       successor_expires_in: timedelta = timedelta(days=30)) -> tuple[
                           tuple[Session, User] | None, str]:
    rotation = a_rotation(core, realm, token_hash, successor_expires_in=successor_expires_in)
    async with core.store.transaction(write=True, single=True) as tx:
        found = await tx.refresh_tokens.rotate_live(rotation)
    return found, rotation.successor_id


async def test_a_live_refresh_token_rotates_in_one_call(core: Core, realm: Realm):
    user, session, token = await _live_token(core, realm)
    found, successor_id = await _rotate_live(core, realm, token.token_hash)
    assert found is not None
    assert (found[0].id, found[1].id, found[1].email) == (session.id, user.id, user.email)
    async with core.store.transaction() as tx:
        parent = await tx.refresh_tokens.get(token.id)
        successor = await tx.refresh_tokens.get(successor_id)
        touched = await tx.sessions.get(session.id)
        events = await tx.audit.recent(realm.id, user_id=user.id)
    assert parent is not None and parent.rotated_at is not None
    assert (parent.successor_id, parent.successor_enc) == (successor_id, b"sealed")
    assert successor is not None and successor.rotated_at is None
    assert (successor.session_id, successor.parent_id) == (session.id, token.id)
    # Asked for 30 days; the session ends in one hour, and the successor with it.
    assert successor.expires_at == session.expires_at
    assert touched is not None and touched.last_used_at > session.last_used_at
    assert [(e.type, e.session_id) for e in events] == [("session.refreshed", session.id)]


@pytest.mark.parametrize("condition", ["rotated", "token expired", "session revoked",
                                       "session expired", "another realm", "user disabled",
                                       "unknown token"])
async def test_rotate_live_changes_nothing_unless_every_check_passes(core: Core, realm: Realm,
                                                                     condition: str):
    user, session, token = await _live_token(core, realm)
    now = utcnow()
    async with core.store.transaction(write=True) as tx:
        if condition == "rotated":
            await tx.refresh_tokens.mark_rotated(token.id, now, new_id(), b"x")
        elif condition == "token expired":
            await tx.conn.execute(t.refresh_tokens.update()
                                  .where(t.refresh_tokens.c.id == token.id)
                                  .values(expires_at=now - timedelta(seconds=1)))
        elif condition == "session revoked":
            await tx.sessions.revoke(session.id, now, "test")
        elif condition == "session expired":
            await tx.conn.execute(t.sessions.update().where(t.sessions.c.id == session.id)
                                  .values(expires_at=now - timedelta(seconds=1)))
        elif condition == "user disabled":
            await tx.conn.execute(t.users.update().where(t.users.c.id == user.id)
                                  .values(status="disabled"))
    async with core.store.transaction() as tx:
        before = await tx.refresh_tokens.get(token.id)
    in_realm = await core.realms.create(realm.name + "-x") if condition == "another realm" \
        else realm
    token_hash = digest(new_token()) if condition == "unknown token" else token.token_hash
    found, successor_id = await _rotate_live(core, in_realm, token_hash)
    assert found is None
    async with core.store.transaction() as tx:
        assert await tx.refresh_tokens.get(successor_id) is None
        assert await tx.refresh_tokens.get(token.id) == before
        assert await tx.audit.recent(realm.id, user_id=user.id) == []


async def test_of_concurrent_live_rotations_of_one_token_one_wins(core: Core, realm: Realm):
    _, _, token = await _live_token(core, realm)
    results = await asyncio.gather(*(_rotate_live(core, realm, token.token_hash)
                                     for _ in range(4)))
    winners = [successor for found, successor in results if found is not None]
    assert len(winners) == 1
    async with core.store.transaction() as tx:
        parent = await tx.refresh_tokens.get(token.id)
    assert parent is not None and parent.successor_id == winners[0]


async def test_a_sign_in_reads_the_user_with_its_password_and_totp_only(core: Core,
                                                                        realm: Realm):
    user = a_user(realm, email=f"{new_id()}@example.com")
    kinds = ["password", "totp", "recovery_code", "recovery_code"]
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
        for kind in kinds:
            await tx.credentials.add(Credential(id=new_id(), user_id=user.id, kind=kind,
                                                secret=f"{kind}-secret"))
    async with core.store.transaction() as tx:
        found = await tx.users.for_sign_in(realm.id, user.email.upper())
    assert found is not None
    assert found[0].id == user.id
    assert sorted(c.kind for c in found[1]) == ["password", "totp"]
    bare = a_user(realm, email=f"{new_id()}@example.com")  # no credentials at all
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(bare)
    async with core.store.transaction() as tx:
        assert await tx.users.for_sign_in(realm.id, bare.email) == (bare, [])
        assert await tx.users.for_sign_in(realm.id, "nobody@example.com") is None


async def test_a_sign_in_reads_the_user_and_its_counters_at_once(core: Core, realm: Realm):
    """What ``for_sign_in`` and ``read_many`` give, together: for a user with credentials,
    one without, and a login id no one has; each counter in the order asked, None where
    absent."""
    user = a_user(realm, email=f"{new_id()}@example.com")
    bare = a_user(realm, email=f"{new_id()}@example.com")
    kept = ThrottleState(key=f"test:{new_id()}", failures=3, window_started_at=utcnow(),
                         pending=1, pending_until=utcnow() + timedelta(seconds=60))
    absent = f"test:{new_id()}"
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
        await tx.users.add(bare)
        for kind in ("totp", "password", "recovery_code"):
            await tx.credentials.add(Credential(id=new_id(), user_id=user.id, kind=kind,
                                                secret=f"{kind}-secret"))
        await tx.throttle.save(kept)
    for login_id in (user.email.upper(), bare.email, "nobody@example.com"):
        for keys in ([absent, kept.key], [kept.key]):
            async with core.store.transaction() as tx:
                together = await tx.users.for_sign_in_and_counters(realm.id, login_id, keys)
                apart = (await tx.users.for_sign_in(realm.id, login_id),
                         await tx.throttle.read_many(keys))
            assert together == apart
            assert together[1] == [kept if key == kept.key else None for key in keys]
    assert together[0] is None
    async with core.store.transaction() as tx:
        found, _ = await tx.users.for_sign_in_and_counters(realm.id, user.email, [absent])
    assert found is not None and found[0] == user
    assert [c.kind for c in found[1]] == ["totp", "password"]  # oldest first, no others


async def test_throttle_counters_are_locked_together_and_made_where_absent(core: Core):
    now = utcnow()
    keys = [f"test:{new_id()}" for _ in range(3)]
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(ThrottleState(key=keys[1], failures=4, window_started_at=now))
    async with core.store.transaction(write=True) as tx:
        states = await tx.throttle.lock_many(keys, now)
    assert [s.key for s in states] == keys  # in the order asked, whatever the lock order
    assert [s.failures for s in states] == [0, 4, 0]
    async with core.store.transaction() as tx:
        assert (await tx.throttle.get(keys[2])).failures == 0


async def test_opening_a_session_writes_it_its_token_the_sign_in_and_the_event_at_once(
        core: Core, realm: Realm):
    user = a_user(realm, email=f"{new_id()}@example.com")
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
    session = a_session(realm, user)
    token = RefreshToken(id=new_id(), session_id=session.id, token_hash=digest(new_token()),
                         created_at=session.created_at, expires_at=session.expires_at)
    event = core.audit.event("session.signed_in", realm_id=realm.id, user_id=user.id,
                             session_id=session.id, amr=["pwd"])
    async with core.store.transaction(write=True, single=True) as tx:
        await tx.sessions.open(session, token, event, user.security_stamp)
    async with core.store.transaction() as tx:
        assert await tx.sessions.get(session.id) == session
        assert await tx.refresh_tokens.by_hash(token.token_hash) == token
        stored_user = await tx.users.get(user.id)
        events = await tx.audit.recent(realm.id, user_id=user.id)
    assert stored_user is not None and stored_user.last_sign_in_at == session.created_at
    assert [(e.type, e.session_id, e.data) for e in events] == [
        ("session.signed_in", session.id, {"amr": ["pwd"]})]

    # A conflict (the same token hash again) leaves nothing of the second session behind.
    again = a_session(realm, user)
    clash = RefreshToken(id=new_id(), session_id=again.id, token_hash=token.token_hash,
                         created_at=again.created_at, expires_at=again.expires_at)
    with pytest.raises(Conflict):
        async with core.store.transaction(write=True, single=True) as tx:
            await tx.sessions.open(again, clash, core.audit.event(
                "session.signed_in", realm_id=realm.id, user_id=user.id, session_id=again.id),
                user.security_stamp)
    async with core.store.transaction() as tx:
        assert await tx.sessions.get(again.id) is None
        assert len(await tx.audit.recent(realm.id, user_id=user.id)) == 1


async def test_a_session_opens_only_while_the_user_is_active_with_the_stamp_read(
        core: Core, realm: Realm):
    user = a_user(realm, email=f"{new_id()}@example.com")
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)

    async def open_session(stamp: str) -> Session:
        session = a_session(realm, user)
        token = RefreshToken(id=new_id(), session_id=session.id, token_hash=digest(new_token()),
                             created_at=session.created_at, expires_at=session.expires_at)
        event = core.audit.event("session.signed_in", realm_id=realm.id, user_id=user.id,
                                 session_id=session.id)
        async with core.store.transaction(write=True, single=True) as tx:
            await tx.sessions.open(session, token, event, stamp)
        return session

    read = user.security_stamp
    async with core.store.transaction(write=True) as tx:
        fresh = await tx.users.new_stamp(user.id)
    with pytest.raises(StaleUser):
        await open_session(read)
    async with core.store.transaction() as tx:
        assert await tx.sessions.for_user(user.id) == []
        assert await tx.audit.recent(realm.id, user_id=user.id) == []
        assert (await tx.users.get(user.id)).last_sign_in_at is None
    assert (await open_session(fresh)).user_id == user.id
    async with core.store.transaction(write=True) as tx:
        disabled = await tx.users.set_status(user.id, "disabled", utcnow())
    with pytest.raises(StaleUser):
        await open_session(disabled)  # the stamp is current, the user is not active


async def test_a_stale_copy_of_a_user_does_not_undo_its_status_or_stamp(core: Core,
                                                                         realm: Realm):
    user = a_user(realm, email=f"{new_id()}@example.com")
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
    async with core.store.transaction(write=True) as tx:
        stamp = await tx.users.set_status(user.id, "disabled", utcnow())
    user.name = "Renamed"  # a profile update made from the copy read before
    async with core.store.transaction(write=True) as tx:
        await tx.users.update(user)
    async with core.store.transaction() as tx:
        stored = await tx.users.get(user.id)
    assert (stored.name, stored.status, stored.security_stamp) == ("Renamed", "disabled", stamp)


def test_sqlite_datetimes_keep_sqlalchemys_text_format():
    """Rows written by SQLAlchemy's own SQLite processors (before Authgate had its own) read
    back alike and compare correctly in SQL against new ones."""
    from datetime import UTC, datetime

    from sqlalchemy.dialects.sqlite import DATETIME
    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

    dialect = SQLiteDialect_pysqlite()
    ours = t.UTCDateTime().dialect_impl(dialect)
    write, read = ours.bind_processor(dialect), ours.result_processor(dialect, None)
    theirs = DATETIME().bind_processor(dialect)
    for moment in (datetime(2026, 11, 23, 9, 5, 7, 0, tzinfo=UTC),
                   datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC),
                   datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)):
        stored = write(moment)
        assert stored == theirs(moment.replace(tzinfo=None))
        assert read(stored) == moment and read(stored).tzinfo is UTC
    assert read("2026-11-23 09:05:07") == datetime(2026, 11, 23, 9, 5, 7, tzinfo=UTC)
    # Text with an offset of its own (not what Authgate writes) still reads as that moment, in UTC.
    assert read("2026-11-23T10:05:07+01:00") == datetime(2026, 11, 23, 9, 5, 7, tzinfo=UTC)
    assert read("2026-11-23T10:05:07+01:00").tzinfo is UTC
    with pytest.raises(ValueError):
        write(datetime(2026, 11, 23))  # naive


def test_sqlite_datetime_texts_remembered_stay_exact():
    """The SQLite bind processor remembers the texts it made (a write binds one moment several
    times): a moment in another zone is the same text as its UTC twin, a naive twin of a
    remembered moment is still refused, and moments past what it remembers are all exact."""
    from datetime import UTC, datetime, timedelta, timezone

    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

    dialect = SQLiteDialect_pysqlite()
    write = t.UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    moment = datetime(2026, 11, 23, 9, 5, 7, tzinfo=UTC)
    assert write(moment) == write(moment) == "2026-11-23 09:05:07.000000"
    assert write(moment.astimezone(timezone(timedelta(hours=1)))) == "2026-11-23 09:05:07.000000"
    assert write(datetime(2026, 11, 23, 10, 5, 7, 5, tzinfo=timezone(timedelta(hours=1)))) == \
        "2026-11-23 09:05:07.000005"
    with pytest.raises(ValueError):
        write(datetime(2026, 11, 23, 9, 5, 7))  # naive, though its aware twin is remembered
    assert write(None) is None
    moments = [moment + timedelta(microseconds=i * 1_001) for i in range(1_000)]
    for _ in range(2):
        assert [write(m) for m in moments] == [
            m.replace(tzinfo=None).isoformat(" ", "microseconds") for m in moments]


async def test_the_pool_size_setting_bounds_the_postgresql_connections(tmp_path: Path):
    """``db_pool_size`` is how many backends a process may hold at once: more transactions
    than that wait for a connection rather than open another."""
    with pytest.raises(ConfigError, match="AUTHGATE_DB_POOL_SIZE"):
        settings_for("sqlite:///unused", tmp_path, db_pool_size=0)
    async with new_database("postgres", tmp_path) as url:
        core = await build_core(settings_for(url, tmp_path, db_pool_size=3))
        try:
            async def backend() -> int:
                async with core.store.transaction(write=True) as tx:
                    pid = (await tx.conn.execute(text("SELECT pg_backend_pid()"))).first()[0]
                    await tx.conn.execute(text("SELECT pg_sleep(0.05)"))
                    return int(pid)

            pids = await asyncio.gather(*(backend() for _ in range(12)))
            assert len(set(pids)) == 3
        finally:
            await core.close()
