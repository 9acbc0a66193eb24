"""Throttling of failed attempts, with exponential back-off.

Failures are counted per key: one key per (realm, login id) and one per (realm, client address).
After a key's free attempts, each further failure blocks it for ``base * 2**(n - free)`` seconds,
up to ``max``. A blocked key answers TOO_MANY_ATTEMPTS with the seconds to wait, and does no
password work. Counters live in the shared store, so every node agrees.

A login id's owner signing in from a device it has used before is counted under a key of that
device, so an attacker who only knows the login id cannot lock the owner out of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ThrottleState, normalise_login_id

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
        key = f"login:{realm_id}:{normalise_login_id(login_id)}"
        if device_id:
            key += f":device:{device_id}"
        return ThrottleKey(key, self.core.settings.throttle_free_attempts)

    def address_key(self, realm_id: str, ip: str | None) -> ThrottleKey | None:
        if not ip:
            return None
        return ThrottleKey(f"ip:{realm_id}:{ip}", self.core.settings.throttle_ip_free_attempts)

    def scoped_key(self, scope: str, value: str, free_attempts: int) -> ThrottleKey:
        """A key for another kind of attempt (PINs, codes, API keys)."""
        return ThrottleKey(f"{scope}:{value}", free_attempts)

    async def check(self, keys: list[ThrottleKey]) -> set[str]:
        """Raise TOO_MANY_ATTEMPTS if any key is blocked now; return the keys that have a
        counter (so a success need not write to clear a counter that does not exist)."""
        now = self.core.now()
        wait = 0.0
        counted = set()
        async with self.core.store.transaction() as tx:
            states = await tx.throttle.get_many([key.key for key in keys])
        for state in states:
            counted.add(state.key)
            if state.blocked_until and state.blocked_until > now:
                wait = max(wait, (state.blocked_until - now).total_seconds())
        if wait > 0:
            raise AuthError(ErrorCode.TOO_MANY_ATTEMPTS, retry_after=max(1, math.ceil(wait)))
        return counted

    async def record_failure(self, tx: Tx, keys: list[ThrottleKey]) -> None:
        s = self.core.settings
        now = self.core.now()
        for key in keys:
            state = await tx.throttle.get(key.key)
            if state is None or (now - state.window_started_at).total_seconds() > s.throttle_window:
                state = ThrottleState(key=key.key, failures=0, window_started_at=now)
            state.failures += 1
            over = state.failures - key.free_attempts
            if over >= 0:
                delay = min(s.throttle_base_delay * (2 ** min(over, 30)), s.throttle_max_delay)
                state.blocked_until = now + timedelta(seconds=delay)
            await tx.throttle.save(state)

    async def clear(self, tx: Tx, key: ThrottleKey) -> None:
        await tx.throttle.clear(key.key)
