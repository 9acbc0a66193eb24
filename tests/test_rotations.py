"""Refreshes' rotations asked for at once: on PostgreSQL one statement for all of them, on
SQLite one write transaction (store/batch.py, ``RefreshTokenRepo.rotate_live_many``); each
still all or nothing by itself, each caller with its own answer."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Realm, RefreshToken, Rotation, utcnow
from authgate.core.ports import StoreUnavailable
from authgate.crypto.tokens import digest, new_id, new_token
from authgate.store import db
from authgate.store import tables as t
from authgate.store.repositories import RefreshTokenRepo
from tests.conftest import PG_ADMIN_DSN, core_on_postgres, holding, realm_url, recorded_calls
from tests.conftest import waiting_on_locks
from tests.test_native_api import signed_in
from tests.test_store import _live_token, a_rotation, a_session


def _rotation(core: Core, realm: Realm, token_hash: str, **event: Any) -> Rotation:
    """A rotation whose sealed successor names its token: each parent's can be told apart."""
    return a_rotation(core, realm, token_hash, successor_enc=b"sealed " + token_hash.encode(),
                      **event)


async def _many(core: Core, rotations: list[Rotation]) -> list[Any]:
    async with core.store.transaction(write=True, single=True) as tx:
        return await tx.refresh_tokens.rotate_live_many(rotations)


def _rotation_sizes() -> tuple[float, float]:
    """The metric of rotations per statement: (statements, rotations) so far."""
    metric = "authgate_refresh_rotations_per_statement"
    return (REGISTRY.get_sample_value(f"{metric}_count") or 0.0,
            REGISTRY.get_sample_value(f"{metric}_sum") or 0.0)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[list[Rotation]]:
    """The rotations of each list the store sends."""
    return recorded_calls(monkeypatch, RefreshTokenRepo, "rotate_live_many")


async def test_a_list_of_rotations_rotates_each_live_token_and_nothing_else(core: Core,
                                                                            realm: Realm):
    live = [await _live_token(core, realm) for _ in range(4)]
    rotated_before, revoked, disabled = [await _live_token(core, realm) for _ in range(3)]
    other_realm = await core.realms.create(realm.name + "-other")
    elsewhere = await _live_token(core, other_realm)
    now = utcnow()
    async with core.store.transaction(write=True) as tx:
        await tx.refresh_tokens.mark_rotated(rotated_before[2].id, now, new_id(), b"x")
        await tx.sessions.revoke(revoked[1].id, now, "signed_out")
        await tx.users.set_status(disabled[0].id, "disabled", now)
    rotations = [
        _rotation(core, realm, live[0][2].token_hash, asked_as="first"),
        _rotation(core, realm, rotated_before[2].token_hash),
        _rotation(core, realm, live[1][2].token_hash),
        _rotation(core, realm, digest(new_token())),  # no such token
        _rotation(core, realm, revoked[2].token_hash),
        _rotation(core, realm, live[2][2].token_hash),
        _rotation(core, realm, disabled[2].token_hash),
        _rotation(core, realm, elsewhere[2].token_hash),  # a token of another realm
        _rotation(core, realm, live[3][2].token_hash),
        _rotation(core, realm, live[1][2].token_hash),  # asked for twice: the first rotates it
    ]
    rotations[0].event.ip = "192.0.2.1"
    found = await _many(core, rotations)
    rotated_at = [0, 2, 5, 8]
    assert [answer is not None for answer in found] == [i in rotated_at for i in range(10)]
    for at, (user, session, token) in zip(rotated_at, live):
        answer = found[at]
        assert answer is not None
        assert (answer[0].id, answer[1].id, answer[1].email) == (session.id, user.id, user.email)
    async with core.store.transaction() as tx:
        for at, (user, session, token) in zip(rotated_at, live):
            rotation = rotations[at]
            parent = await tx.refresh_tokens.get(token.id)
            successor = await tx.refresh_tokens.get(rotation.successor_id)
            assert parent is not None and parent.rotated_at is not None
            assert (parent.successor_id, parent.successor_enc) == (
                rotation.successor_id, rotation.successor_enc)
            assert successor is not None and successor.rotated_at is None
            assert (successor.session_id, successor.parent_id, successor.token_hash) == (
                session.id, token.id, rotation.successor_hash)
            # Asked for 30 days; each session ends in an hour, and its successor with it.
            assert successor.expires_at == session.expires_at
            touched = await tx.sessions.get(session.id)
            assert touched is not None and touched.last_used_at > session.last_used_at
            events = await tx.audit.recent(realm.id, user_id=user.id)
            assert [(e.type, e.session_id) for e in events] == [
                ("session.refreshed", session.id)]
        first = (await tx.audit.recent(realm.id, user_id=live[0][0].id))[0]
        assert (first.ip, first.data) == ("192.0.2.1", {"asked_as": "first"})
        for at, rotation in enumerate(rotations):  # nothing was stored for the others
            if at not in rotated_at:
                assert await tx.refresh_tokens.get(rotation.successor_id) is None
        for user, _, token in (rotated_before, revoked, disabled, elsewhere):
            unchanged = await tx.refresh_tokens.get(token.id)
            assert unchanged is not None and unchanged.successor_id != rotations[1].successor_id
            assert await tx.audit.recent(None, user_id=user.id, types=("session.refreshed",)) \
                == []


