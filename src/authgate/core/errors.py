"""The core's error vocabulary.

Every failure the core can report is one member of ``ErrorCode``. The values are stable wire
names: never rename one. Each HTTP surface maps codes to its own envelope in one place
(``api/errors.py``, and one mapping per dialect). Messages here are safe to show to clients:
they never carry secrets, and never say whether an account exists unless the realm allows it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # Requests.
    INVALID_REQUEST = "invalid_request"
    INVALID_SCOPE = "invalid_scope"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    # Credentials and accounts.
    INVALID_CREDENTIALS = "invalid_credentials"
    USER_NOT_FOUND = "user_not_found"
    WRONG_PASSWORD = "wrong_password"
    USER_DISABLED = "user_disabled"
    USER_ALREADY_EXISTS = "user_already_exists"
    WEAK_PASSWORD = "weak_password"
    ACCOUNT_LOCKED = "account_locked"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    EMAIL_NOT_VERIFIED = "email_not_verified"
    # Tokens and sessions.
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    REFRESH_TOKEN_REUSED = "refresh_token_reused"
    SESSION_REVOKED = "session_revoked"
    INVALID_CODE = "invalid_code"
    CODE_EXPIRED = "code_expired"
    # Realms, organisations, clients.
    REALM_NOT_FOUND = "realm_not_found"
    ORGANISATION_NOT_FOUND = "organisation_not_found"
    ORGANISATION_INACTIVE = "organisation_inactive"
    ORGANISATION_SUSPENDED = "organisation_suspended"
    MEMBERSHIP_INACTIVE = "membership_inactive"
    INVALID_API_KEY = "invalid_api_key"
    # Second factors and challenges.
    MFA_REQUIRED = "mfa_required"
    INVALID_MFA_CODE = "invalid_mfa_code"
    CHALLENGE_INVALID = "challenge_invalid"
    CHALLENGE_EXPIRED = "challenge_expired"
    DEVICE_NOT_FOUND = "device_not_found"
    # The server.
    TEMPORARILY_UNAVAILABLE = "temporarily_unavailable"


class AuthError(Exception):
    """A failure the core reports to a surface: a code, a safe message, optional details."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        retry_after: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.code = code
        self.message = message or DEFAULT_MESSAGES.get(code, code.value.replace("_", " "))
        self.retry_after = retry_after
        self.details = details or {}
        super().__init__(f"{code.value}: {self.message}")


DEFAULT_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "The request is malformed.",
    ErrorCode.INVALID_SCOPE: "The scope asks for more than was granted.",
    ErrorCode.NOT_FOUND: "Not found.",
    ErrorCode.FORBIDDEN: "Not allowed.",
    ErrorCode.INVALID_CREDENTIALS: "Invalid login id or password.",
    ErrorCode.USER_NOT_FOUND: "User not found.",
    ErrorCode.WRONG_PASSWORD: "Wrong password.",
    ErrorCode.USER_DISABLED: "The account is disabled.",
    ErrorCode.USER_ALREADY_EXISTS: "A user with this login id already exists.",
    ErrorCode.WEAK_PASSWORD: "The password does not meet the password policy.",
    ErrorCode.ACCOUNT_LOCKED: "The account is locked.",
    ErrorCode.TOO_MANY_ATTEMPTS: "Too many attempts; try again later.",
    ErrorCode.EMAIL_NOT_VERIFIED: "The e-mail address is not verified.",
    ErrorCode.INVALID_TOKEN: "The token is invalid.",
    ErrorCode.TOKEN_EXPIRED: "The token has expired.",
    ErrorCode.REFRESH_TOKEN_REUSED: "The refresh token was already used; the session is revoked.",
    ErrorCode.SESSION_REVOKED: "The session has ended.",
    ErrorCode.INVALID_CODE: "The code is invalid.",
    ErrorCode.CODE_EXPIRED: "The code has expired.",
    ErrorCode.REALM_NOT_FOUND: "Unknown realm.",
    ErrorCode.ORGANISATION_NOT_FOUND: "Unknown organisation.",
    ErrorCode.ORGANISATION_INACTIVE: "The organisation is not active.",
    ErrorCode.ORGANISATION_SUSPENDED: "The organisation is suspended.",
    ErrorCode.MEMBERSHIP_INACTIVE: "The membership is not active.",
    ErrorCode.INVALID_API_KEY: "The API key is invalid.",
    ErrorCode.MFA_REQUIRED: "A second factor is required.",
    ErrorCode.INVALID_MFA_CODE: "The second-factor code is invalid.",
    ErrorCode.CHALLENGE_INVALID: "The login challenge is invalid.",
    ErrorCode.CHALLENGE_EXPIRED: "The login challenge has expired.",
    ErrorCode.DEVICE_NOT_FOUND: "Unknown device.",
    ErrorCode.TEMPORARILY_UNAVAILABLE: "The service is temporarily unavailable; try again shortly.",
}
