"""Scopes: what a native sign-in may be granted, and which standard claims a grant shows.

A realm lists the scopes its clients may ask for (the realm setting ``scopes``, by default the
OpenID Connect ones): a password grant asking for any other is refused with ``invalid_scope``
(RFC 6749 §5.2) before its password is checked, so that no user can grant themselves a scope a
resource server trusts. A request naming no scope gets the realm's ``default_scope`` (§3.3).

The scopes ``profile``, ``email`` and ``phone`` decide which of the user's standard claims an
ID token and userinfo show (OIDC Core §5.4). A session with no recorded grant (a dialect's
sign-in) shows them all, as those services' own endpoints do.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import REALM_DEFAULTS, Realm

# OIDC Core §5.4; the claims Authgate keeps of each.
CLAIMS_OF_SCOPE: dict[str, frozenset[str]] = {
    "profile": frozenset({"name", "given_name", "middle_name", "family_name",
                          "preferred_username", "picture", "updated_at"}),
    "email": frozenset({"email", "email_verified"}),
    "phone": frozenset({"phone_number", "phone_number_verified"}),
}

# RFC 6749 §3.3: scope-token = 1*NQCHAR (printable ASCII but '"' and '\').
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]{1,100}")
MAX_SCOPES = 100
# The longest grant a session keeps (its column's length).
MAX_SCOPE_LENGTH = 1000


def normalise_scope(scope: str | None) -> str | None:
    """Scope tokens separated by spaces (only U+0020, RFC 6749 §3.3), each once, in the
    order given; None when empty."""
    if not scope:
        return None
    return " ".join(dict.fromkeys(token for token in scope.split(" ") if token)) or None


def grant(realm: Realm, requested: str | None) -> str:
    """The scope a sign-in asking for ``requested`` is granted: the realm's default when it
    asks for none; INVALID_SCOPE when it asks for one the realm does not list."""
    scope = normalise_scope(requested) or normalise_scope(realm.setting("default_scope"))
    if scope is None:
        raise AuthError(ErrorCode.INVALID_SCOPE, "No scope was asked for and the realm has "
                        "no default scope.")
    if len(scope) > MAX_SCOPE_LENGTH:
        raise AuthError(ErrorCode.INVALID_SCOPE,
                        f"A scope is at most {MAX_SCOPE_LENGTH} characters.")
    allowed = set(realm.setting("scopes"))
    refused = [token for token in scope.split(" ") if token not in allowed]
    if refused:
        # Only names a scope could have are repeated (error_description is printable ASCII
        # without '"' or '\\', RFC 6749 §5.2).
        named = " ".join(token for token in refused if SCOPE_TOKEN.fullmatch(token))[:200]
        raise AuthError(ErrorCode.INVALID_SCOPE, "The realm does not grant the scope asked "
                        "for" + (f": {named}." if named else "."))
    return scope


def still_granted(realm: Realm, scope: str) -> str:
    """The part of a recorded grant that its realm still lists; INVALID_SCOPE when nothing
    is left (the session must sign in again)."""
    allowed = realm.setting("scopes")
    tokens = scope.split(" ")
    for token in tokens:
        if token not in allowed:
            break
    else:  # the usual case, on every refresh
        return scope
    kept = [token for token in tokens if token in allowed]
    if not kept:
        raise AuthError(ErrorCode.INVALID_SCOPE, "The realm no longer grants the scope of "
                        "this session; sign in again.")
    return " ".join(kept)


def shown_claims(claims: dict[str, Any], scope: str | None) -> dict[str, Any]:
    """The standard ``claims`` a grant of ``scope`` shows (all of them when there is no
    recorded grant)."""
    if scope is None:
        return claims
    shown = _shown_names(scope)
    if shown is None:
        return claims
    return {name: value for name, value in claims.items() if name in shown}


_EVERY_CLAIM = frozenset().union(*CLAIMS_OF_SCOPE.values())


@functools.lru_cache(maxsize=256)
def _shown_names(scope: str) -> frozenset[str] | None:
    """The claim names a scope shows; None when it shows every one (on every userinfo and
    refresh: worked out once per scope)."""
    shown = frozenset().union(*(CLAIMS_OF_SCOPE.get(token, ()) for token in scope.split(" ")))
    return None if shown >= _EVERY_CLAIM else shown


def check_settings(settings: dict[str, Any]) -> list[str]:
    """Problems with a realm's ``scopes`` (a list of scope names) and ``default_scope`` (a
    space-separated string of them, all listed, at most ``MAX_SCOPE_LENGTH`` characters)."""
    problems: list[str] = []
    for name in ("scopes", "default_scope"):
        if name in settings:
            problems += _check_setting(name, settings[name])
    if not problems:
        listed = set(settings.get("scopes", REALM_DEFAULTS["scopes"]))
        default = normalise_scope(settings.get("default_scope", REALM_DEFAULTS["default_scope"]))
        if default is not None and not set(default.split(" ")) <= listed:
            problems.append("default_scope names scopes that scopes does not list.")
    return problems


def _check_setting(name: str, value: Any) -> list[str]:
    tokens: Iterable[Any]
    if name == "scopes":
        if not isinstance(value, list):
            return ["scopes must be a list of scope names."]
        tokens = value
    else:
        if not isinstance(value, str):
            return ["default_scope must be a string of space-separated scope names."]
        tokens = [token for token in value.split(" ") if token]
    tokens = list(tokens)
    if len(tokens) > MAX_SCOPES:
        return [f"{name} names more than {MAX_SCOPES} scopes."]
    if not all(isinstance(token, str) and SCOPE_TOKEN.fullmatch(token) for token in tokens):
        return [f"{name}: a scope name is 1-100 printable ASCII characters, without spaces, "
                "double quotes or backslashes."]
    if name == "default_scope" and len(normalise_scope(value) or "") > MAX_SCOPE_LENGTH:
        return [f"default_scope is at most {MAX_SCOPE_LENGTH} characters."]
    return []
