"""SQLite group commit: write transactions that queue behind one another share one commit,
each keeps its own all-or-nothing outcome, and none returns before its commit is on disk."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from authgate.core.models import ThrottleState, utcnow
from authgate.store.db import SqlStore
from authgate.store.migrate import upgrade

METRIC = "authgate_sqlite_group_commit_writes"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    store = SqlStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'group.db'}")
    await upgrade(store.engine)
    try:
        yield store
    finally:
        await store.close()


def commits() -> tuple[float, float]:
    """Commits so far, and the writes they carried."""
    return (REGISTRY.get_sample_value(f"{METRIC}_count") or 0.0,
            REGISTRY.get_sample_value(f"{METRIC}_sum") or 0.0)


async def write(store: SqlStore, key: str, *, hold: asyncio.Event | None = None,
                fail: bool = False) -> None:
    async with store.transaction(write=True) as tx:
        await tx.throttle.save(ThrottleState(key=key, failures=1, window_started_at=utcnow()))
        if hold is not None:
            await hold.wait()
        if fail:
            raise RuntimeError(f"{key} fails")


def on_disk(store: SqlStore, key: str) -> bool:
    """Read with a connection of its own: only what is committed is there."""
    assert store._sqlite is not None
    with sqlite3.connect(store._sqlite.path) as connection:
        row = connection.execute("SELECT 1 FROM throttle_counters WHERE key = ?", (key,))
        return row.fetchone() is not None


async def queued_behind(store: SqlStore, hold: asyncio.Event,
                        *others: asyncio.Task[None]) -> asyncio.Task[None]:
    """Start a writer that holds the write lock until ``hold`` is set, then queue ``others``
    behind it."""
    first = asyncio.create_task(write(store, "first", hold=hold))
    while not store._write_lock.locked():
        await asyncio.sleep(0)
    for _ in range(3):
        await asyncio.sleep(0)  # let the others reach the lock
    return first


async def test_writers_that_queue_share_one_commit_and_all_land(store: SqlStore) -> None:
    before = commits()
    hold = asyncio.Event()
    first = await queued_behind(store, hold)
    others = [asyncio.create_task(write(store, f"w{i}")) for i in range(19)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in others)  # queued behind the first
    hold.set()
    await asyncio.gather(first, *others)
    after = commits()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 20)
    assert all(on_disk(store, key) for key in ["first", *(f"w{i}" for i in range(19))])


async def test_a_failing_writer_in_a_group_loses_only_its_own_changes(store: SqlStore) -> None:
    hold = asyncio.Event()
    first = await queued_behind(store, hold)
    failing = asyncio.create_task(write(store, "failing", fail=True))
    last = asyncio.create_task(write(store, "last"))
    await asyncio.sleep(0)
    hold.set()
    results = await asyncio.gather(first, failing, last, return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], RuntimeError)
    assert on_disk(store, "first") and on_disk(store, "last")
    assert not on_disk(store, "failing")


async def test_a_writer_that_ends_the_whole_transaction_fails_its_group(store: SqlStore) -> None:
    """Some SQLite errors roll back the whole transaction, and with it the writes of the
    others in the group: each of them must hear that its write did not land."""
    hold = asyncio.Event()

    async def wrecker() -> None:
        async with store.transaction(write=True) as tx:
            await tx.throttle.save(ThrottleState(key="wrecker", failures=1,
                                                 window_started_at=utcnow()))
            assert store._sqlite is not None
            store._sqlite.writer.rollback()  # as SQLITE_FULL or SQLITE_IOERR would
            raise RuntimeError("disk full")

    first = await queued_behind(store, hold)
    wrecking = asyncio.create_task(wrecker())
    await asyncio.sleep(0)
    hold.set()
    results = await asyncio.gather(first, wrecking, return_exceptions=True)
    assert isinstance(results[0], sqlite3.OperationalError)
    assert "not committed" in str(results[0])
    assert isinstance(results[1], RuntimeError)
    assert not on_disk(store, "first") and not on_disk(store, "wrecker")
    await write(store, "after")  # the next writer starts afresh
    assert on_disk(store, "after")


async def test_a_cancelled_queued_writer_does_not_strand_the_group(store: SqlStore) -> None:
    """The first writer hands the open transaction to the one queued behind it, which is
    cancelled before it runs: the group is committed all the same."""
    hold = asyncio.Event()
    first = await queued_behind(store, hold)
    second = asyncio.create_task(write(store, "second"))
    await asyncio.sleep(0)
    hold.set()
    await asyncio.sleep(0)  # the first ends its work and hands over to the second
    assert store._group is not None and not store._write_lock.locked()
    second.cancel()
    await asyncio.wait_for(first, timeout=5)
    assert on_disk(store, "first")
    with pytest.raises(asyncio.CancelledError):
        await second
    assert not on_disk(store, "second")


async def test_a_writer_cancelled_while_it_waits_for_the_commit_still_lands(
        store: SqlStore) -> None:
    """Cancelling a writer after its work is done cannot take the work back; the commit
    goes on, and the writer queued next still gets a working transaction."""
    task = asyncio.create_task(write(store, "cancelled-late"))
    while not store._write_lock.locked():
        await asyncio.sleep(0)
    assert store._group is None  # the work is done; the commit is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await write(store, "next")
    assert on_disk(store, "cancelled-late") and on_disk(store, "next")


async def test_a_commit_that_fails_tells_every_member_and_frees_the_writer(
        store: SqlStore) -> None:
    """A failure at COMMIT itself (here a deferred foreign key, checked only then): every
    member hears that its write did not land, nothing of the group is kept, and the next
    writer gets a working transaction."""
    hold = asyncio.Event()

    async def breaks_a_key_at_commit() -> None:
        async with store.transaction(write=True) as tx:
            await tx.conn.execute(text("PRAGMA defer_foreign_keys = ON"))
            await tx.conn.execute(text(
                "INSERT INTO refresh_tokens (id, session_id, token_hash, created_at, expires_at) "
                "VALUES ('t', 'no such session', 'h', '2026-01-01', '2027-01-01')"))

    first = await queued_behind(store, hold)
    breaking = asyncio.create_task(breaks_a_key_at_commit())
    await asyncio.sleep(0)
    hold.set()
    results = await asyncio.gather(first, breaking, return_exceptions=True)
    for result in results:
        assert isinstance(result, sqlite3.OperationalError), result
        assert "not committed" in str(result) and "FOREIGN KEY" in str(result)
    assert not on_disk(store, "first")
    assert not store._write_lock.locked()
    await write(store, "after")
    assert on_disk(store, "after")


async def test_a_commit_runs_in_the_committer_and_the_next_writer_starts_within_three_turns(
        store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit runs off the event loop, in the committer's thread. When it is over, its
    members and the writer queued next run within three turns of the event loop: every
    turn of a busy loop is long, and the write lock is held until then."""
    turns = 0
    done_at: list[int] = []
    threads: list[str] = []

    async def ticking() -> None:  # one count per turn of the loop, which never sleeps
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    await write(store, "warm")  # the committer exists
    assert store._sqlite is not None
    committer = store._sqlite.committer
    submit = committer.submit

    def submitted(fn: Any, *args: Any) -> Any:
        def commit() -> Any:
            threads.append(threading.current_thread().name)
            try:
                return fn(*args)
            finally:
                done_at.append(turns)
        return submit(commit)

    monkeypatch.setattr(committer, "submit", submitted)
    ticker = asyncio.create_task(ticking())
    try:
        started_at: list[int] = []

        async def next_writer() -> None:
            async with store.transaction(write=True) as tx:
                started_at.append(turns)
                await tx.throttle.save(ThrottleState(key="next", failures=1,
                                                     window_started_at=utcnow()))

        first = asyncio.create_task(write(store, "first"))
        while not store._write_lock.locked():
            await asyncio.sleep(0)
        while store._group is not None:  # the first's work is done: its commit is under way
            await asyncio.sleep(0)
        second = asyncio.create_task(next_writer())
        await asyncio.gather(first, second)
    finally:
        ticker.cancel()
    assert threads and all(name.startswith("authgate-sqlite-commit") for name in threads)
    assert started_at[0] - done_at[0] <= 3, (done_at, started_at)
    assert on_disk(store, "first") and on_disk(store, "next")
