"""What the classroom tests share: an identity with accounts in several organisations, and the
PIN or reset token read out of the mail the real SMTP server received."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from authgate.config import Settings, load_master_secret
from authgate.core.engine import Core
from authgate.core.models import Organisation, Realm, User, utcnow
from authgate.core.users import NewUser
from authgate.dialects.classroom import organisation_settings
from authgate.mail.worker import OutboxWorker
from tests.conftest import PASSWORD, MailBox

PIN_LINE = re.compile(r"Your sign-in PIN is: ([0-9]{6})")
RESET_CODE = re.compile(r"[?&]token=([A-Za-z0-9_-]+)")


def org_name(prefix: str = "org") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Identity:
    realm: Realm
    user: User
    email: str
    university: Organisation  # roles Student and Teacher; PIN required for teachers
    company: Organisation  # role Account Admin; no settings


async def classroom_identity(core: Core, email: str, *, realm: Realm | None = None,
                             university_settings: dict[str, Any] | None = None,
                             company_settings: dict[str, Any] | None = None) -> Identity:
    """One identity with three accounts: Student and Teacher at a university that requires a
    PIN of teachers and locks after 3 failures, and Account Admin at a company."""
    realm = realm or await core.realms.require(core.settings.classroom_realm)
    user = await core.users.create(realm, NewUser(email=email, password=PASSWORD,
                                                  given_name="Cy", family_name="Lee"))
    university = await core.organisations.create(
        realm, org_name("uni"), display_name="Cy's University",
        settings=organisation_settings(university_settings or {
            "enableLti": False, "mfaForStudents": False, "mfaForTeachers": True,
            "allowGenericUsers": False, "defaultTratSettings": [5, 3, 1, 0],
            "maxFailedSignInAttempts": 3}))
    company = await core.organisations.create(
        realm, org_name("co"), display_name="Cy",
        settings=organisation_settings(company_settings) if company_settings else None)
    await core.organisations.add_member(realm, university, user.id, roles=["Student", "Teacher"])
    await core.organisations.add_member(realm, company, user.id, roles=["Account Admin"])
    return Identity(realm, user, email, university, company)


def body_of(message: Any) -> str:
    return message.get_payload(decode=True).decode()


async def delivered_pin(core: Core, mailbox: MailBox, email: str, *, after: int = 0) -> str:
    """Deliver the outbox over SMTP and read the PIN out of mail number ``after`` + 1 to
    ``email``."""
    return PIN_LINE.search(await delivered_body(core, mailbox, email, after=after)).group(1)


async def delivered_body(core: Core, mailbox: MailBox, email: str, *, after: int = 0) -> str:
    """Deliver the outbox over SMTP until mail number ``after`` + 1 to ``email`` arrives."""
    for _ in range(300):
        await OutboxWorker(core).run_once()
        if mailbox.count_to(email) > after:
            break
        await asyncio.sleep(0.05)
    assert mailbox.count_to(email) == after + 1, "expected exactly one new mail"
    return body_of(await mailbox.wait_for(email))


class Clock:
    """A controllable clock for a Core: real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


@asynccontextmanager
async def clocked_core(settings: Settings, core: Core) -> AsyncIterator[tuple[Core, Clock]]:
    """A second Core on the same store whose clock the test controls."""
    clock = Clock()
    clocked = Core(settings, core.store, load_master_secret(settings), clock=clock)
    try:
        yield clocked, clock
    finally:
        clocked.hasher.close()  # the store belongs to ``core``
