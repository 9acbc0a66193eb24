"""What every HTTP surface shares: JSON responses, safe body parsing, client info, and a route
class that turns every failure into the surface's own error shape.

A surface (the native API, each dialect) subclasses ``Surface`` and implements ``render``: the one
place where core error codes become its wire format. Its routers use ``surface.route_class``, so
that core errors, malformed bodies, validation errors and HTTP errors all come out in that shape,
and nothing a client sends can produce a 500.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

import orjson
import structlog
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from authgate.core.errors import AuthError, ErrorCode
from authgate.core.models import ClientInfo, has_nul
from authgate.core.ports import StoreUnavailable, UnstorableText, ValueTooLong

log = structlog.get_logger("authgate.http")

# Seconds a client is told to wait when the database is unavailable.
STORE_RETRY_AFTER = 1


# What every answer carrying a token or personal data says to caches (RFC 6749 §5.1).
NO_STORE: Mapping[str, str] = MappingProxyType({"Cache-Control": "no-store",
                                                "Pragma": "no-cache"})
_NO_STORE_RAW = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                 for name, value in NO_STORE.items()]


class JSONResponse(Response):
    """orjson-encoded JSON (about ten times faster than the stdlib encoder)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        """``NO_STORE``, the headers of every token and userinfo answer, is added already
        encoded."""
        if headers is NO_STORE:
            super().init_headers(None)
            self.raw_headers.extend(_NO_STORE_RAW)
        else:
            super().init_headers(headers)


