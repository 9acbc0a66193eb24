"""Housekeeping: delete what has outlived its use, so tables stay the size of live data.

Sessions ended (expired or revoked) more than ``retention_days`` ago go with their refresh
tokens; expired challenges, codes and re-authentication tokens, delivered or abandoned mail, and
throttle counters whose window has passed go too. A live session keeps all its rotated refresh
tokens: reuse detection needs them. Audit events are never deleted here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from authgate.core.engine import Core

PURGED = "housekeeping.purged"


class Housekeeping:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def purge(self) -> dict[str, int]:
        now = self.core.now()
        cutoff = now - timedelta(days=self.core.settings.retention_days)
        async with self.core.store.transaction(write=True) as tx:
            counts = await tx.housekeeping.purge(now, cutoff,
                                                 self.core.settings.throttle_window)
            if any(counts.values()):
                await self.core.audit.record(tx, PURGED, realm_id=None, **counts)
        return counts
