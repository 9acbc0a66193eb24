"""Delivery of the outbox's mails: over SMTP (aiosmtplib), or to the log in development."""
