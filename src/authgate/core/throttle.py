"""Throttling of attempts, with exponential back-off.

Attempts are counted per key: one key per (realm, login id) and one per (realm, client address).
After a key's free attempts, each further failure blocks it for ``base * 2**(n - free)`` seconds,
up to ``max``. A blocked key answers TOO_MANY_ATTEMPTS with the seconds to wait, and does no
password work. Counters live in the shared store, so every node agrees.

An attempt is admitted *before* the work it guards (``attempt``), by a write that locks the
counters (or, where statements are round trips, by compare-and-set: see ``_admitted_unlocked``),
and stays pending until it ``failed`` or ``succeeded``: a key admits only as many
attempts at once as it has free attempts left (one at a time once they are spent), so guesses
sent together cannot all pass a check that none of them has been counted in. Attempts over the
allowance are refused for a second, without a block: they were not failures. A success clears
the login id's failures; a shared address only loses the pending attempt (one statement, the
store's ``settle``: a sign-in pays for one round trip there, not a locking transaction). A
pending attempt whose process died lapses after ``PENDING_LEASE``.

An address is counted by its block (``address_block``: an IPv6 address by its /64).
A login id's owner signing in from a device it has used before is counted under a key of that
device, so an attacker who only knows the login id cannot lock the owner out of it. Keys hold a
digest of what the client sent (a login id of any length), never the value itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from authgate.core.completion import completed, finishing
from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import Settlement, ThrottleState, normalise_login_id
from authgate.crypto.tokens import digest

if TYPE_CHECKING:
    from authgate.core.engine import Core
    from authgate.core.ports import Tx


# A pending attempt outlives any check (an Argon2id verification takes milliseconds).
PENDING_LEASE = timedelta(seconds=60)
# What an attempt over the allowance is told to wait: the pending ones end within it.
BUSY_SECONDS = 1.0


# IPv6 prefixes whose addresses carry an IPv4 client in their last 32 bits: NAT64's
# well-known and local-use prefixes (RFC 6052, RFC 8215) and IPv4-compatible addresses.
_IPV4_EMBEDDED = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"),
                  ipaddress.IPv6Network("::/96"))


def address_block(ip: str) -> str:
    """What a client address is counted as: an IPv4 address by itself; an IPv6 address by
    its /64, the block one subscriber is given (whoever holds one can send from 2**64
    addresses); an IPv6 address that stands for an IPv4 client (IPv4-mapped, NAT64, 6to4,
    Teredo) as that IPv4 address, so that the clients behind one translator are not counted
    as one, nor one IPv4 address as 65,536 6to4 blocks."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv4Address) or address.is_loopback:
        return str(address)
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and address.teredo is not None:
        embedded = address.teredo[1]  # (server, client)
    if embedded is None and not address.is_unspecified and any(
            address in prefix for prefix in _IPV4_EMBEDDED):
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is not None:
        return str(embedded)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


@dataclass(frozen=True, slots=True)
class ThrottleKey:
    key: str
    free_attempts: int


