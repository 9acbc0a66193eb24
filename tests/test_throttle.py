"""Throttling per login id and per address, the remembered-device exception, and keys
withdrawn from the JWKS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from authgate.core.engine import Core
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, Realm
from authgate.core.users import NewUser
from tests.conftest import MASTER, PASSWORD, unique_email


@pytest.fixture
async def strict(core: Core) -> AsyncIterator[Core]:
    """A second core over the same store, with low limits (as another node could be set)."""
    settings = core.settings.model_copy(update={"throttle_ip_free_attempts": 3,
                                                "throttle_free_attempts": 2,
                                                "throttle_guest_free_attempts": 3})
    other = Core(settings, core.store, _master())
    yield other
    other.hasher.close()


def _master() -> bytes:
    import base64

    return base64.urlsafe_b64decode(MASTER + "=" * (-len(MASTER) % 4))


async def _fail(core: Core, realm: Realm, login_id: str, ip: str) -> ErrorCode:
    with pytest.raises(AuthError) as raised:
        await core.signin.password(realm, login_id, "definitely wrong", ClientInfo(ip=ip))
    return raised.value.code


async def test_failures_from_one_address_throttle_every_login_id_from_it(strict: Core,
                                                                         realm: Realm):
    email = unique_email()
    await strict.users.create(realm, NewUser(email=email, password=PASSWORD))
    for _ in range(3):  # three different, unknown login ids from one address
        assert await _fail(strict, realm, unique_email(), "198.51.100.7") is \
            ErrorCode.INVALID_CREDENTIALS
    with pytest.raises(AuthError) as raised:
        await strict.signin.password(realm, email, PASSWORD, ClientInfo(ip="198.51.100.7"))
    assert raised.value.code is ErrorCode.TOO_MANY_ATTEMPTS and raised.value.retry_after >= 1
    # Another address is not affected.
    other = ClientInfo(ip="198.51.100.8")
    user = (await strict.signin.password(realm, email, PASSWORD, other)).user
    assert user.email == email


async def test_ipv6_addresses_are_counted_by_their_64_block(strict: Core, realm: Realm):
    """One subscriber's /64 holds 2**64 addresses: rotating through them does not reset the
    address's count. Another /64 is counted apart; an IPv4-mapped address as its IPv4."""
    email = unique_email()
    await strict.users.create(realm, NewUser(email=email, password=PASSWORD))
    for address in ("2001:db8:7:42::1", "2001:db8:7:42::2",  # three addresses of one /64
                    "2001:db8:7:42:abcd:ef01:2345:6789"):
        assert await _fail(strict, realm, unique_email(), address) is \
            ErrorCode.INVALID_CREDENTIALS
    with pytest.raises(AuthError) as raised:
        await strict.signin.password(realm, email, PASSWORD, ClientInfo(ip="2001:db8:7:42::99"))
    assert raised.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    neighbour = ClientInfo(ip="2001:db8:7:43::1")
    assert (await strict.signin.password(realm, email, PASSWORD, neighbour)).user.email == email

    for _ in range(3):
        await _fail(strict, realm, unique_email(), "::ffff:198.51.100.77")
    with pytest.raises(AuthError) as mapped:
        await strict.signin.password(realm, email, PASSWORD, ClientInfo(ip="198.51.100.77"))
    assert mapped.value.code is ErrorCode.TOO_MANY_ATTEMPTS


@pytest.mark.parametrize(("address", "counted_as"), [
    ("2001:db8:7:42::1", "2001:db8:7:42::/64"),
    ("::ffff:198.51.100.7", "198.51.100.7"),
    ("64:ff9b::c633:6401", "198.51.100.1"),  # NAT64/SIIT: the IPv4 client behind it
    ("2002:c633:6401:ffff::1", "198.51.100.1"),  # 6to4: one IPv4 address, 65,536 /64s
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # Teredo: the client's address
    ("::1", "::1"),
    ("198.51.100.7", "198.51.100.7"),
    ("not an address", "not an address"),
])
def test_an_address_is_counted_as_its_block(address: str, counted_as: str):
    from authgate.core.throttle import address_block

    assert address_block(address) == counted_as


async def test_clients_behind_one_nat64_prefix_are_counted_apart(strict: Core, realm: Realm):
    email = unique_email()
    await strict.users.create(realm, NewUser(email=email, password=PASSWORD))
    for _ in range(3):
        await _fail(strict, realm, unique_email(), "64:ff9b::c633:6401")
    other = ClientInfo(ip="64:ff9b::cb00:7105")
    assert (await strict.signin.password(realm, email, PASSWORD, other)).user.email == email


async def test_guesses_sent_at_once_are_throttled_as_if_sent_in_turn(strict: Core, realm: Realm):
    """Each attempt is counted before its password is checked, so of many sent together only
    the free ones are checked at all."""
    import asyncio

    email = unique_email()
    await strict.users.create(realm, NewUser(email=email, password=PASSWORD))

    async def guess() -> ErrorCode:
        try:
            await strict.signin.password(realm, email, "definitely wrong", ClientInfo())
        except AuthError as refused:
            return refused.code
        raise AssertionError("a wrong password was accepted")

    codes = await asyncio.gather(*(guess() for _ in range(20)))
    free = strict.settings.throttle_free_attempts
    assert codes.count(ErrorCode.INVALID_CREDENTIALS) == free
    assert codes.count(ErrorCode.TOO_MANY_ATTEMPTS) == 20 - free


async def test_concurrent_attempts_lose_no_count(core: Core, realm: Realm):
    import asyncio

    key = core.throttle.scoped_key("test", unique_email(), 1000)
    await asyncio.gather(*(core.throttle.attempt([key]) for _ in range(12)))
    await asyncio.gather(*(core.throttle.spend([key]) for _ in range(7)))
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert state is not None and state.pending == 12 and state.failures == 7


