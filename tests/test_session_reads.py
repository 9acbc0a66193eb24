"""Bearer requests' session reads: those asked for at once go out as one statement
(store/batch.py); every caller still gets its own, fresh answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import jwt
import pytest
from prometheus_client import REGISTRY

from authgate.core.engine import Core
from authgate.core.models import Realm, Session, User, utcnow
from authgate.crypto.tokens import new_id
from authgate.store.batch import Batched
from authgate.store.repositories import SessionRepo
from tests.conftest import PG_ADMIN_DSN, core_on_postgres, holding, realm_url, recorded_calls
from tests.conftest import waiting_on_locks
from tests.test_native_api import bearer, signed_in
from tests.test_store import a_session, a_user


class Reads:
    """A read function that records each call's keys."""

    def __init__(self, fail: Exception | None = None, delay: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.fail, self.delay = fail, delay

    async def __call__(self, keys: list[str]) -> list[str | None]:
        self.calls.append(keys)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [None if key.startswith("missing") else key.upper() for key in keys]


async def test_reads_asked_for_at_once_are_one_read_each_caller_its_own_answer():
    reads = Reads()
    batched = Batched(reads)
    answers = await asyncio.gather(*(batched.get(key) for key in
                                     ["a", "b", "a", "missing-c", "d"]))
    assert answers == ["A", "B", "A", None, "D"]
    assert reads.calls == [["a", "b", "a", "missing-c", "d"]]


async def test_reads_asked_for_one_after_another_are_separate_reads():
    reads = Reads()
    batched = Batched(reads)
    assert await batched.get("a") == "A"
    assert await batched.get("b") == "B"
    assert reads.calls == [["a"], ["b"]]


async def test_more_callers_than_the_limit_start_another_read():
    reads = Reads()
    batched = Batched(reads, limit=3)
    keys = [f"k{i}" for i in range(7)]
    assert await asyncio.gather(*(batched.get(key) for key in keys)) == \
        [key.upper() for key in keys]
    assert reads.calls == [keys[0:3], keys[3:6], keys[6:7]]


async def test_a_failed_read_fails_each_of_its_callers_and_not_the_next_read():
    reads = Reads(fail=RuntimeError("the database is gone"))
    batched = Batched(reads)
    results = await asyncio.gather(batched.get("a"), batched.get("b"), return_exceptions=True)
    assert [str(result) for result in results] == ["the database is gone"] * 2
    reads.fail = None
    assert await batched.get("a") == "A"


async def test_a_caller_that_gives_up_does_not_disturb_the_others():
    reads = Reads(delay=0.05)
    batched = Batched(reads)
    leaving = asyncio.ensure_future(batched.get("a"))
    staying = asyncio.ensure_future(batched.get("b"))
    await asyncio.sleep(0.01)  # the read is on its way
    leaving.cancel()
    assert await staying == "B"
    with pytest.raises(asyncio.CancelledError):
        await leaving
    # Callers that all gave up before the read went out cost no read.
    gone = [asyncio.ensure_future(batched.get("c")) for _ in range(2)]
    for caller in gone:
        caller.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert reads.calls == [["a", "b"]]


async def test_closing_waits_for_the_reads_asked_for_sent_or_not():
    reads = Reads(delay=0.05)
    batched = Batched(reads)
    sent = asyncio.ensure_future(batched.get("a"))
    for _ in range(10):  # a few turns of the loop: the caller asks, the read is sent
        await asyncio.sleep(0)
    assert reads.calls == [["a"]]  # and waits
    await batched.close()
    assert sent.result() == "A"
    unsent = asyncio.ensure_future(batched.get("b"))
    await asyncio.sleep(0)  # the caller asks; its read goes out on the loop's next turn
    assert reads.calls == [["a"]]
    await batched.close()
    assert unsent.result() == "B"
    assert reads.calls == [["a"], ["b"]]


async def test_giving_up_on_closing_cancels_no_callers_read():
    reads = Reads(delay=0.1)
    batched = Batched(reads)
    caller = asyncio.ensure_future(batched.get("a"))
    for _ in range(10):
        await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batched.close(), 0.01)
    assert await caller == "A"


async def test_reads_asked_for_while_the_cap_is_out_go_out_together_when_one_is_back():
    reads = Reads(delay=0.05)
    capped, uncapped = Batched(reads, in_flight=1), Batched(Reads(delay=0.05))
    for batched in (capped, uncapped):
        first = asyncio.ensure_future(batched.get("a"))
        for _ in range(5):  # the first read is out
            await asyncio.sleep(0)
        later = []
        for key in ("b", "c"):  # each in a turn of its own
            later.append(asyncio.ensure_future(batched.get(key)))
            for _ in range(5):
                await asyncio.sleep(0)
        assert await asyncio.gather(first, *later) == ["A", "B", "C"]
    assert reads.calls == [["a"], ["b", "c"]]
    assert uncapped._run.calls == [["a"], ["b"], ["c"]]  # type: ignore[attr-defined]


