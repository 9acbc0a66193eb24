"""Random secrets and their digests: refresh tokens, device keys, API keys, PINs."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid


def new_id() -> str:
    return str(uuid.uuid4())


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