async def test_a_counter_is_replaced_only_if_none_of_the_set_changed(core: Core, realm: Realm):
    """The compare-and-set of the unlocked admission writes every counter or none."""
    from dataclasses import replace

    first = core.throttle.scoped_key("test", unique_email(), 10)
    second = core.throttle.scoped_key("test", unique_email(), 10)
    await core.throttle.attempt([first, second])  # both exist, pending 1
    async with core.store.transaction() as tx:
        read = await tx.throttle.read_many([first.key, second.key])
    assert [state.pending for state in read] == [1, 1]
    bumped = [replace(state, pending=5, failures=2) for state in read]
    await core.throttle.attempt([second])  # the second changes meanwhile (pending 2)
    async with core.store.transaction(write=True, single=True) as tx:
        assert not await tx.throttle.replace_if_unchanged(read, bumped)
    async with core.store.transaction() as tx:
        now = await tx.throttle.read_many([first.key, second.key])
    assert [(state.pending, state.failures) for state in now] == [(1, 0), (2, 0)]
    async with core.store.transaction(write=True, single=True) as tx:  # now as read
        assert await tx.throttle.replace_if_unchanged(now, [replace(state, pending=4)
                                                            for state in now])
    async with core.store.transaction() as tx:
        states = await tx.throttle.read_many([second.key, "absent", first.key])
    assert [state.pending if state else None for state in states] == [4, None, 4]


async def _interfering(core: Core, monkeypatch: pytest.MonkeyPatch, changes: int,
                       change: Any) -> tuple[list[bool], list[bool]]:
    """The first ``changes`` reads of counters by an admission each followed by ``change``
    (another attempt's work), and whether the locking path ran."""
    from authgate.store.repositories import ThrottleRepo

    read_many, lock_many = ThrottleRepo.read_many, ThrottleRepo.lock_many
    interfered: list[bool] = []
    locked: list[bool] = []
    busy = False  # while the other attempt runs: its own statements are not disturbed

    async def read_then_change(self: ThrottleRepo, keys: list[str]) -> list:
        nonlocal busy
        found = await read_many(self, keys)
        if not busy and len(interfered) < changes:
            busy = True
            try:
                interfered.append(True)
                await change()
            finally:
                busy = False
        return found

    async def counted(self: ThrottleRepo, *args: object, **kwargs: object) -> object:
        if not busy:
            locked.append(True)
        return await lock_many(self, *args, **kwargs)

    monkeypatch.setattr(ThrottleRepo, "read_many", read_then_change)
    monkeypatch.setattr(ThrottleRepo, "lock_many", counted)
    return interfered, locked