async def test_rotations_asked_for_at_once_go_out_together(core: Core, realm: Realm,
                                                          monkeypatch: pytest.MonkeyPatch):
    live = [await _live_token(core, realm) for _ in range(12)]
    unknown = digest(new_token())
    before = _rotation_sizes()
    out, most = 0, 0
    rotate_many = RefreshTokenRepo.rotate_live_many

    async def counted(self: Any, rotations: Any) -> Any:
        nonlocal out, most
        out += 1
        most = max(most, out)
        try:
            return await rotate_many(self, rotations)
        finally:
            out -= 1

    monkeypatch.setattr(RefreshTokenRepo, "rotate_live_many", counted)
    statements: list[list[Rotation]] = recorded_calls(monkeypatch, RefreshTokenRepo,
                                                      "rotate_live_many")
    rotations = [_rotation(core, realm, token.token_hash) for _, _, token in live]
    found = await asyncio.gather(*(core.store.rotate_live(rotation)
                                   for rotation in [*rotations, _rotation(core, realm, unknown)]))
    assert [answer[0].id if answer else None for answer in found] == [
        *(session.id for _, session, _ in live), None]
    assert most == db.ROTATION_STATEMENTS_IN_FLIGHT == 1
    if core.store.round_trips:  # PostgreSQL: statements of eight at most, one out at a time
        assert [len(sent) for sent in statements] == [db.ROTATIONS_PER_STATEMENT, 5]
        assert _rotation_sizes() == (before[0] + 2, before[1] + 13)
    else:  # SQLite: one write transaction for all of them
        assert [len(sent) for sent in statements] == [13]
        assert _rotation_sizes() == (before[0] + 1, before[1] + 13)


async def test_rotations_are_planned_for_the_tables_as_they_are(tmp_path: Path):
    """PostgreSQL: the rotations' connections keep no generic plan made while the table was
    small, however often they have run a statement (store/db.py); the other connections keep
    PostgreSQL's default."""
    async with core_on_postgres(tmp_path) as (core, realm, _):
        tokens = [await _live_token(core, realm) for _ in range(16)]
        for _, _, token in tokens[:8]:  # one at a time: the one-token statement
            assert await core.store.rotate_live(_rotation(core, realm, token.token_hash))
        for _ in range(7):  # lists (of tokens rotated by the first): the list's statement
            await asyncio.gather(*(core.store.rotate_live(_rotation(core, realm, token.token_hash))
                                   for _, _, token in tokens[8:]))
        async with core.store._rotating() as tx:
            mode = (await tx.conn.execute(text("SHOW plan_cache_mode"))).first()[0]
            prepared = [tuple(row) for row in await tx.conn.execute(text(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%UPDATE refresh_tokens%' "
                "AND statement NOT LIKE '%pg_prepared_statements%'"))]
        async with core.store.transaction() as tx:
            elsewhere = (await tx.conn.execute(text("SHOW plan_cache_mode"))).first()[0]
    assert mode == db.ROTATION_PLAN_CACHE_MODE == "force_custom_plan"
    assert elsewhere == "auto"
    assert len(prepared) == 2, [statement[:60] for statement, _, _ in prepared]
    for statement, generic, custom in prepared:
        assert generic == 0 and custom >= 7, (statement[:60], generic, custom)


