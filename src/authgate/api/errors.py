"""The native API's error envelope: ``{"error": code, "error_description": text}`` (RFC 6749).

The one place where core error codes become native HTTP statuses and OAuth error codes.
"""

from __future__ import annotations

from fastapi import Request, Response

from authgate.api.surface import NO_STORE, BadRequest, JSONResponse, Surface
from authgate.core.errors import AuthError, ErrorCode

# core code -> (HTTP status, wire error code)
NATIVE_ERRORS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request"),
    ErrorCode.INVALID_SCOPE: (400, "invalid_scope"),
    ErrorCode.NOT_FOUND: (404, "not_found"),
    ErrorCode.FORBIDDEN: (403, "access_denied"),
    ErrorCode.INVALID_CREDENTIALS: (400, "invalid_grant"),
    ErrorCode.USER_NOT_FOUND: (400, "invalid_grant"),
    ErrorCode.WRONG_PASSWORD: (400, "invalid_grant"),
    ErrorCode.USER_DISABLED: (400, "invalid_grant"),
    ErrorCode.USER_ALREADY_EXISTS: (409, "user_already_exists"),
    ErrorCode.WEAK_PASSWORD: (400, "weak_password"),
    ErrorCode.ACCOUNT_LOCKED: (400, "invalid_grant"),
    ErrorCode.TOO_MANY_ATTEMPTS: (429, "slow_down"),
    ErrorCode.EMAIL_NOT_VERIFIED: (400, "invalid_grant"),
    ErrorCode.INVALID_TOKEN: (401, "invalid_token"),
    ErrorCode.TOKEN_EXPIRED: (401, "invalid_token"),
    ErrorCode.REFRESH_TOKEN_REUSED: (400, "invalid_grant"),
    ErrorCode.SESSION_REVOKED: (401, "invalid_token"),
    ErrorCode.INVALID_CODE: (400, "invalid_grant"),
    ErrorCode.CODE_EXPIRED: (400, "invalid_grant"),
    ErrorCode.REALM_NOT_FOUND: (404, "realm_not_found"),
    ErrorCode.ORGANISATION_NOT_FOUND: (404, "not_found"),
    ErrorCode.ORGANISATION_INACTIVE: (403, "access_denied"),
    ErrorCode.ORGANISATION_SUSPENDED: (403, "access_denied"),
    ErrorCode.MEMBERSHIP_INACTIVE: (403, "access_denied"),
    ErrorCode.INVALID_API_KEY: (401, "invalid_client"),
    ErrorCode.MFA_REQUIRED: (401, "mfa_required"),
    ErrorCode.INVALID_MFA_CODE: (400, "invalid_grant"),
    ErrorCode.CHALLENGE_INVALID: (400, "invalid_grant"),
    ErrorCode.CHALLENGE_EXPIRED: (400, "invalid_grant"),
    ErrorCode.DEVICE_NOT_FOUND: (404, "not_found"),
    ErrorCode.TEMPORARILY_UNAVAILABLE: (503, "temporarily_unavailable"),
}

# On the token endpoint, a bad grant is always 400 invalid_grant (RFC 6749 §5.2), but a bearer
# token refused elsewhere is 401 invalid_token with a WWW-Authenticate challenge (RFC 6750 §3).
TOKEN_ENDPOINT_GRANT_ERRORS = {ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED,
                               ErrorCode.SESSION_REVOKED}


class NativeSurface(Surface):
    name = "native"

    def render(self, request: Request, error: AuthError) -> Response:
        status, wire = NATIVE_ERRORS.get(error.code, (400, "invalid_request"))
        if getattr(request.state, "grant_endpoint", False) and \
                error.code in TOKEN_ENDPOINT_GRANT_ERRORS:
            status, wire = 400, "invalid_grant"
        wire = error.details.get("oauth_error", wire)
        if error.code is ErrorCode.INVALID_REQUEST and error.details.get("status") in (
                404, 405, 413, 415, 422):
            status = int(error.details["status"])
        body: dict[str, object] = {"error": wire, "error_description": error.message,
                                   "error_code": error.code.value}
        if error.code is ErrorCode.WEAK_PASSWORD and "problems" in error.details:
            body["problems"] = error.details["problems"]
        if error.details.get("field"):
            body["field"] = error.details["field"]
        headers = dict(NO_STORE)
        if error.code is ErrorCode.INVALID_API_KEY:
            # The two ways a protected resource may present its key (RFC 6749 §5.2).
            headers["WWW-Authenticate"] = f'Bearer error="{wire}", Basic realm="authgate"'
        elif status == 401:
            headers["WWW-Authenticate"] = f'Bearer error="{wire}"'
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return JSONResponse(body, status_code=status, headers=headers)

    def render_bad_request(self, request: Request, error: BadRequest) -> Response:
        return self.render(request, AuthError(ErrorCode.INVALID_REQUEST, error.message,
                                              details={"field": error.field,
                                                       "status": error.status}))


native = NativeSurface()
