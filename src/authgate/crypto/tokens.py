"""Random secrets and their digests: refresh tokens, device keys, API keys, PINs."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time


def new_id() -> str:
    """A random (version 4) UUID in its canonical text form: what ``str(uuid.uuid4())``
    gives, without building a ``UUID`` object (a few microseconds, several times a request)."""
    return _uuid_text(bytearray(os.urandom(16)), 4)


def new_ordered_id(at_ms: int | None = None) -> str:
    """A time-ordered (version 7, RFC 9562) UUID in canonical text form: the milliseconds
    since the epoch (``at_ms``, else now), then 74 random bits. Rows keyed by such ids gather
    at the end of their index instead of anywhere in it; the id tells when it was made, so it
    is only for rows that keep that anyway and never leave the store."""
    if at_ms is None:
        at_ms = time.time_ns() // 1_000_000
    return _uuid_text(bytearray(at_ms.to_bytes(6, "big") + os.urandom(10)), 7)


def _uuid_text(raw: bytearray, version: int) -> str:
    """16 bytes as a UUID of ``version`` with the RFC 9562 (formerly 4122) variant, in its
    canonical text form."""
    raw[6] = (raw[6] & 0x0F) | (version << 4)
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def new_token(nbytes: int = 32) -> str:
    """A URL-safe random token with ``nbytes`` of entropy."""
    return secrets.token_urlsafe(nbytes)


def new_pin(digits: int = 6) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(digits))


def digest(token: str) -> str:
    """The stored form of a high-entropy token: SHA-256, hex. Never store the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