class BadRequest(Exception):
    """The request cannot be read: malformed JSON, wrong content type, a field of a wrong type.

    ``field`` names the offending field when there is one; ``location`` says where it was.
    """

    def __init__(self, message: str, *, field: str | None = None, location: str = "body",
                 value: Any = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.location = location
        self.value = value
        self.status = status


def json_body(properties: dict[str, Any], *, required: tuple[str, ...] = (),
              optional: bool = False) -> dict[str, Any]:
    """``openapi_extra`` for a handler that reads its JSON object itself (``read_body``): the
    request body the OpenAPI document shows for it."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return {"requestBody": {"required": not optional,
                            "content": {"application/json": {"schema": schema}}}}


async def read_body(request: Request, *, allow_form: bool = True,
                    allow_empty: bool = False) -> dict[str, Any]:
    """Parse a JSON object or a form-urlencoded body into a dict, or raise BadRequest."""
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("The request body is empty.")
    if content_type in ("application/x-www-form-urlencoded",) and allow_form:
        try:
            form = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                  strict_parsing=False, max_num_fields=200))
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("The form body is malformed.") from None
        if (b"%00" in raw or b"\x00" in raw) and has_nul(form):
            raise BadRequest(NUL_REFUSED)
        return form
    if content_type and not (content_type == "application/json"
                             or content_type.endswith("+json") or content_type == "text/json"
                             or content_type == "text/plain"):
        raise BadRequest(f"Unsupported content type {content_type!r}.", status=415)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(data) > MAX_JSON_DEPTH:
        raise BadRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
    if b"\\u0000" in raw and has_nul(data):
        raise BadRequest(NUL_REFUSED)
    return data


# No store keeps a NUL character in text (PostgreSQL refuses it): refused at the door.
NUL_REFUSED = "Text must not contain NUL characters."
# Deeper JSON is refused at the door: what is kept (custom attributes) must encode again, and
# walking it must not exhaust the stack (orjson encodes at most 254 levels).
MAX_JSON_DEPTH = 32


def _depth(value: Any) -> int:
    """How deeply a parsed JSON value nests (a scalar: 0), walked without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        pending.extend((child, level + 1) for child in children)
    return deepest


def string_field(data: dict[str, Any], name: str, *, required: bool = False,
                 max_length: int = 4096, location: str = "body") -> str | None:
    """A string field, or None when absent; BadRequest when of another type or too long."""
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise BadRequest(f"{name} is required.", field=name, location=location)
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string.", field=name, location=location, value=value)
    if len(value) > max_length:
        raise BadRequest(f"{name} is too long.", field=name, location=location)
    return value


def bool_field(data: dict[str, Any], name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", ""):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if value is None:
        return default
    raise BadRequest(f"{name} must be a boolean.", field=name, value=value)


def client_info(request: Request, *, device_key: str | None = None) -> ClientInfo:
    """Who is asking. X-Forwarded-For is believed only from configured trusted proxies."""
    peer = request.client.host if request.client else None
    trusted = request.app.state.trusted_proxies
    ip = peer
    if peer and trusted and _in(_address(peer), trusted):
        # Every X-Forwarded-For line, in order: a proxy may add a line of its own after the
        # client's. Walking from the right, the first hop we do not trust is the client; a hop
        # that is not an address was not written by a proxy, and ends the walk.
        forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break
            ip = hop
            if not _in(address, trusted):
                break
    return ClientInfo(ip=ip, user_agent=request.headers.get("user-agent"), device_key=device_key)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, an IPv4-mapped one as its IPv4 address (a dual-stack listener sees an
    IPv4 proxy as ``::ffff:10.0.0.5``)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        networks: list[Any]) -> bool:
    return address is not None and any(address in net for net in networks)


def bearer_token(request: Request, scheme: str = "bearer") -> str | None:
    header = request.headers.get("authorization", "")
    kind, _, value = header.partition(" ")
    if kind.lower() != scheme.lower() or not value.strip():
        return None
    return value.strip()


# What a surface turns into its own error shape (``Surface.handle``); anything else is a bug.
HANDLED = (AuthError, BadRequest, RequestValidationError, HTTPException, json.JSONDecodeError,
           UnicodeDecodeError, UnstorableText, StoreUnavailable)


class Surface:
    """One HTTP surface's error envelope. Subclasses implement ``render``."""

    name = "surface"

    def render(self, request: Request, error: AuthError) -> Response:  # pragma: no cover
        raise NotImplementedError

    def render_bad_request(self, request: Request, error: BadRequest) -> Response:
        return self.render(request, AuthError(ErrorCode.INVALID_REQUEST, error.message,
                                              details={"field": error.field,
                                                       "location": error.location,
                                                       "status": error.status}))

    def render_validation(self, request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header")]
        where = first.get("loc", ("body",))[0] if first.get("loc") else "body"
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg', 'invalid')}" if field else "The request is invalid."
        return self.render_bad_request(request, BadRequest(message, field=field,
                                                           location=str(where),
                                                           status=422))

    def render_http(self, request: Request, error: HTTPException) -> Response:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.INVALID_REQUEST,
                401: ErrorCode.INVALID_TOKEN, 403: ErrorCode.FORBIDDEN}.get(
            error.status_code, ErrorCode.INVALID_REQUEST)
        return self.render(request, AuthError(code, str(error.detail),
                                              details={"status": error.status_code}))

    def handle(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, AuthError):
            return self.render(request, exc)
        if isinstance(exc, BadRequest):
            return self.render_bad_request(request, exc)
        if isinstance(exc, RequestValidationError):
            return self.render_validation(request, exc)
        if isinstance(exc, HTTPException):
            return self.render_http(request, exc)
        if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
            return self.render_bad_request(request, BadRequest("The request body is malformed."))
        if isinstance(exc, ValueTooLong):
            log.error("value too long for its column", path=request.url.path)  # a missing bound
            return self.render_bad_request(request, BadRequest("A value in the request is too "
                                                               "long."))
        if isinstance(exc, UnstorableText):
            return self.render_bad_request(request, BadRequest(NUL_REFUSED))
        if isinstance(exc, StoreUnavailable):
            # The cause's type only: a driver's message may name hosts and users.
            log.warning("store unavailable", path=request.url.path, cause=str(exc))
            return self.render(request, AuthError(ErrorCode.TEMPORARILY_UNAVAILABLE,
                                                  retry_after=STORE_RETRY_AFTER))
        raise exc

    @property
    def route_class(self) -> type[APIRoute]:
        surface = self

        class SurfaceRoute(APIRoute):
            def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
                handler = super().get_route_handler()

                async def guarded(request: Request) -> Response:
                    request.state.surface = surface
                    try:
                        return await handler(request)
                    except HANDLED as exc:
                        return surface.handle(request, exc)

                return guarded

        return SurfaceRoute