class Throttle:
    def __init__(self, core: Core) -> None:
        self.core = core

    def login_key(self, realm_id: str, login_id: str, device_id: str | None = None) -> ThrottleKey:
        key = f"login:{realm_id}:{digest(normalise_login_id(login_id))}"
        if device_id:
            key += f":device:{device_id}"
        return ThrottleKey(key, self.core.settings.throttle_free_attempts)

    def address_key(self, realm_id: str, ip: str | None) -> ThrottleKey | None:
        if not ip:
            return None
        return ThrottleKey(f"ip:{realm_id}:{digest(address_block(ip))}",
                           self.core.settings.throttle_ip_free_attempts)

    def scoped_key(self, scope: str, value: str, free_attempts: int) -> ThrottleKey:
        """A key for another kind of attempt (PINs, codes, API keys)."""
        return ThrottleKey(f"{scope}:{digest(value)}", free_attempts)

    @asynccontextmanager
    async def attempting(self, keys: list[ThrottleKey], *,
                         read: Sequence[ThrottleState | None] | None = None
                         ) -> AsyncIterator[Attempt]:
        """``attempt``, then the body, which says how it ended (``Attempt.failed`` or
        ``succeeded``, inside its write); a body that ends otherwise (an error, a cancelled
        request) releases the pending attempt. A request cancelled while its admission is
        being written releases it once written: the store may still commit it. The body
        writes the outcome with ``Attempt.ended``, which runs to its end the same way, or a
        cancelled body could release an attempt whose outcome the store then wrote."""
        admitting, cancelled = await finishing(self.attempt(keys, read=read))
        if cancelled:
            if not admitting.cancelled() and admitting.exception() is None:  # admitted
                await self.released(keys)
            raise asyncio.CancelledError
        admitting.result()  # TOO_MANY_ATTEMPTS, or the store's error
        attempt = Attempt(self, keys)
        try:
            yield attempt
        finally:
            if not attempt.resolved:
                await self.released(keys)

    async def attempt(self, keys: list[ThrottleKey], *,
                      read: Sequence[ThrottleState | None] | None = None) -> None:
        """Admit an attempt on every key, pending until ``failed`` or ``succeeded``; or
        TOO_MANY_ATTEMPTS, with nothing counted, when a key is blocked or has as many attempts
        pending as it allows. ``read``: the keys' counters as the caller just read them (None
        where absent), which spares the compare-and-set its own read."""
        now = self.core.now()
        if self.core.store.round_trips:
            admitted = await self._admitted_unlocked(keys, now, read)
            if admitted is False:
                # A counter changed between the read and the write (attempts from one busy
                # address): decided once more on the counters as they are now, before taking
                # the locking write (four round trips, where this is two).
                now = self.core.now()
                admitted = await self._admitted_unlocked(keys, now)
            if admitted:
                return
        async with self.core.store.transaction(write=True) as tx:
            states = await self._locked(tx, keys, now)
            self._admit(keys, states, now)
            await tx.throttle.save(*states)

    async def _admitted_unlocked(self, keys: list[ThrottleKey], now: datetime,
                                 read: Sequence[ThrottleState | None] | None = None
                                 ) -> bool | None:
        """The common case without a locking transaction, for a store whose statements are
        round trips: two statements in autocommit, where the locking write takes four (BEGIN,
        two statements, COMMIT), or one when the caller read the counters with a read of its
        own (a sign-in, with the user). The counters are read, the attempt decided on what was
        read, and the decision written only if nothing that decided it changed meanwhile
        (compare-and-set; a busy counter's pending count may, within the allowance), so it is
        the decision the locking path would have made on the counters as written. A refusal
        writes nothing, so it needs no lock. False, with nothing written, when a counter
        changed; None when one does not exist yet (only the locking write makes it). (On
        SQLite the locking write is cheaper than the extra read.)"""
        if len({key.key for key in keys}) != len(keys):
            return None
        if read is None:
            async with self.core.store.transaction() as tx:
                read = await tx.throttle.read_many([key.key for key in keys])
        if len(read) != len(keys) or any(
                state is None or state.key != key.key for key, state in zip(keys, read)):
            return None
        expected = [state for state in read if state is not None]  # compared, never changed
        states = [replace(state) for state in expected]
        for state in states:
            self._expire(state, now)
        # A counter that already holds pending attempts, and that nothing lapsed on, is given
        # one more on what it holds when written, as long as what decided still holds: other
        # attempts from one busy address come and go between the read and the write.
        at_most = [self._allowance(key, state) - 1
                   if state == old and state.pending >= 1 and state.pending_until is not None
                   else None for key, state, old in zip(keys, states, expected)]
        self._admit(keys, states, now)
        async with self.core.store.transaction(write=True, single=True) as tx:
            return await tx.throttle.replace_if_unchanged(expected, states,
                                                          pending_at_most=at_most, now=now)

    def _admit(self, keys: list[ThrottleKey], states: list[ThrottleState],
               now: datetime) -> None:
        """Count a pending attempt on counters whose lapsed state is forgotten; or
        TOO_MANY_ATTEMPTS, changing nothing in the store, when a key has to wait."""
        _refuse_for(max((self._wait(key, state, now) for key, state in zip(keys, states)),
                        default=0.0))
        for state in states:
            state.pending += 1
            state.pending_until = now + PENDING_LEASE

    async def failed(self, tx: Tx, keys: list[ThrottleKey]) -> None:
        """A pending attempt failed: a failure on every key, blocking past the free ones."""
        now = self.core.now()
        states = await self._locked(tx, keys, now)
        for key, state in zip(keys, states):
            state.pending = max(0, state.pending - 1)
            self._fail(key, state, now)
        await tx.throttle.save(*states)

    async def succeeded(self, tx: Tx, cleared: ThrottleKey,
                        taken_back: Sequence[ThrottleKey] = ()) -> None:
        """A pending attempt succeeded: ``cleared`` loses its failures (its owner proved who
        they are); each key of ``taken_back`` (an address shared with others) only loses the
        pending attempt."""
        await tx.throttle.settle(self.settlement(cleared, taken_back))

    def settlement(self, cleared: ThrottleKey,
                   taken_back: Sequence[ThrottleKey] = ()) -> Settlement:
        """What ``succeeded`` writes, for a write of the caller's to carry."""
        return Settlement(cleared.key, tuple(key.key for key in taken_back), self.core.now())

    async def released(self, keys: list[ThrottleKey]) -> None:
        """A pending attempt ended with neither answer (an error, a cancelled request)."""
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            states = await self._locked(tx, keys, now)
            for state in states:
                state.pending = max(0, state.pending - 1)
            await tx.throttle.save(*states)

    async def spend(self, keys: list[ThrottleKey]) -> None:
        """Count an attempt that is a failure by itself (a guest made, a mail asked for):
        TOO_MANY_ATTEMPTS, with nothing counted, while a key is blocked."""
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            states = await self._locked(tx, keys, now)
            _refuse_for(max((self._blocked_for(state, now) for state in states), default=0.0))
            for key, state in zip(keys, states):
                self._fail(key, state, now)
            await tx.throttle.save(*states)

    async def _locked(self, tx: Tx, keys: list[ThrottleKey],
                      now: datetime) -> list[ThrottleState]:
        """The keys' counters, locked for ``tx``, with what has lapsed by ``now`` forgotten."""
        states = await tx.throttle.lock_many([key.key for key in keys], now)
        for state in states:
            self._expire(state, now)
        return states

    def _expire(self, state: ThrottleState, now: datetime) -> None:
        """Failures outside the window are forgotten; pending attempts past their lease too.
        A counter with nothing in it starts its window now (a success leaves one at zero)."""
        if (now - state.window_started_at).total_seconds() > self.core.settings.throttle_window:
            state.failures, state.window_started_at, state.blocked_until = 0, now, None
        if state.pending_until is not None and state.pending_until <= now:
            state.pending, state.pending_until = 0, None
        if not state.failures and not state.pending:
            state.window_started_at, state.blocked_until = now, None

    def _fail(self, key: ThrottleKey, state: ThrottleState, now: datetime) -> None:
        s = self.core.settings
        state.failures += 1
        over = state.failures - key.free_attempts
        if over >= 0:
            delay = min(s.throttle_base_delay * (2 ** min(over, 30)), s.throttle_max_delay)
            state.blocked_until = now + timedelta(seconds=delay)

    def _wait(self, key: ThrottleKey, state: ThrottleState, now: datetime) -> float:
        """Seconds before ``key`` admits another attempt (0: now)."""
        blocked = self._blocked_for(state, now)
        if blocked > 0:
            return blocked
        return BUSY_SECONDS if state.pending >= self._allowance(key, state) else 0.0

    @staticmethod
    def _allowance(key: ThrottleKey, state: ThrottleState) -> int:
        """How many attempts the key admits at once: its free attempts left, at least one."""
        return max(key.free_attempts - state.failures, 1)

    @staticmethod
    def _blocked_for(state: ThrottleState, now: datetime) -> float:
        if state.blocked_until is None or state.blocked_until <= now:
            return 0.0
        return (state.blocked_until - now).total_seconds()


