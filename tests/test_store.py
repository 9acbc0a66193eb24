"""The storage contract, run on SQLite and PostgreSQL alike (one suite, both backends)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from authgate.core.engine import Core
from authgate.core.models import (
    OutboxMail,
    Realm,
    RefreshToken,
    Session,
    ThrottleState,
    User,
    utcnow,
)
from authgate.core.ports import Conflict
from authgate.crypto.tokens import digest, new_id, new_token


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
    user = a_user(realm, email="rt@example.com", custom_attributes={"plan": "pro", "seats": 3,
                                                                     "tags": ["a", "b"]},
                  roles=["admin"])
    async with core.store.transaction(write=True) as tx:
        await tx.users.add(user)
    async with core.store.transaction() as tx:
        loaded = await tx.users.get(user.id)
    assert loaded is not None
    assert loaded.custom_attributes == {"plan": "pro", "seats": 3, "tags": ["a", "b"]}
    assert loaded.roles == ["admin"]
    assert loaded.created_at == user.created_at
    assert loaded.created_at.tzinfo is not None


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