async def test_rotations_of_one_token_at_once_rotate_it_once(core: Core, realm: Realm):
    _, _, token = await _live_token(core, realm)
    rotations = [_rotation(core, realm, token.token_hash) for _ in range(5)]
    found = await asyncio.gather(*(core.store.rotate_live(rotation) for rotation in rotations))
    winners = [rotation for rotation, answer in zip(rotations, found) if answer is not None]
    assert len(winners) == 1
    async with core.store.transaction() as tx:
        parent = await tx.refresh_tokens.get(token.id)
        assert parent is not None and parent.successor_id == winners[0].successor_id
        for rotation in rotations:
            stored = await tx.refresh_tokens.get(rotation.successor_id)
            assert (stored is not None) == (rotation is winners[0])


async def test_a_rotation_the_database_refuses_fails_only_its_own_caller(core: Core,
                                                                         realm: Realm):
    """One caller's event holds text no store keeps (a lone surrogate): on PostgreSQL the
    statement for all of them fails and changes nothing, then each is sent alone; on either
    store only that caller fails."""
    live = [await _live_token(core, realm) for _ in range(4)]
    rotations = [_rotation(core, realm, token.token_hash) for _, _, token in live]
    rotations[2].event.user_agent = "agent\ud800"
    found = await asyncio.gather(*(core.store.rotate_live(rotation) for rotation in rotations),
                                 return_exceptions=True)
    assert isinstance(found[2], Exception) and not isinstance(found[2], StoreUnavailable)
    assert [answer[0].id for at, answer in enumerate(found) if at != 2] == [
        session.id for at, (_, session, _) in enumerate(live) if at != 2]
    async with core.store.transaction() as tx:
        refused = await tx.refresh_tokens.get(live[2][2].id)
        assert refused is not None and refused.rotated_at is None
        assert await tx.refresh_tokens.get(rotations[2].successor_id) is None


async def test_lists_of_the_same_tokens_never_wait_for_each_other(tmp_path: Path):
    """PostgreSQL: two statements list the same two tokens, in opposite orders, while a third
    transaction holds one of them. Sent as listed, the first would hold one token and wait for
    the other while the second held that one and waited for the first (a deadlock, one of them
    failed after a second); the repository sends both in the order of the tokens' hashes.
    Each token is rotated once, by whichever statement reached it first."""
    async with core_on_postgres(tmp_path) as (core, realm, url):
        (_, _, x), (_, _, y) = await _live_token(core, realm), await _live_token(core, realm)
        x, y = sorted((x, y), key=lambda token: token.token_hash)
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            async with holding(url) as holder:
                await holder.execute("SELECT 1 FROM refresh_tokens WHERE id = $1 FOR UPDATE",
                                     y.id)
                first = asyncio.ensure_future(_many(core, [
                    _rotation(core, realm, y.token_hash), _rotation(core, realm, x.token_hash)]))
                await waiting_on_locks(admin, url, 1)
                second = asyncio.ensure_future(_many(core, [
                    _rotation(core, realm, x.token_hash), _rotation(core, realm, y.token_hash)]))
                await waiting_on_locks(admin, url, 2)
            found = await asyncio.wait_for(asyncio.gather(first, second), 10)
        finally:
            await admin.close()
    # Both asked for x and y; the first listed reached both first.
    assert [[answer is not None for answer in answers] for answers in found] == [
        [True, True], [False, False]]


