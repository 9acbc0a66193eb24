"""E-mail from the core: rendered from templates and written to the outbox in the caller's
transaction, so a mail exists exactly when the change that needs it commits. Delivery (SMTP, or
the log in development) is ``mail/``'s job.
"""

from __future__ import annotations

import string
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from authgate.core.models import OutboxMail
from authgate.core.ports import Tx
from authgate.crypto.tokens import new_id

if TYPE_CHECKING:
    from authgate.core.engine import Core

# template name -> (subject, plain-text body), in string.Template syntax.
TEMPLATES: dict[str, tuple[str, str]] = {
    "verify_email": (
        "Verify your e-mail address",
        "Hello $name,\n\nConfirm your e-mail address with this code: $code\n\n"
        "Or open this link: $link\n\nThe code expires in $minutes minutes. If you did not sign "
        "up, ignore this message.\n",
    ),
    "reset_password": (
        "Reset your password",
        "Hello $name,\n\nUse this code to reset your password: $code\n\n"
        "Or open this link: $link\n\nThe code expires in $minutes minutes. If you did not ask "
        "for a reset, ignore this message: your password has not changed.\n",
    ),
    "sign_in_pin": (
        "Your sign-in PIN",
        "Hello $name,\n\nYour sign-in PIN is: $code\n\nIt expires in $minutes minutes. If you "
        "did not try to sign in, change your password.\n",
    ),
}


class Mail:
    def __init__(self, core: Core) -> None:
        self.core = core

    def render(self, template: str, context: dict[str, Any]) -> tuple[str, str]:
        subject, body = TEMPLATES[template]
        values = {key: "" if value is None else str(value) for key, value in context.items()}
        return (string.Template(subject).safe_substitute(values),
                string.Template(body).safe_substitute(values))

    async def enqueue(self, tx: Tx, *, realm_id: str | None, to: str, template: str,
                      **context: Any) -> OutboxMail:
        subject, body = self.render(template, context)
        now = self.core.now()
        mail = OutboxMail(id=new_id(), realm_id=realm_id, recipient=to, subject=subject,
                          body_text=body, template=template, created_at=now,
                          next_attempt_at=now - timedelta(seconds=1))
        await tx.outbox.add(mail)
        return mail
