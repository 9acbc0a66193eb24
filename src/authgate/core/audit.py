"""Audit events: an append-only record of every sign-in, failure, refresh and admin action.

Events are written in the same transaction as the change they describe, and counted in the
``authgate_events_total`` metric by type.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from authgate.core.models import AuditEvent, ClientInfo
from authgate.core.ports import Tx

if TYPE_CHECKING:
    from authgate.core.engine import Core

EVENTS = Counter("authgate_events_total", "Audit events recorded, by type", ["type"])

# Who is acting, for every event recorded while they do: set by the surface that authenticated
# them (an administrator through the admin API), recorded in each event's data.
ACTOR: ContextVar[dict[str, str] | None] = ContextVar("authgate_audit_actor", default=None)
_COUNTERS: dict[str, Any] = {}

# The event types, by name. Stable: dashboards and queries depend on them.
SIGN_UP = "user.signed_up"
SIGN_IN = "session.signed_in"
SIGN_IN_FAILED = "session.sign_in_failed"
THROTTLED = "session.throttled"
REFRESHED = "session.refreshed"
REFRESH_REUSED = "session.refresh_token_reused"
SIGNED_OUT = "session.signed_out"
SIGNED_OUT_ALL = "session.signed_out_all"
SESSION_REVOKED = "session.revoked"
ACCOUNT_LOCKED = "membership.locked"
PASSWORD_CHANGED = "user.password_changed"
PASSWORD_REHASHED = "user.password_rehashed"
ADMIN_ACTION = "admin.action"
STEPPED_UP = "session.stepped_up"
ORGANISATION_SELECTED = "session.organisation_selected"
PASSWORD_RESET_REQUESTED = "user.password_reset_requested"


class Audit:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def record(self, tx: Tx, type: str, *, realm_id: str | None,
                     user_id: str | None = None, session_id: str | None = None,
                     organisation_id: str | None = None, client: ClientInfo | None = None,
                     **data: Any) -> None:
        event = self.event(type, realm_id=realm_id, user_id=user_id, session_id=session_id,
                           organisation_id=organisation_id, client=client, **data)
        await tx.audit.add(event)
        self.counted(event)

    def event(self, type: str, *, realm_id: str | None, user_id: str | None = None,
              session_id: str | None = None, organisation_id: str | None = None,
              client: ClientInfo | None = None, **data: Any) -> AuditEvent:
        """An event to hand to a repository that records it as part of a larger write; call
        ``counted`` once that write is done."""
        actor = ACTOR.get()
        if actor is not None:
            data = {**actor, **data}
        return AuditEvent(
            type=type, realm_id=realm_id, at=self.core.now(), user_id=user_id,
            session_id=session_id, organisation_id=organisation_id,
            ip=client.ip if client else None,
            user_agent=(client.user_agent or "")[:512] or None if client else None,
            data=data,
        )

    @staticmethod
    def counted(event: AuditEvent) -> None:
        counter = _COUNTERS.get(event.type)
        if counter is None:  # the labelled child, found once per type (labels() costs more)
            counter = _COUNTERS[event.type] = EVENTS.labels(type=event.type)
        counter.inc()

    async def recent(self, realm_id: str | None, *, limit: int = 50,
                     user_id: str | None = None) -> list[AuditEvent]:
        async with self.core.store.transaction() as tx:
            return await tx.audit.recent(realm_id, limit=limit, user_id=user_id)

    async def sign_ins(self, realm_id: str, user_id: str, *, limit: int = 50) -> list[AuditEvent]:
        """A user's successful sign-ins, newest first."""
        async with self.core.store.transaction() as tx:
            return await tx.audit.recent(realm_id, limit=limit, user_id=user_id,
                                         types=(SIGN_IN,))
