"""The outbox worker: delivers due mails, retrying with back-off.

Each mail is claimed under a lease before it is sent, so several nodes can run workers against
one database and each mail goes out once (at least once if a node dies mid-send).
"""

from __future__ import annotations

from datetime import timedelta

import structlog

from authgate.background import Periodic
from authgate.core.engine import Core
from authgate.mail.senders import Sender, sender_for

log = structlog.get_logger("authgate.mail")

LEASE = timedelta(seconds=60)
BATCH = 20


class OutboxWorker:
    def __init__(self, core: Core, sender: Sender | None = None) -> None:
        self.core = core
        self.sender = sender or sender_for(core.settings)

    async def run_once(self) -> int:
        """Deliver what is due now; return how many mails were sent."""
        now = self.core.now()
        async with self.core.store.transaction() as tx:
            due = await tx.outbox.due(now, BATCH)
        sent = 0
        for mail in due:
            async with self.core.store.transaction(write=True) as tx:
                if not await tx.outbox.claim(mail.id, now, now + LEASE):
                    continue  # another node has it
            try:
                await self.sender.send(mail)
            except Exception as exc:  # noqa: BLE001 - any delivery failure is retried
                attempts = mail.attempts + 1
                retry = None
                if attempts < self.core.settings.mail_max_attempts:
                    retry = self.core.now() + timedelta(seconds=min(2 ** attempts, 3600))
                log.warning("mail delivery failed", mail_id=mail.id, attempts=attempts,
                            error=type(exc).__name__, will_retry=retry is not None)
                async with self.core.store.transaction(write=True) as tx:
                    await tx.outbox.mark_failed(mail.id, f"{type(exc).__name__}: {exc}", retry)
                continue
            async with self.core.store.transaction(write=True) as tx:
                await tx.outbox.mark_sent(mail.id, self.core.now())
            sent += 1
        return sent

    def start(self) -> Periodic:
        """Deliver due mail every ``mail_poll_seconds``, until stopped."""
        return Periodic("outbox", self.run_once, self.core.settings.mail_poll_seconds).start()
