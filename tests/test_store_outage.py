"""When the database is unavailable, every surface answers 503 in its own shape, with
Retry-After, and the store says so with one error (``StoreUnavailable``), not a driver's."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from authgate.api.app import build_core, create_app
from authgate.core.ports import StoreUnavailable
from authgate.store import db
from authgate.store.db import SqlStore
from tests.conftest import PASSWORD, PG_ADMIN_DSN, new_database, unique_email
from tests.conftest import test_settings as settings_for


async def _drop(database_url: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE "{database_url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_an_unreachable_postgresql_is_store_unavailable():
    store = SqlStore.from_url("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    try:
        with pytest.raises(StoreUnavailable):
            async with store.transaction() as tx:
                await tx.conn.execute(text("SELECT 1"))
    finally:
        await store.close()


async def test_a_postgresql_database_gone_under_the_store_is_store_unavailable(tmp_path: Path):
    async with new_database("postgres", tmp_path) as url:
        store = SqlStore.from_url(url, pool_size=2)
        try:
            async with store.transaction(write=True) as tx:  # a connection kept
                await tx.conn.execute(text("SELECT 1"))
            await _drop(url)
            for write in (False, True):
                with pytest.raises(StoreUnavailable):
                    async with store.transaction(write=write) as tx:
                        await tx.conn.execute(text("SELECT 1"))
        finally:
            await store.close()


async def test_a_deadlock_on_postgresql_is_store_unavailable(tmp_path: Path):
    """PostgreSQL breaks a deadlock by rolling one transaction back: that request is told to
    retry (503), like one that met any other passing failure, and the other one goes on."""
    async with new_database("postgres", tmp_path) as url:
        store = SqlStore.from_url(url, pool_size=4)
        try:
            async with store.transaction(write=True) as tx:
                await tx.conn.execute(text("CREATE TABLE pair (id int PRIMARY KEY)"))
                await tx.conn.execute(text("INSERT INTO pair VALUES (1), (2)"))
            both = asyncio.Barrier(2)

            async def lock(first: int, second: int) -> None:
                async with store.transaction(write=True) as tx:
                    await tx.conn.execute(text(f"SELECT 1 FROM pair WHERE id = {first} FOR UPDATE"))
                    await both.wait()
                    await tx.conn.execute(text(f"SELECT 1 FROM pair WHERE id = {second} FOR UPDATE"))

            results = await asyncio.gather(lock(1, 2), lock(2, 1), return_exceptions=True)
            assert sorted(type(r).__name__ for r in results) == ["NoneType", "StoreUnavailable"]
            await asyncio.wait_for(store.ping(), 5)
        finally:
            await store.close()


async def test_a_postgresql_statement_waiting_past_its_timeout_is_store_unavailable(
        tmp_path: Path):
    """A request blocked on a lock held elsewhere (another client stuck mid-transaction) gets
    its answer, 503, after ``db_statement_timeout`` instead of waiting for ever; and a
    transaction left idle past ``db_idle_transaction_timeout`` is ended, its locks released."""
    async with new_database("postgres", tmp_path) as url:
        store = SqlStore.from_url(url, pool_size=3, statement_timeout=0.3,
                                  idle_transaction_timeout=0.5)
        other = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            async with store.transaction(write=True) as tx:
                await tx.conn.execute(text("CREATE TABLE item (id int PRIMARY KEY, n int)"))
                await tx.conn.execute(text("INSERT INTO item VALUES (1, 0)"))
            holder = other.transaction()
            await holder.start()
            await other.execute("UPDATE item SET n = n + 1 WHERE id = 1")
            started = asyncio.get_running_loop().time()
            with pytest.raises(StoreUnavailable):
                async with store.transaction(write=True) as tx:
                    await tx.conn.execute(text("UPDATE item SET n = n + 1 WHERE id = 1"))
            assert asyncio.get_running_loop().time() - started < 5
            await holder.rollback()

            # A store transaction left idle is ended by the server; the row is free again.
            with pytest.raises(StoreUnavailable):
                async with store.transaction(write=True) as tx:
                    await tx.conn.execute(text("UPDATE item SET n = n + 1 WHERE id = 1"))
                    await asyncio.sleep(1.5)
                    await tx.conn.execute(text("SELECT 1"))
            await asyncio.wait_for(other.execute("UPDATE item SET n = 5 WHERE id = 1"), 5)
            await asyncio.wait_for(store.ping(), 5)
        finally:
            await other.close()
            await store.close()


async def test_housekeeping_on_postgresql_is_not_cut_short_by_the_statement_timeout(
        tmp_path: Path):
    """Deleting a backlog of ended rows may take longer than a request may wait: the purge's
    own transaction runs without the timeout, and the connection has it again afterwards."""
    from datetime import UTC, datetime, timedelta

    from authgate.store.migrate import upgrade

    async with new_database("postgres", tmp_path) as url:
        store = SqlStore.from_url(url, pool_size=1, statement_timeout=0.2)
        try:
            await upgrade(store.engine)
            now = datetime.now(UTC)
            async with store.transaction(write=True) as tx:
                await tx.housekeeping.purge(now, now - timedelta(days=30), 3600)
                await tx.conn.execute(text("SELECT pg_sleep(0.5)"))  # past 0.2 s: not cut
            with pytest.raises(StoreUnavailable):
                async with store.transaction(write=True) as tx:
                    await tx.conn.execute(text("SELECT pg_sleep(0.5)"))
        finally:
            await store.close()


async def test_a_programming_error_on_postgresql_is_not_an_outage(tmp_path: Path):
    """asyncpg reports a wrong argument count as an InterfaceError on a healthy connection:
    a bug (500), not StoreUnavailable (503), and the store goes on working."""
    async with new_database("postgres", tmp_path) as url:
        store = SqlStore.from_url(url, pool_size=2)
        try:
            for write in (False, True):
                with pytest.raises(asyncpg.InterfaceError):
                    async with store.transaction(write=write) as tx:
                        await tx.conn._raw.fetch("SELECT $1::int, $2::int", 1)
            await asyncio.wait_for(store.ping(), 5)
        finally:
            await store.close()


async def test_closing_the_store_waits_for_a_running_transaction_not_forever(tmp_path: Path):
    async with new_database("postgres", tmp_path) as url:
        store = SqlStore.from_url(url, pool_size=2)
        await store.ping()
        started = asyncio.Event()

        async def write() -> None:
            async with store.transaction(write=True) as tx:
                started.set()
                await asyncio.sleep(0.2)
                await tx.conn.execute(text("SELECT 1"))

        running = asyncio.create_task(write())
        await started.wait()
        await asyncio.wait_for(store.close(), 5)
        await running


async def test_sqlite_locked_by_another_process_past_the_wait_is_store_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(db, "SQLITE_WRITE_LOCK_WAIT_S", 0.2)
    path = tmp_path / "authgate.db"
    store = SqlStore.from_url(f"sqlite+aiosqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        async with store.transaction(write=True) as tx:  # the file exists, in WAL mode
            await tx.conn.execute(text("CREATE TABLE t (x INTEGER)"))
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
        with pytest.raises(StoreUnavailable):
            async with store.transaction(write=True) as tx:
                await tx.conn.execute(text("INSERT INTO t VALUES (1)"))
        other.execute("ROLLBACK")
        async with store.transaction(write=True) as tx:  # and the store recovers
            await tx.conn.execute(text("INSERT INTO t VALUES (2)"))
        async with store.transaction() as tx:
            assert [row[0] for row in await tx.conn.execute(text("SELECT x FROM t"))] == [2]
    finally:
        other.close()
        await store.close()


@pytest.fixture
async def outage(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """An app on a PostgreSQL database of its own, with a signed-in user; then the database
    is dropped under it."""
    async with new_database("postgres", tmp_path) as url:
        settings = settings_for(url, tmp_path, key_cache_seconds=0)
        core = await build_core(settings)
        try:
            transport = httpx.ASGITransport(app=create_app(settings, core),
                                            client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport,
                                         base_url="http://authgate.test") as client:
                email = unique_email()
                signed_up = await client.post("/signup", json={"email": email,
                                                               "password": PASSWORD})
                assert signed_up.status_code == 201, signed_up.text
                tokens = (await client.post("/oauth/token", data={
                    "grant_type": "password", "username": email,
                    "password": PASSWORD})).json()
                realm = await core.realms.require("default")
                await _drop(url)
                await asyncio.sleep(0.2)  # the kept connections see the end of their sockets
                yield {"client": client, "tokens": tokens, "email": email,
                       "project": realm.project_id}
        finally:
            await core.close()


def _unavailable(response: httpx.Response) -> Any:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["cache-control"] == "no-store"
    return response.json()


async def test_the_native_api_answers_503_temporarily_unavailable(outage: dict[str, Any]):
    client, tokens = outage["client"], outage["tokens"]
    refreshed = await client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    assert _unavailable(refreshed) == {
        "error": "temporarily_unavailable", "error_code": "temporarily_unavailable",
        "error_description": "The service is temporarily unavailable; try again shortly."}
    userinfo = await client.get("/userinfo", headers={
        "Authorization": f"Bearer {tokens['access_token']}"})
    assert _unavailable(userinfo)["error"] == "temporarily_unavailable"
    signed_in = await client.post("/oauth/token", data={
        "grant_type": "password", "username": outage["email"], "password": PASSWORD})
    assert _unavailable(signed_in)["error"] == "temporarily_unavailable"


async def test_each_dialect_answers_503_in_its_own_shape(outage: dict[str, Any]):
    client, email = outage["client"], outage["email"]
    descope = await client.post("/descope/v1/auth/password/signin",
                                headers={"Authorization": f"Bearer {outage['project']}"},
                                json={"loginId": email, "password": PASSWORD})
    assert _unavailable(descope) == {"errorCode": "E011010",
                                     "errorDescription": "Service temporarily unavailable",
                                     "errorMessage": "The service is temporarily unavailable; "
                                                     "try again shortly."}
    tiledesk = await client.post("/tiledesk/auth/signin",
                                 json={"email": email, "password": PASSWORD})
    assert _unavailable(tiledesk) == {"success": False,
                                      "msg": "Service temporarily unavailable."}
    deskera = await client.post("/deskera/v1/iam/auth/sign-in/web/sign-in",
                                json={"userName": email, "password": PASSWORD})
    assert _unavailable(deskera) == {
        "errorMessage": "The service is temporarily unavailable; try again shortly."}
    webapi = await client.post("/webapi/api/v1/Authentication/Login?APIKey=some-key",
                               json={"userName": email, "password": PASSWORD,
                                     "deviceName": "laptop"})
    assert _unavailable(webapi) == {
        "Message": "The service is temporarily unavailable; try again shortly."}
    classroom = await client.post("/classroom/auth/sign-in-verify",
                                  json={"identity": email, "password": PASSWORD})
    assert _unavailable(classroom) == {"status_code": 503, "message": "Service Unavailable"}