async def test_no_more_reads_are_out_at_once_than_the_cap():
    out, most = 0, 0

    async def read(keys: list[str]) -> list[str]:
        nonlocal out, most
        out += 1
        most = max(most, out)
        await asyncio.sleep(0.01)
        out -= 1
        return [key.upper() for key in keys]

    batched = Batched(read, in_flight=2, limit=2)
    keys = [f"k{i}" for i in range(20)]
    callers = []
    for key in keys:  # in turns of their own, and some in the same turn
        callers.append(asyncio.ensure_future(batched.get(key)))
        if len(callers) % 3 == 0:
            await asyncio.sleep(0.002)
    assert await asyncio.gather(*callers) == [key.upper() for key in keys]
    assert most == 2


async def test_a_held_read_is_sent_before_the_callers_of_the_one_back_are_answered():
    events: list[tuple[str, list[str] | str]] = []
    gates = [asyncio.Event(), asyncio.Event()]

    async def read(keys: list[str]) -> list[str]:
        events.append(("sent", keys))
        await gates[len([e for e in events if e[0] == "sent"]) - 1].wait()
        return [key.upper() for key in keys]

    batched = Batched(read, in_flight=1)

    async def caller(key: str) -> None:
        await batched.get(key)
        events.append(("answered", key))

    first = asyncio.ensure_future(caller("a"))
    for _ in range(5):  # "a" is out
        await asyncio.sleep(0)
    held = asyncio.ensure_future(caller("b"))
    for _ in range(5):
        await asyncio.sleep(0)
    gates[0].set()
    for _ in range(5):
        await asyncio.sleep(0)
    # "b" went out before the caller of "a" ran again: it is in the database meanwhile.
    assert events == [("sent", ["a"]), ("sent", ["b"]), ("answered", "a")]
    gates[1].set()
    await asyncio.gather(first, held)
    assert events[-1] == ("answered", "b")


async def test_closing_waits_for_reads_held_back_by_the_cap():
    reads = Reads(delay=0.05)
    batched = Batched(reads, in_flight=1)
    first = asyncio.ensure_future(batched.get("a"))
    for _ in range(5):
        await asyncio.sleep(0)
    held = asyncio.ensure_future(batched.get("b"))
    for _ in range(5):
        await asyncio.sleep(0)
    await batched.close()
    assert (first.result(), held.result()) == ("A", "B")
    assert reads.calls == [["a"], ["b"]]


async def test_callers_of_the_same_key_each_get_a_value_of_their_own():
    async def read(keys: list[str]) -> list[list[str]]:
        return [[key] for key in keys]

    batched = Batched(read)
    first, second, other = await asyncio.gather(batched.get("a"), batched.get("a"),
                                                batched.get("b"))
    assert first == second == ["a"] and other == ["b"]
    first.append("changed by the first caller")
    assert second == ["a"]


async def test_a_read_that_answers_the_wrong_number_of_keys_fails_its_callers():
    async def read(keys: list[str]) -> list[str]:
        return ["only one"]

    batched = Batched(read)
    results = await asyncio.gather(batched.get("a"), batched.get("b"), return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)


# The store, on both backends.