async def test_a_list_touches_no_session_another_transaction_holds(tmp_path: Path):
    """PostgreSQL: a user's two sessions are refreshed in one list while another transaction
    holds one of them (signing the user out everywhere updates their sessions one by one).
    The list rotates both tokens without waiting and touches only the session it can take: had
    it waited for the held one while holding the other, the other transaction's next update
    would have closed a cycle (a deadlock: a second, then 503 for every caller of the list)."""
    async with core_on_postgres(tmp_path) as (core, realm, url):
        user, held, held_token = await _live_token(core, realm)
        free = a_session(realm, user)
        free.last_used_at = held.last_used_at
        free_token = RefreshToken(id=new_id(), session_id=free.id,
                                  token_hash=digest(new_token()),
                                  created_at=free.created_at, expires_at=free.expires_at)
        async with core.store.transaction(write=True) as tx:
            await tx.sessions.add(free)
            await tx.refresh_tokens.add(free_token)
        async with holding(url) as holder:
            await holder.execute("UPDATE sessions SET revoked_reason = revoked_reason "
                                 "WHERE id = $1", held.id)
            found = await asyncio.wait_for(_many(core, [
                _rotation(core, realm, held_token.token_hash),
                _rotation(core, realm, free_token.token_hash)]), 5)
            # The other transaction goes on to the session the list touched.
            await asyncio.wait_for(holder.execute(
                "UPDATE sessions SET revoked_reason = revoked_reason WHERE id = $1",
                free.id), 5)
        assert [answer[0].id for answer in found] == [held.id, free.id]
        async with core.store.transaction() as tx:
            untouched, touched = await tx.sessions.get(held.id), await tx.sessions.get(free.id)
            for token in (held_token, free_token):
                rotated = await tx.refresh_tokens.get(token.id)
                assert rotated is not None and rotated.rotated_at is not None
    assert untouched is not None and untouched.last_used_at == held.last_used_at
    assert touched is not None and touched.last_used_at > free.last_used_at


async def test_rotations_made_before_the_database_went_away_keep_their_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """PostgreSQL: the list is refused for one caller's value, so each rotation is sent
    alone; the database becomes unavailable at the third. The first two were made: their
    callers get their sessions (their tokens are rotated, the successor is theirs alone); the
    rest are told the database is unavailable."""
    async with core_on_postgres(tmp_path) as (core, realm, _):
        live = [await _live_token(core, realm) for _ in range(5)]
        rotations = [_rotation(core, realm, token.token_hash) for _, _, token in live]
        rotations[4].event.user_agent = "agent\ud800"  # refuses the list
        real, sent = RefreshTokenRepo.rotate_live, []

        async def going_away(self: RefreshTokenRepo, rotation: Rotation) -> Any:
            sent.append(rotation)
            if len(sent) == 3:
                raise StoreUnavailable("ConnectionDoesNotExistError")
            return await real(self, rotation)

        monkeypatch.setattr(RefreshTokenRepo, "rotate_live", going_away)
        found = await asyncio.gather(*(core.store.rotate_live(rotation)
                                       for rotation in rotations), return_exceptions=True)
    assert len(sent) == 3  # sent alone after the list was refused
    assert [answer[0].id for answer in found[:2]] == [session.id for _, session, _ in live[:2]]
    assert all(isinstance(answer, StoreUnavailable) for answer in found[2:]), found


# Through the API.

async def test_concurrent_refreshes_each_get_their_own_successor(client, core, realm,
                                                                 statements):
    signed = [await signed_in(client, realm) for _ in range(8)]
    chains = [tokens["refresh_token"] for _, tokens in signed]
    for _ in range(3):
        answers = await asyncio.gather(*(client.post(
            realm_url(realm, "/oauth/token"),
            data={"grant_type": "refresh_token", "refresh_token": token}) for token in chains))
        assert [answer.status_code for answer in answers] == [200] * len(chains)
        successors = [answer.json()["refresh_token"] for answer in answers]
        assert len(set(successors) | set(chains)) == 2 * len(chains)
        chains = successors
    # Every rotated token is now reuse: it revokes its session, and the successor with it.
    reused = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": signed[0][1]["refresh_token"]})
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    refused = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": chains[0]})
    assert refused.status_code == 400
    if core.store.round_trips:
        assert any(len(sent) > 1 for sent in statements), statements