async def test_an_admission_on_a_counter_that_gained_pending_attempts_meanwhile_is_written(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """Another attempt admitted between the read and the write changes the pending count,
    not what decides: the admission is written on what the counter holds then, once, with
    no second read and no lock. Made to run on both stores."""
    monkeypatch.setattr(core.store, "round_trips", True)
    key = core.throttle.scoped_key("test", unique_email(), 1000)
    await core.throttle.attempt([key])  # the counter exists, one attempt pending
    interfered, locked = await _interfering(core, monkeypatch, 2,
                                            lambda: core.throttle.attempt([key]))
    await core.throttle.attempt([key])
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert (len(interfered), locked) == (1, [])
    assert (state.pending, state.failures) == (3, 0)


async def test_an_admission_over_the_allowance_by_then_is_decided_again(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """A key that allows two at once, with one pending when read and two by the write: the
    admission is not written, and decided again it is refused (retry in a second), with
    nothing counted."""
    monkeypatch.setattr(core.store, "round_trips", True)
    key = core.throttle.scoped_key("test", unique_email(), 2)
    await core.throttle.attempt([key])
    interfered, _ = await _interfering(core, monkeypatch, 1,
                                       lambda: core.throttle.attempt([key]))
    with pytest.raises(AuthError) as refused:
        await core.throttle.attempt([key])
    assert refused.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert (state.pending, state.failures) == (2, 0)


async def test_an_admission_on_a_counter_emptied_meanwhile_starts_its_window(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """The other pending attempt ends well between the read and the write: the counter is
    empty, and an attempt on an empty counter starts its window, so the admission is
    decided again on what the counter holds and written whole."""
    from datetime import timedelta

    from authgate.core.models import ThrottleState, utcnow

    monkeypatch.setattr(core.store, "round_trips", True)
    key = core.throttle.scoped_key("test", unique_email(), 1000)
    long_ago = utcnow() - timedelta(seconds=core.settings.throttle_window - 2)
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(ThrottleState(key=key.key, failures=0, window_started_at=long_ago,
                                             pending=1,
                                             pending_until=utcnow() + timedelta(seconds=60)))

    async def ended_well() -> None:
        async with core.store.transaction(write=True, single=True) as tx:
            await core.throttle.succeeded(tx, key)

    interfered, locked = await _interfering(core, monkeypatch, 1, ended_well)
    await core.throttle.attempt([key])
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert (len(interfered), locked) == (1, [])
    assert state.pending == 1
    assert state.window_started_at > utcnow() - timedelta(seconds=5)


async def test_an_admission_on_attempts_that_lapsed_meanwhile_forgets_them(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """Pending attempts whose lease has lapsed by the time the admission is decided (a
    crashed node's, written with its own clock) are forgotten, not counted on."""
    from datetime import timedelta

    from authgate.core.models import ThrottleState, utcnow

    monkeypatch.setattr(core.store, "round_trips", True)
    key = core.throttle.scoped_key("test", unique_email(), 1000)
    await core.throttle.attempt([key])
    read: list[ThrottleState] = []

    async def lapsed() -> None:
        async with core.store.transaction() as tx:
            state = await tx.throttle.get(key.key)
        read.append(state)
        async with core.store.transaction(write=True) as tx:
            await tx.throttle.save(ThrottleState(
                key=key.key, failures=state.failures, window_started_at=state.window_started_at,
                pending=3, pending_until=utcnow() - timedelta(seconds=1)))

    await _interfering(core, monkeypatch, 1, lapsed)
    await core.throttle.attempt([key])
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert read and state.pending == 1


@pytest.mark.parametrize("changes", [1, 2])
async def test_an_admission_decided_on_a_counter_changed_meanwhile_is_decided_again(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch, changes: int):
    """Where the store's statements are round trips the admission reads the counters without
    a lock and writes its decision only if what decides did not change; a failure counted
    between the two (another node's) has it decided once more without a lock, and a second
    one sends it to the locking path. Nothing is lost or counted twice. Made to run on both
    stores."""
    monkeypatch.setattr(core.store, "round_trips", True)
    key = core.throttle.scoped_key("test", unique_email(), 1000)
    await core.throttle.attempt([key])  # the counter exists: the unlocked path applies
    interfered, locked = await _interfering(core, monkeypatch, changes,
                                            lambda: core.throttle.spend([key]))
    await core.throttle.attempt([key])
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert len(interfered) == changes
    assert (state.pending, state.failures) == (2, changes)
    assert bool(locked) is (changes == 2)


async def test_an_unlocked_admission_refuses_without_writing(strict: Core, realm: Realm,
                                                             monkeypatch: pytest.MonkeyPatch):
    """A blocked key is refused on what the unlocked read shows; nothing is counted."""
    from authgate.store.repositories import ThrottleRepo

    monkeypatch.setattr(strict.store, "round_trips", True)
    key = strict.throttle.scoped_key("test", unique_email(), 1)
    await strict.throttle.spend([key])  # one failure on a key that allows one: blocked
    async with strict.store.transaction() as tx:
        before = await tx.throttle.get(key.key)

    async def no_lock(*args: object, **kwargs: object) -> None:
        raise AssertionError("the locking path ran")

    monkeypatch.setattr(ThrottleRepo, "lock_many", no_lock)
    with pytest.raises(AuthError) as refused:
        await strict.throttle.attempt([key])
    assert refused.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    async with strict.store.transaction() as tx:
        assert await tx.throttle.get(key.key) == before


async def test_postgresql_admits_by_compare_and_set_and_sqlite_by_its_locking_write(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """An attempt on counters that exist takes no lock where statements are round trips."""
    from authgate.store.repositories import ThrottleRepo

    key = core.throttle.scoped_key("test", unique_email(), 10)
    await core.throttle.attempt([key])  # makes the counter
    lock_many, locked = ThrottleRepo.lock_many, []

    async def counted(self: ThrottleRepo, *args: object, **kwargs: object) -> object:
        locked.append(True)
        return await lock_many(self, *args, **kwargs)

    monkeypatch.setattr(ThrottleRepo, "lock_many", counted)
    await core.throttle.attempt([key])
    assert bool(locked) is (core.settings.database_url.startswith("sqlite"))
    async with core.store.transaction() as tx:
        assert (await tx.throttle.get(key.key)).pending == 2


async def test_attempts_resolved_at_random_at_once_keep_every_count(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """Attempts on a login id and a shared address, admitted while others fail, succeed or
    end otherwise: every pending attempt is taken back, every failure counted once. The
    unlocked admission runs on both stores."""
    import asyncio
    import random

    monkeypatch.setattr(core.store, "round_trips", True)
    owner = core.throttle.scoped_key("test", unique_email(), 100_000)
    shared = core.throttle.scoped_key("test", unique_email(), 100_000)
    failures = 0

    async def one(seed: int) -> None:
        nonlocal failures
        chance = random.Random(seed)
        await asyncio.sleep(chance.random() * 0.05)
        try:
            async with core.throttle.attempting([owner, shared]) as attempt:
                await asyncio.sleep(chance.random() * 0.005)
                ending = chance.random()
                if ending < 0.45:
                    async with core.store.transaction(write=True) as tx:
                        await attempt.failed(tx)
                    failures += 1
                elif ending < 0.9:
                    async with core.store.transaction(write=True, single=True) as tx:
                        await attempt.succeeded(tx)
                else:
                    raise LookupError("the check broke")  # released
        except LookupError:
            pass

    await asyncio.gather(*(one(seed) for seed in range(80)))
    async with core.store.transaction() as tx:
        mine, theirs = await tx.throttle.get(owner.key), await tx.throttle.get(shared.key)
    assert (mine.pending, theirs.pending) == (0, 0)
    assert theirs.failures == failures  # an address keeps its failures


async def test_concurrent_successes_and_failures_lose_no_count(core: Core, realm: Realm):
    """A success takes its attempt back in one statement, without the lock the others take
    first: none of the changes made at the same time is lost."""
    import asyncio

    owner = core.throttle.scoped_key("test", unique_email(), 1000)
    shared = core.throttle.scoped_key("test", unique_email(), 1000)
    await asyncio.gather(*(core.throttle.attempt([owner, shared]) for _ in range(12)))

    async def succeed() -> None:
        async with core.store.transaction(write=True, single=True) as tx:
            await core.throttle.succeeded(tx, owner, [shared])

    await asyncio.gather(*(succeed() for _ in range(5)),
                         *(core.throttle.spend([shared]) for _ in range(7)))
    async with core.store.transaction() as tx:
        mine, theirs = await tx.throttle.get(owner.key), await tx.throttle.get(shared.key)
    assert (mine.pending, mine.failures) == (7, 0)
    assert (theirs.pending, theirs.failures) == (7, 7)  # the address keeps its failures


async def test_a_success_clears_the_login_id_and_forgets_lapsed_attempts(core: Core,
                                                                         realm: Realm):
    from datetime import timedelta

    from authgate.core.models import ThrottleState, utcnow

    owner = core.throttle.scoped_key("test", unique_email(), 3)
    shared = core.throttle.scoped_key("test", unique_email(), 3)
    now = utcnow()
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(
            ThrottleState(key=owner.key, failures=4, window_started_at=now, pending=2,
                          pending_until=now + timedelta(seconds=60),
                          blocked_until=now + timedelta(seconds=30)),
            ThrottleState(key=shared.key, failures=4, window_started_at=now, pending=5,
                          pending_until=now - timedelta(seconds=1),
                          blocked_until=now + timedelta(seconds=30)))
    async with core.store.transaction(write=True, single=True) as tx:
        await core.throttle.succeeded(tx, owner, [shared])
    async with core.store.transaction() as tx:
        mine, theirs = await tx.throttle.get(owner.key), await tx.throttle.get(shared.key)
    assert (mine.pending, mine.failures, mine.blocked_until) == (1, 0, None)
    # The address's attempts had lapsed: all of them are gone; its failures and block stay.
    assert (theirs.pending, theirs.failures) == (0, 4) and theirs.blocked_until is not None
    await core.throttle.attempt([owner])  # no longer blocked


async def test_an_emptied_counter_starts_a_new_window(strict: Core, realm: Realm):
    """A counter a success left at zero counts failures in a window that starts at the next
    attempt, as a new counter would."""
    from datetime import timedelta

    from authgate.core.models import ThrottleState, utcnow

    key = strict.throttle.scoped_key("test", unique_email(), 2)
    long_ago = utcnow() - timedelta(seconds=strict.settings.throttle_window - 1)
    async with strict.store.transaction(write=True) as tx:
        await tx.throttle.save(ThrottleState(key=key.key, failures=0,
                                             window_started_at=long_ago))
    await strict.throttle.attempt([key])
    async with strict.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert state.window_started_at > utcnow() - timedelta(seconds=5)


async def test_right_and_wrong_passwords_at_once_never_deadlock(core: Core, realm: Realm):
    """A success settles its counters in the order a new attempt locks them (key order), not
    in the order the table happens to be scanned: 180 sign-ins of one user from one address,
    right and wrong at once, all get an answer of their own."""
    import asyncio
    from collections import Counter

    settings = core.settings.model_copy(update={"throttle_ip_free_attempts": 100_000,
                                                "throttle_free_attempts": 100_000})
    loose = Core(settings, core.store, _master())
    try:
        email = unique_email()
        await loose.users.create(realm, NewUser(email=email, password=PASSWORD))
        here = ClientInfo(ip="198.51.100.9")
        # The login id's counter made first, so a scan in table order meets it first, while
        # key order puts the address's ("ip:...") first.
        keys = loose.signin._throttle_keys(realm, email, here)
        for key in keys:
            async with loose.store.transaction(write=True) as tx:
                await tx.throttle.lock_many([key.key], loose.now())

        async def sign_in(right: bool) -> str:
            try:
                await loose.signin.password(realm, email, PASSWORD if right else "wrong guess",
                                            here)
            except AuthError as refused:
                return refused.code.value
            return "ok"

        answers: Counter[str] = Counter()
        for _ in range(3):
            answers.update(await asyncio.gather(*(sign_in(i % 2 == 1) for i in range(60))))
        assert set(answers) <= {"ok", "invalid_credentials"}, answers
        assert answers["ok"] == 90
    finally:
        loose.hasher.close()


async def test_sign_ins_sent_at_once_by_the_owner_block_nothing(strict: Core, realm: Realm):
    """Right passwords over the allowance are told to retry in a second; they are not
    failures, and the login id is not blocked."""
    import asyncio

    email = unique_email()
    await strict.users.create(realm, NewUser(email=email, password=PASSWORD))

    async def sign_in() -> ErrorCode | None:
        try:
            await strict.signin.password(realm, email, PASSWORD, ClientInfo())
        except AuthError as refused:
            assert refused.retry_after == 1
            return refused.code
        return None

    answers = await asyncio.gather(*(sign_in() for _ in range(8)))
    assert answers.count(None) >= strict.settings.throttle_free_attempts
    assert set(answers) <= {None, ErrorCode.TOO_MANY_ATTEMPTS}
    assert (await strict.signin.password(realm, email, PASSWORD, ClientInfo())).user.email == email
    async with strict.store.transaction() as tx:  # nothing left counted
        state = await tx.throttle.get(strict.throttle.login_key(realm.id, email).key)
    assert (state.pending, state.failures, state.blocked_until) == (0, 0, None)


async def test_attempts_over_the_allowance_wait_without_counting_as_failures(core: Core,
                                                                             realm: Realm):
    key = core.throttle.scoped_key("test", unique_email(), 2)
    await core.throttle.attempt([key])
    await core.throttle.attempt([key])
    with pytest.raises(AuthError) as busy:
        await core.throttle.attempt([key])
    assert busy.value.code is ErrorCode.TOO_MANY_ATTEMPTS and busy.value.retry_after == 1
    async with core.store.transaction() as tx:
        state = await tx.throttle.get(key.key)
    assert (state.pending, state.failures, state.blocked_until) == (2, 0, None)


async def test_an_attempt_that_ends_in_an_error_is_released(core: Core, realm: Realm):
    key = core.throttle.scoped_key("test", unique_email(), 1)
    with pytest.raises(RuntimeError):
        async with core.throttle.attempting([key]):
            raise RuntimeError("the check broke")
    async with core.throttle.attempting([key]) as attempt:  # admitted: nothing is pending
        async with core.store.transaction(write=True) as tx:
            await attempt.succeeded(tx)


async def test_a_pending_attempt_of_a_crashed_process_lapses(core: Core, realm: Realm):
    from datetime import timedelta

    from authgate.core.models import ThrottleState, utcnow

    key = core.throttle.scoped_key("test", unique_email(), 1)
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(ThrottleState(key=key.key, failures=0,
                                             window_started_at=utcnow(), pending=1,
                                             pending_until=utcnow() + timedelta(seconds=60)))
    with pytest.raises(AuthError) as busy:
        await core.throttle.attempt([key])
    assert busy.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(ThrottleState(key=key.key, failures=0,
                                             window_started_at=utcnow(), pending=1,
                                             pending_until=utcnow() - timedelta(seconds=1)))
    await core.throttle.attempt([key])


async def test_a_success_takes_its_attempt_back_from_the_address(strict: Core, realm: Realm):
    """Sign-ins that succeed from an address (an office behind one NAT) do not add up to a
    block of that address."""
    email = unique_email()
    await strict.users.create(realm, NewUser(email=email, password=PASSWORD))
    here = ClientInfo(ip="198.51.100.30")
    for _ in range(2):
        assert await _fail(strict, realm, unique_email(), here.ip) is \
            ErrorCode.INVALID_CREDENTIALS
    for _ in range(3):  # the address allows 3 free attempts; these succeed
        assert (await strict.signin.password(realm, email, PASSWORD, here)).user.email == email


async def test_a_login_id_of_any_length_is_throttled_not_failed(core: Core, realm: Realm):
    """Counters are keyed by a digest: "ß" * 200 casefolds to 400 characters."""
    assert await _fail(core, realm, "ß" * 200, "198.51.100.40") is ErrorCode.INVALID_CREDENTIALS
    assert await _fail(core, realm, "x" * 5000, "198.51.100.40") is \
        ErrorCode.INVALID_CREDENTIALS


async def test_a_remembered_device_is_not_locked_out_by_strangers(strict: Core, realm: Realm):
    email = unique_email()
    await strict.users.create(realm, NewUser(email=email, password=PASSWORD))
    user = (await strict.signin.password(realm, email, PASSWORD, ClientInfo(ip="203.0.113.1"))).user
    device = (await strict.devices.sighting(realm, user, None)).device
    for n in range(2):  # strangers, from many addresses, lock the login id itself
        await _fail(strict, realm, email, f"192.0.2.{n}")
    with pytest.raises(AuthError) as raised:
        await strict.signin.password(realm, email, PASSWORD, ClientInfo(ip="192.0.2.50"))
    assert raised.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    # The owner, on the device they used before, still gets in.
    owner = ClientInfo(ip="203.0.113.1", device_key=device.device_key)
    assert (await strict.signin.password(realm, email, PASSWORD, owner)).user.id == user.id


async def test_tokens_of_a_key_withdrawn_from_the_jwks_are_refused(core: Core, realm: Realm):
    from datetime import timedelta

    from authgate.core.models import utcnow

    user = await core.users.create(realm, NewUser(email=unique_email(), password=PASSWORD))
    old = await core.sessions.start(realm, user, amr=["pwd"])
    await core.keys.rotate(realm)
    later = utcnow() + core.keys.max_token_lifetime + timedelta(hours=1)
    future = Core(core.settings, core.store, _master(), clock=lambda: later)
    try:
        with pytest.raises(AuthError) as raised:
            await future.keys.verify(realm, old.access_token, issuer=None, audience=None,
                                     require=())
        assert raised.value.code is ErrorCode.INVALID_TOKEN  # not merely expired
        fresh = await future.sessions.start(realm, user, amr=["pwd"])
        claims = await future.keys.verify(realm, fresh.access_token, issuer=None,
                                          audience=None, require=())
        assert claims["sub"] == user.id
    finally:
        future.hasher.close()


async def test_a_node_stops_trusting_a_withdrawn_key_it_had_cached(core: Core, realm: Realm):
    """A node that verified tokens of a key keeps neither the key nor those tokens past its
    cache period: once another node retired the key and it left the JWKS, a token signed with
    it (here: with the private key, as if leaked) is refused."""
    from datetime import timedelta

    from authgate.core.models import utcnow

    clock = [utcnow()]
    settings = core.settings.model_copy(update={"key_cache_seconds": 0})
    node = Core(settings, core.store, _master(), clock=lambda: clock[0])
    try:
        user = await node.users.create(realm, NewUser(email=unique_email(), password=PASSWORD))
        session = (await node.sessions.start(realm, user, amr=["pwd"])).session
        leaked = await node.keys.signer(realm)
        claims = node.sessions.access_claims(realm, user, session)
        claims["exp"] += 365 * 86_400
        forged = leaked.sign(claims, typ="at+jwt")
        verify = dict(issuer=None, audience=None, require=())
        assert (await node.keys.verify(realm, forged, **verify))["sub"] == user.id
        await core.keys.rotate(realm)  # on another node
        clock[0] = utcnow() + core.keys.max_token_lifetime + timedelta(hours=1)
        with pytest.raises(AuthError) as raised:
            await node.keys.verify(realm, forged, **verify)
        assert raised.value.code is ErrorCode.INVALID_TOKEN
    finally:
        node.hasher.close()


def test_a_retired_key_outlives_the_signers_other_nodes_cached(core: Core):
    settings = core.settings
    longest = max(settings.access_token_ttl, settings.id_token_ttl, settings.refresh_token_ttl,
                  settings.tiledesk_token_ttl, settings.deskera_token_ttl)
    slow = Core(settings.model_copy(update={"key_cache_seconds": 300}), core.store, _master())
    try:
        assert slow.keys.max_token_lifetime.total_seconds() >= longest + 300
    finally:
        slow.hasher.close()


async def test_one_address_cannot_create_guests_without_limit(strict: Core, realm: Realm):
    org = await strict.organisations.create(realm, "guests-welcome")
    here, there = ClientInfo(ip="198.51.100.20"), ClientInfo(ip="198.51.100.21")
    for _ in range(3):
        assert (await strict.org_access.guest(realm, org.id, client=here)).user.is_anonymous
    with pytest.raises(AuthError) as raised:
        await strict.org_access.guest(realm, org.id, client=here)
    assert raised.value.code is ErrorCode.TOO_MANY_ATTEMPTS
    assert (await strict.org_access.guest(realm, org.id, client=there)).user.is_anonymous
    assert len(await strict.organisations.members(org)) == 4


async def test_a_compare_and_set_that_waits_for_a_change_writes_nothing(tmp_path):
    """PostgreSQL: a counter that another transaction holds and changes while the
    compare-and-set waits for it is checked again at its latest version, for either of the
    two keys; nothing is written over the change."""
    import asyncio
    from dataclasses import replace

    import asyncpg

    from authgate.api.app import build_core
    from tests.conftest import new_database, test_settings

    async with new_database("postgres", tmp_path) as url:
        core = await build_core(test_settings(url, tmp_path))
        raw = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            for changed in (0, 1):  # the first key in key order, then the second
                keys = [core.throttle.scoped_key("test", unique_email(), 9) for _ in range(2)]
                await core.throttle.attempt(keys)
                names = sorted(key.key for key in keys)
                async with core.store.transaction() as tx:
                    read = await tx.throttle.read_many(names)
                holder = raw.transaction()
                await holder.start()
                await raw.execute("UPDATE throttle_counters SET failures = failures + 1 "
                                  "WHERE key = $1", names[changed])

                async def compare_and_set() -> bool:
                    async with core.store.transaction(write=True, single=True) as tx:
                        return await tx.throttle.replace_if_unchanged(
                            read, [replace(state, pending=7) for state in read])

                waiting = asyncio.create_task(compare_and_set())
                await asyncio.sleep(0.3)
                assert not waiting.done()  # it waits for the row
                await holder.commit()
                assert await asyncio.wait_for(waiting, 10) is False
                rows = await raw.fetch("SELECT pending, failures FROM throttle_counters "
                                       "WHERE key = ANY($1) ORDER BY key", names)
                assert [tuple(row) for row in rows] == [
                    (1, 1 if changed == i else 0) for i in range(2)]
        finally:
            await raw.close()
            await core.close()


async def test_housekeeping_and_admissions_at_once_never_deadlock(tmp_path):
    """PostgreSQL: housekeeping's delete of idle counters locks them in key order, as every
    throttle write does, and skips the ones a sign-in holds; in scan order it deadlocked with
    an admission locking the same two counters."""
    import asyncio

    import asyncpg

    from authgate.api.app import build_core
    from tests.conftest import new_database, test_settings

    async with new_database("postgres", tmp_path) as url:
        core = await build_core(test_settings(url, tmp_path))
        raw = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            for unlocked in (True, False):  # the compare-and-set, then the locking write
                core.store.round_trips = unlocked
                first, second = sorted((core.throttle.scoped_key("test", unique_email(), 9)
                                        for _ in range(2)), key=lambda key: key.key)
                for key in (second, first):  # the second stored first: a scan meets it first
                    async with core.store.transaction(write=True) as tx:
                        await tx.throttle.lock_many([key.key], core.now())
                await raw.execute("UPDATE throttle_counters SET window_started_at = now() - "
                                  "interval '2 days' WHERE key = ANY($1)",
                                  [first.key, second.key])
                holder = raw.transaction()
                await holder.start()
                await raw.execute("SELECT 1 FROM throttle_counters WHERE key = $1 FOR UPDATE",
                                  second.key)

                async def purge() -> dict[str, int]:
                    async with core.store.transaction(write=True) as tx:
                        return await tx.housekeeping.purge(core.now(), core.now(),
                                                           core.settings.throttle_window)

                purging = asyncio.create_task(purge())
                await asyncio.sleep(0.3)
                admitting = asyncio.create_task(core.throttle.attempt([first, second]))
                await asyncio.sleep(0.3)
                await holder.commit()
                results = await asyncio.gather(purging, admitting, return_exceptions=True)
                assert not [r for r in results if isinstance(r, BaseException)], results
        finally:
            core.store.round_trips = True
            await raw.close()
            await core.close()


class _AfterTheCheck:
    """Counts the store's write transactions begun after the password check of a sign-in."""

    def __init__(self, core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
        self.checked, self.writes = False, 0
        verify, transaction = core.hasher.verify, core.store.transaction

        async def checking(secret: str, password: str) -> object:
            result = await verify(secret, password)
            self.checked = True
            return result

        def counting(*args: object, **kwargs: object) -> object:
            if self.checked and kwargs.get("write"):
                self.writes += 1
            return transaction(*args, **kwargs)

        monkeypatch.setattr(core.hasher, "verify", checking)
        monkeypatch.setattr(core.store, "transaction", counting)


async def _counters(core: Core, realm: Realm, email: str,
                    ip: str) -> tuple[object, object]:
    login = core.throttle.login_key(realm.id, email)
    address = core.throttle.address_key(realm.id, ip)
    assert address is not None
    async with core.store.transaction() as tx:
        return await tx.throttle.get(login.key), await tx.throttle.get(address.key)


async def _with_failures_and_one_in_flight(core: Core, realm: Realm, email: str,
                                           ip: str) -> None:
    """Two failures on the login id, and the address with another sign-in in flight."""
    from datetime import timedelta

    from authgate.core.models import ThrottleState, utcnow

    now = utcnow()
    address = core.throttle.address_key(realm.id, ip)
    assert address is not None
    async with core.store.transaction(write=True) as tx:
        await tx.throttle.save(
            ThrottleState(key=core.throttle.login_key(realm.id, email).key, failures=2,
                          window_started_at=now),
            ThrottleState(key=address.key, failures=0, window_started_at=now, pending=1,
                          pending_until=now + timedelta(seconds=60)))


async def test_a_sign_in_writes_its_success_with_the_session_it_opens(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """One write after the password check, not two: the session, and the attempt's success
    (the login id's failures cleared, the attempt taken back from the address)."""
    ip = "198.51.100.60"
    email = await _user_with_failures_and_one_in_flight(core, realm, ip)
    after = _AfterTheCheck(core, monkeypatch)
    tokens = await core.signin.password_session(realm, email, PASSWORD, ClientInfo(ip=ip))
    assert after.writes == 1
    login, address = await _counters(core, realm, email, ip)
    assert (login.failures, login.pending, login.blocked_until) == (0, 0, None)
    assert (address.failures, address.pending) == (0, 1)  # the other sign-in's stays
    assert [s.id for s in await core.sessions.list_for_user(realm, tokens.user.id)] == \
        [tokens.session.id]


async def test_a_sign_in_whose_session_does_not_open_releases_its_attempt(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """The password changed while it was checked: no session, and nothing of the success is
    written (the failures stay); the attempt is only taken back."""
    email, ip = unique_email(), "198.51.100.61"
    user = await core.users.create(realm, NewUser(email=email, password=PASSWORD))
    await _with_failures_and_one_in_flight(core, realm, email, ip)
    verify = core.hasher.verify

    async def changed_meanwhile(secret: str, password: str) -> object:
        result = await verify(secret, password)
        await core.users.set_password(realm, user.id, "another long passphrase 43")
        return result

    monkeypatch.setattr(core.hasher, "verify", changed_meanwhile)
    with pytest.raises(AuthError) as refused:
        await core.signin.password_session(realm, email, PASSWORD, ClientInfo(ip=ip))
    assert refused.value.code is ErrorCode.INVALID_CREDENTIALS
    login, address = await _counters(core, realm, email, ip)
    assert (login.failures, login.pending) == (2, 0)
    assert address.pending == 1
    assert await core.sessions.list_for_user(realm, user.id) == []


async def test_a_sign_in_that_fails_after_its_session_opened_takes_its_attempt_back_once(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """Written with the session, the success is not undone by an error that follows: the
    attempt is not released a second time (which would take another sign-in's from the
    address)."""
    ip = "198.51.100.62"
    email = await _user_with_failures_and_one_in_flight(core, realm, ip)

    async def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("signing failed")

    monkeypatch.setattr(core.sessions, "_tokens", broken)
    with pytest.raises(RuntimeError):
        await core.signin.password_session(realm, email, PASSWORD, ClientInfo(ip=ip))
    login, address = await _counters(core, realm, email, ip)
    assert (login.failures, login.pending) == (0, 0)
    assert address.pending == 1


async def test_a_sign_in_decides_its_admission_on_counters_read_with_the_user(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """Where statements are round trips (PostgreSQL), the compare-and-set decides on the
    counters read in the user's statement, with no read of its own; SQLite admits by its
    locking write, reading nothing apart either."""
    from authgate.store.repositories import ThrottleRepo
    from tests.conftest import recorded_calls

    email, here = unique_email(), ClientInfo(ip="198.51.100.64")
    await core.users.create(realm, NewUser(email=email, password=PASSWORD))
    await core.signin.password(realm, email, PASSWORD, here)  # the counters exist now
    reads = recorded_calls(monkeypatch, ThrottleRepo, "read_many")
    replaced: list[bool] = []
    replace = ThrottleRepo.replace_if_unchanged

    async def recording(self: ThrottleRepo, expected: Any, new: Any, **kwargs: Any) -> bool:
        replaced.append(await replace(self, expected, new, **kwargs))
        return replaced[-1]

    monkeypatch.setattr(ThrottleRepo, "replace_if_unchanged", recording)
    await core.signin.password(realm, email, PASSWORD, here)
    assert reads == []
    assert replaced == ([True] if core.store.round_trips else [])


async def test_an_attempt_cancelled_while_its_admission_is_written_is_released(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """The client goes away while the admission's write is in flight: the store commits it
    all the same, and the attempt is taken back once it has, not left pending for its
    lease."""
    import asyncio

    key = core.throttle.scoped_key("test", unique_email(), 10)
    await core.throttle.attempt([key])
    await core.throttle.released([key])  # the counter exists, at rest
    written = asyncio.Event()
    attempt = core.throttle.attempt

    async def slow_reply(keys: Any, **kwargs: Any) -> None:
        await attempt(keys, **kwargs)  # written in the store
        written.set()
        await asyncio.sleep(0.3)  # its answer still on the way

    monkeypatch.setattr(core.throttle, "attempt", slow_reply)

    async def signing_in() -> None:
        async with core.throttle.attempting([key]):
            raise AssertionError("the body never runs")

    await _cancelled_once(written, signing_in)
    async with core.store.transaction() as tx:
        assert (await tx.throttle.get(key.key)).pending == 0


async def _user_with_failures_and_one_in_flight(core: Core, realm: Realm, ip: str) -> str:
    email = unique_email()
    await core.users.create(realm, NewUser(email=email, password=PASSWORD))
    await _with_failures_and_one_in_flight(core, realm, email, ip)
    return email


async def _cancelled_once(started: Any, signing_in: Any) -> None:
    """Run ``signing_in()``, and cancel it once ``started`` (an event) is set."""
    import asyncio

    task = asyncio.create_task(signing_in())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("written_with", ["the session", "nothing else"])
async def test_a_sign_in_cancelled_while_its_success_is_written_is_not_released_again(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch, written_with: str):
    """The client goes away while the attempt's success is being written, with the session it
    opens (the native grant) or alone (a surface that opens no session here): the write runs
    to its end, so the success is counted once and the attempt is not also released (which
    would take another sign-in's attempt from the address)."""
    import asyncio

    from authgate.store.repositories import SessionRepo, ThrottleRepo

    ip = "198.51.100.66"
    email = await _user_with_failures_and_one_in_flight(core, realm, ip)
    writing = asyncio.Event()
    open_session, settle = SessionRepo.open, ThrottleRepo.settle

    async def session_answer_on_its_way(self: SessionRepo, *args: Any) -> None:
        settlement = args[-1]
        await open_session(self, *args)
        settlement.written = False  # written in the store; its answer still on the way
        writing.set()
        await asyncio.sleep(0.3)
        settlement.written = True

    async def settle_answer_on_its_way(self: ThrottleRepo, settlement: Any) -> None:
        await settle(self, settlement)
        writing.set()
        await asyncio.sleep(0.3)

    if written_with == "the session":
        monkeypatch.setattr(SessionRepo, "open", session_answer_on_its_way)
        signing_in = core.signin.password_session
    else:
        monkeypatch.setattr(ThrottleRepo, "settle", settle_answer_on_its_way)
        signing_in = core.signin.password
    await _cancelled_once(writing, lambda: signing_in(realm, email, PASSWORD, ClientInfo(ip=ip)))
    login, address = await _counters(core, realm, email, ip)
    assert (login.failures, login.pending) == (0, 0)
    assert address.pending == 1


async def test_a_wrong_password_cancelled_while_its_failure_is_written_is_counted(
        core: Core, realm: Realm, monkeypatch: pytest.MonkeyPatch):
    """A wrong guess whose client goes away while the failure is written is still counted,
    and its attempt ends: a cancellation neither makes a guess free nor leaves it pending."""
    import asyncio

    from authgate.core import audit as events

    ip = "198.51.100.68"
    email = await _user_with_failures_and_one_in_flight(core, realm, ip)
    writing = asyncio.Event()
    record = core.audit.record

    async def slow_record(tx: Any, kind: str, **kwargs: Any) -> None:
        await record(tx, kind, **kwargs)
        if kind == events.SIGN_IN_FAILED:
            writing.set()
            await asyncio.sleep(0.3)

    monkeypatch.setattr(core.audit, "record", slow_record)
    await _cancelled_once(writing, lambda: core.signin.password(
        realm, email, "not the password", ClientInfo(ip=ip)))
    login, address = await _counters(core, realm, email, ip)
    assert (login.failures, login.pending) == (3, 0)
    assert (address.failures, address.pending) == (1, 1)


SURFACE_SIGN_INS = {
    # surface: (path, how the request carries the credentials)
    "native": ("/oauth/token", "form"),
    "deskera": ("/deskera/v1/iam/auth/sign-in/web/sign-in", "userName"),
    "webapi": ("/webapi/api/v1/Authentication/Login?APIKey={key}", "userName"),
    "tiledesk": ("/tiledesk/auth/signin", "email"),
    "descope": ("/descope/v1/auth/password/signin", "loginId"),
}


@pytest.mark.parametrize("surface", sorted(SURFACE_SIGN_INS))
async def test_every_surface_writes_a_sign_ins_success_with_its_session(
        client: Any, core: Core, monkeypatch: pytest.MonkeyPatch, surface: str):
    """A password sign-in on any surface clears the login id's failures in the write that
    opens its session, not in a write of its own before it."""
    from authgate.store.repositories import SessionRepo, ThrottleRepo

    realm = await core.realms.require("default")  # the dialects' realm in the tests
    _, key = await core.api_keys.create(realm, "sign-in test")
    email = unique_email()
    await core.users.create(realm, NewUser(email=email, password=PASSWORD))
    path, shape = SURFACE_SIGN_INS[surface]

    async def sign_in(password: str) -> Any:
        url = path.format(key=key)
        if shape == "form":
            return await client.post(url, data={"grant_type": "password", "username": email,
                                                "password": password})
        return await client.post(url, json={shape: email, "password": password},
                                 headers={"Authorization": f"Bearer {realm.project_id}"})

    assert (await sign_in("not the password")).status_code in (400, 401, 403)
    login, _ = await _counters(core, realm, email, "127.0.0.1")
    assert (login.failures, login.pending) == (1, 0)
    settled_apart: list[object] = []  # settlements written outside a session's opening
    opened: list[object] = []
    settle, open_session = ThrottleRepo.settle, SessionRepo.open

    async def settling(self: ThrottleRepo, settlement: Any) -> None:
        if not any(settlement is carried for carried in opened):
            settled_apart.append(settlement)
        await settle(self, settlement)

    async def opening(self: SessionRepo, *args: Any, **kwargs: Any) -> None:
        opened.append(args[4] if len(args) > 4 else kwargs.get("settlement"))
        await open_session(self, *args, **kwargs)

    monkeypatch.setattr(ThrottleRepo, "settle", settling)
    monkeypatch.setattr(SessionRepo, "open", opening)
    answer = await sign_in(PASSWORD)
    assert answer.status_code == 200, answer.text
    assert len(opened) == 1 and opened[0] is not None and opened[0].written
    assert settled_apart == []
    login, _ = await _counters(core, realm, email, "127.0.0.1")
    assert (login.failures, login.pending) == (0, 0)
