"""Throttling of attempts, with exponential back-off.

Attempts are counted per key: one key per (realm, login id) and one per (realm, client address).
After a key's free attempts, each further failure blocks it for ``base * 2**(n - free)`` seconds,
up to ``max``. A blocked key answers TOO_MANY_ATTEMPTS with the seconds to wait, and does no
password work. Counters live in the shared store, so every node agrees.

An attempt is counted *before* the work it guards (``attempt``), in one write that locks the
counters: of many attempts sent at once, each sees the ones before it, so parallel guesses
cannot all pass a check that none of them has counted yet. An attempt that succeeds is taken
back (``succeeded``).

A login id's owner signing in from a device it has used before is counted under a key of that
device, so an attacker who only knows the login id cannot lock the owner out of it. Keys hold a
digest of what the client sent (a login id of any length), never the value itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ThrottleState, normalise_login_id
from authgate.crypto.tokens import digest

if TYPE_CHECKING:
    from authgate.core.engine import Core
    from authgate.core.ports import Tx


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
        return ThrottleKey(f"ip:{realm_id}:{digest(ip)}",
                           self.core.settings.throttle_ip_free_attempts)

    def scoped_key(self, scope: str, value: str, free_attempts: int) -> ThrottleKey:
        """A key for another kind of attempt (PINs, codes, API keys)."""
        return ThrottleKey(f"{scope}:{digest(value)}", free_attempts)

    async def attempt(self, keys: list[ThrottleKey]) -> None:
        """Count an attempt on every key, before the work it guards; TOO_MANY_ATTEMPTS (and
        nothing counted) when any key is blocked now."""
        now = self.core.now()
        async with self.core.store.transaction(write=True) as tx:
            states = await tx.throttle.lock_many([key.key for key in keys], now)
            wait = max((self._wait(state, now) for state in states), default=0.0)
            if wait > 0:  # raised inside the transaction: the counters it made are undone
                raise AuthError(ErrorCode.TOO_MANY_ATTEMPTS,
                                retry_after=max(1, math.ceil(wait)))
            for key, state in zip(keys, states):
                self._count(key, state, now)
                await tx.throttle.save(state)

    async def succeeded(self, tx: Tx, cleared: ThrottleKey,
                        taken_back: Sequence[ThrottleKey] = ()) -> None:
        """An attempt succeeded: ``cleared`` starts afresh (its owner proved who they are);
        each key of ``taken_back`` (an address shared with others) loses this attempt only."""
        await tx.throttle.clear(cleared.key)
        now = self.core.now()
        for key in taken_back:
            state = (await tx.throttle.lock_many([key.key], now))[0]
            state.failures = max(0, state.failures - 1)
            if state.failures < key.free_attempts:
                state.blocked_until = None
            await tx.throttle.save(state)

    def _count(self, key: ThrottleKey, state: ThrottleState, now: datetime) -> None:
        s = self.core.settings
        if (now - state.window_started_at).total_seconds() > s.throttle_window:
            state.failures, state.window_started_at, state.blocked_until = 0, now, None
        state.failures += 1
        over = state.failures - key.free_attempts
        if over >= 0:
            delay = min(s.throttle_base_delay * (2 ** min(over, 30)), s.throttle_max_delay)
            state.blocked_until = now + timedelta(seconds=delay)

    @staticmethod
    def _wait(state: ThrottleState, now: datetime) -> float:
        if state.blocked_until is None or state.blocked_until <= now:
            return 0.0
        return (state.blocked_until - now).total_seconds()