async def _duplicate_held_up(core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch, *,
                             asked_after: float, held: float,
                             session_ttl: timedelta = timedelta(hours=1)) -> Any:
    """A session's token refreshed, then refreshed again ``asked_after`` seconds later and
    held up ``held`` seconds behind the store (a controlled clock): the first answer, and the
    second (or the AuthError it raised)."""
    user, _, _ = await _live_token(core, realm)
    tokens = await core.sessions.start(realm, user, amr=["pwd"])
    async with core.store.transaction(write=True) as tx:
        await tx.conn.execute(t.sessions.update().where(t.sessions.c.id == tokens.session.id)
                              .values(expires_at=utcnow() + session_ttl))
    clock = [utcnow()]
    monkeypatch.setattr(core, "now", lambda: clock[0])
    first = await core.sessions.refresh(realm, tokens.refresh_token)
    real = type(core.store).rotate_live

    async def busy(store: Any, rotation: Rotation) -> Any:
        found = await real(store, rotation)
        clock[0] += timedelta(seconds=held)  # held up behind the store
        return found

    clock[0] += timedelta(seconds=asked_after)
    monkeypatch.setattr(type(core.store), "rotate_live", busy)
    try:
        second: Any = await core.sessions.refresh(realm, tokens.refresh_token)
    except AuthError as exc:
        second = exc
    return tokens, first, second


async def test_a_refresh_asked_for_past_the_grace_window_is_reuse(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """The other side of the window: asked for eleven seconds after the rotation (a ten-second
    window), the token is reuse, whatever the store's speed, and the session ends."""
    tokens, _, second = await _duplicate_held_up(core, realm, monkeypatch, asked_after=11,
                                                 held=0)
    assert isinstance(second, AuthError) and second.code == ErrorCode.REFRESH_TOKEN_REUSED
    async with core.store.transaction() as tx:
        ended = await tx.sessions.get(tokens.session.id)
    assert ended is not None and ended.revoked_at is not None


async def test_a_refresh_held_up_until_its_session_expired_is_refused(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """Asked for within the window, but the session expired while the refresh waited: expiry
    is judged when the refresh is checked, so no successor, no new access token."""
    _, _, second = await _duplicate_held_up(core, realm, monkeypatch, asked_after=1, held=11,
                                            session_ttl=timedelta(seconds=5))
    assert isinstance(second, AuthError) and second.code == ErrorCode.TOKEN_EXPIRED


async def test_a_refresh_held_up_past_the_grace_window_is_judged_by_when_it_was_asked(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """Two refreshes of one token, the second asked for a second after the first rotated it
    (within the ten-second grace window), then held up eleven seconds behind a busy store.
    It is the concurrent refresh it was when asked: it gets the same successor, and the
    session lives. (Judged by when it reached the check, it was reuse, and ended the
    session.)"""
    tokens, first, second = await _duplicate_held_up(core, realm, monkeypatch, asked_after=1,
                                                     held=11)
    assert second.refresh_token == first.refresh_token
    async with core.store.transaction() as tx:
        live = await tx.sessions.get(tokens.session.id)
    assert live is not None and live.revoked_at is None


async def test_refresh_tokens_are_keyed_by_ids_in_the_order_they_were_made(core: Core,
                                                                          realm: Realm):
    """Time-ordered (version 7) ids: each refresh's row goes to the end of the key's index."""
    user, _, _ = await _live_token(core, realm)
    raw = (await core.sessions.start(realm, user, amr=["pwd"])).refresh_token
    for _ in range(3):
        raw = (await core.sessions.refresh(realm, raw)).refresh_token
    async with core.store.transaction() as tx:
        first = await tx.refresh_tokens.by_hash(digest(raw))
        assert first is not None
        chain = await tx.refresh_tokens._all(session_id=first.session_id, order_by="created_at")
    ids = [uuid.UUID(stored.id) for stored in chain]
    assert len(ids) == 4 and all(i.version == 7 for i in ids)
    made = [i.int >> 80 for i in ids]  # the milliseconds each was made in, first
    assert made == sorted(made)
    assert all(abs(ms / 1000 - stored.created_at.timestamp()) < 1
               for ms, stored in zip(made, chain))