async def _user_with_sessions(core: Core, realm: Realm,
                              count: int) -> tuple[User, list[Session]]:
    user = a_user(realm, email=f"{new_id()}@example.com")
    sessions = [a_session(realm, user) for _ in range(count)]
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
        for session in sessions:
            await tx.sessions.add(session)
    return user, sessions


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The ids of each batched statement the store sends."""
    return recorded_calls(monkeypatch, SessionRepo, "many_with_user")


def _batch_sizes() -> tuple[float, float]:
    """The metric of reads per statement: (statements, reads) so far."""
    metric = "authgate_session_reads_per_statement"
    return (REGISTRY.get_sample_value(f"{metric}_count") or 0.0,
            REGISTRY.get_sample_value(f"{metric}_sum") or 0.0)


async def test_sessions_read_at_once_come_back_each_with_its_user(core: Core, realm: Realm,
                                                                   statements: list[list[str]]):
    ann, ann_sessions = await _user_with_sessions(core, realm, 20)
    bob, bob_sessions = await _user_with_sessions(core, realm, 5)
    async with core.store.transaction(write=True) as tx:
        await tx.sessions.revoke(bob_sessions[0].id, utcnow(), "signed_out")
    # Ids no session has, one longer than any id and one PostgreSQL cannot even compare,
    # read with the others: they find nothing and fail nothing.
    strangers = ["no-such-session", "x" * 300, "nul\x00id"]
    wanted = [s.id for s in ann_sessions + bob_sessions] + strangers
    before = _batch_sizes()
    found = await asyncio.gather(*(core.store.session_with_user(i) for i in wanted))
    for session_id, answer in zip(wanted, found):
        if session_id in strangers:
            assert answer is None
            continue
        assert answer is not None
        session, user = answer
        assert session.id == session_id
        assert user.id == session.user_id == (ann.id if user.id == ann.id else bob.id)
        assert (session.revoked_at is not None) == (session_id == bob_sessions[0].id)
    assert len(statements) == 1 and set(statements[0]) == set(wanted)  # one statement
    # Operators see how many reads share a statement.
    assert _batch_sizes() == (before[0] + 1, before[1] + len(wanted))


async def test_a_session_revoked_before_the_read_is_seen_revoked(core: Core, realm: Realm):
    _, sessions = await _user_with_sessions(core, realm, 3)
    first = await asyncio.gather(*(core.store.session_with_user(s.id) for s in sessions))
    assert all(found is not None and found[0].revoked_at is None for found in first)
    async with core.store.transaction(write=True) as tx:
        await tx.sessions.revoke(sessions[1].id, utcnow(), "signed_out")
    again = await asyncio.gather(*(core.store.session_with_user(s.id) for s in sessions))
    assert [found[0].revoked_at is not None for found in again if found] == [False, True, False]


async def test_callers_of_one_session_hold_their_own_copies(core: Core, realm: Realm):
    _, (session,) = await _user_with_sessions(core, realm, 1)
    first, second = await asyncio.gather(core.store.session_with_user(session.id),
                                         core.store.session_with_user(session.id))
    assert first is not None and second is not None
    assert first == second
    first[0].amr.append("changed")
    first[1].roles.append("changed")
    assert second[0].amr == ["pwd"] and second[1].roles == []


async def test_ids_no_session_can_have_find_nothing_and_fail_nothing(core: Core, realm: Realm):
    _, sessions = await _user_with_sessions(core, realm, 2)
    real = sessions[0].id
    strangers = [real + "x", real.upper(), "\ud800" + real[1:], real[:-1] + "\u00e9", ""]
    found = await asyncio.gather(*(core.store.session_with_user(i)
                                   for i in [*strangers, *(s.id for s in sessions)]))
    assert found[:len(strangers)] == [None] * len(strangers)
    assert [answer[0].id for answer in found[len(strangers):]] == [s.id for s in sessions]


async def test_a_read_whose_connection_is_lost_is_sent_again(tmp_path: Path):
    """PostgreSQL: the backend running a batched read is terminated; every caller still gets
    its session (the read is sent once more, on another connection)."""
    async with core_on_postgres(tmp_path) as (core, realm, url):
        _, sessions = await _user_with_sessions(core, realm, 30)
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            async with holding(url) as locker:
                await locker.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
                callers = [asyncio.ensure_future(core.store.session_with_user(s.id))
                           for s in sessions]
                # The read reaches the lock and waits on it: one statement for all thirty.
                waiting = await waiting_on_locks(admin, url, 1)
                assert len(waiting) == 1
                await admin.execute("SELECT pg_terminate_backend($1)", waiting[0])
                await asyncio.sleep(0.1)
            found = await asyncio.wait_for(asyncio.gather(*callers), 10)
        finally:
            await admin.close()
    assert [answer[0].id for answer in found] == [s.id for s in sessions]


# Through the API.

async def test_concurrent_bearer_requests_each_get_their_own_answer(client, core, realm,
                                                                    statements):
    signed = [await signed_in(client, realm) for _ in range(6)]
    out = await client.post(realm_url(realm, "/signout"), headers=bearer(signed[2][1]))
    assert out.status_code == 204
    answers = await asyncio.gather(*(client.get(realm_url(realm, "/userinfo"),
                                                headers=bearer(tokens))
                                     for _, tokens in signed for _ in range(3)))
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200] * 6 + [401] * 3 + [200] * 9
    subjects = [answer.json()["sub"] for answer in answers if answer.status_code == 200]
    expected = [tokens["access_token"] for i, (_, tokens) in enumerate(signed) if i != 2]
    assert subjects == [jwt.decode(token, options={"verify_signature": False})["sub"]
                        for token in expected for _ in range(3)]
    assert 1 <= len(statements) < len(answers)
