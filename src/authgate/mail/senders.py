"""Ways to deliver one mail: SMTP, or the log."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Protocol

import aiosmtplib
import structlog

from authgate.config import Settings
from authgate.core.models import OutboxMail

log = structlog.get_logger("authgate.mail")


class Sender(Protocol):
    async def send(self, mail: OutboxMail) -> None: ...


def build_message(mail: OutboxMail, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = mail.recipient
    message["Subject"] = mail.subject
    message["Date"] = format_datetime(mail.created_at)
    message["Message-ID"] = make_msgid(idstring=mail.id.replace("-", ""))
    message["X-Authgate-Template"] = mail.template
    message.set_content(mail.body_text)
    return message


class SmtpSender:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, mail: OutboxMail) -> None:
        s = self.settings
        await aiosmtplib.send(
            build_message(mail, s.mail_from), hostname=s.smtp_host, port=s.smtp_port,
            username=s.smtp_username or None,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            use_tls=s.smtp_tls == "tls", start_tls=True if s.smtp_tls == "starttls" else False,
            timeout=s.smtp_timeout)


class LogSender:
    """Development default: the mail is written to the log, codes included, so a developer can
    finish a flow without a mail server. Never use it in production."""

    async def send(self, mail: OutboxMail) -> None:
        log.warning("mail not sent (AUTHGATE_MAIL_BACKEND=log)", to=mail.recipient,
                    subject=mail.subject, body=mail.body_text)


def sender_for(settings: Settings) -> Sender:
    return SmtpSender(settings) if settings.mail_backend == "smtp" else LogSender()