def _refuse_for(wait: float) -> None:
    """TOO_MANY_ATTEMPTS when there is a wait; raised inside the counters' write, it undoes
    the counters that write made."""
    if wait > 0:
        raise AuthError(ErrorCode.TOO_MANY_ATTEMPTS, retry_after=max(1, math.ceil(wait)))


class Attempt:
    """A pending attempt on some keys, for its body to resolve: the first key is the one a
    success clears (the login id), the others only lose the attempt (the address). A success
    is written by ``succeeded``, or by a write of the body's own that carries ``settlement()``
    (a sign-in's session opening: one write, not two)."""

    __slots__ = ("_throttle", "keys", "_resolved", "_settlement")

    def __init__(self, throttle: Throttle, keys: list[ThrottleKey]) -> None:
        self._throttle, self.keys, self._resolved = throttle, keys, False
        self._settlement: Settlement | None = None

    @property
    def resolved(self) -> bool:
        return self._resolved or (self._settlement is not None and self._settlement.written)

    async def failed(self, tx: Tx) -> None:
        await self._throttle.failed(tx, self.keys)
        self._resolved = True

    async def succeeded(self, tx: Tx) -> None:
        await self._throttle.succeeded(tx, self.keys[0], self.keys[1:])
        self._resolved = True

    async def ended(self, succeeded: bool,
                    also: Callable[[Tx], Awaitable[object]] | None = None) -> None:
        """Write how the attempt ended, a success or a failure, with ``also``'s writes, in one
        write transaction that runs to its end even if the caller is cancelled meanwhile (the
        cancellation is raised after it): cut short, a failure would go uncounted and leave
        the attempt pending for its lease, and a success the store committed would be
        released as well."""
        await completed(self._write_end(succeeded, also))

    async def _write_end(self, succeeded: bool,
                         also: Callable[[Tx], Awaitable[object]] | None) -> None:
        # A success alone is one statement (the settle), atomic by itself.
        single = succeeded and also is None
        async with self._throttle.core.store.transaction(write=True, single=single) as tx:
            await (self.succeeded(tx) if succeeded else self.failed(tx))
            if also is not None:
                await also(tx)

    def settlement(self) -> Settlement:
        """The success, for a write of the body's to carry; the attempt is resolved once that
        write marks it written (until then, leaving ``attempting`` releases it)."""
        self._settlement = self._throttle.settlement(self.keys[0], self.keys[1:])
        return self._settlement
