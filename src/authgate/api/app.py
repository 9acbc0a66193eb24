"""The ASGI application: the native API, OIDC endpoints, admin, operations, and the dialects."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authgate import __version__, dialects
from authgate.api import (
    account,
    admin,
    admin_organisations,
    deps,
    devices,
    health,
    oauth,
    oidc,
    verification,
)
from authgate.api.docs import serve_docs
from authgate.api.errors import native
from authgate.api.lanes import lanes, server_error
from authgate.api.surface import NUL_REFUSED, BadRequest, JSONResponse, Surface
from authgate.config import Settings, load_master_secret
from authgate.core.completion import completed
from authgate.logging import configure_logging
from authgate.core.engine import Core
from authgate.background import Periodic
from authgate.mail.worker import OutboxWorker
from authgate.store.db import SqlStore
from authgate.store.migrate import upgrade

log = structlog.get_logger("authgate")

REQUESTS = Histogram("authgate_http_request_seconds", "HTTP request latency",
                     ["method", "status"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


async def build_core(settings: Settings) -> Core:
    """Open the store, bring the schema up to date, and make sure the default realm exists."""
    store = SqlStore.from_url(settings.database_url, pool_size=settings.db_pool_size,
                              statement_timeout=settings.db_statement_timeout,
                              idle_transaction_timeout=settings.db_idle_transaction_timeout)
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    await upgrade(store.engine)
    core = Core(settings, store, load_master_secret(settings))
    await core.realms.ensure_default()
    return core


def _freeze_startup_objects() -> None:
    """Keep the cyclic garbage collector off what start-up built (modules, routes, schemas,
    statements: hundreds of thousands of objects that live as long as the process). A full
    collection walks every tracked object; under load one ran every few seconds, and their
    pauses were the p99 latency (PostgreSQL userinfo: 99 ms before, 17-22 ms after) and about
    a tenth of the CPU of a request. Start-up garbage is collected first."""
    gc.collect()
    gc.freeze()


class RequestLimits:
    """Refuse what no handler should see: request bodies over ``limit`` bytes, whether
    announced or streamed, and NUL characters in the path or the query (no store keeps them
    in text; bodies are checked where they are parsed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            await self._refuse(scope, receive, send, BadRequest(NUL_REFUSED))
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await self._refuse(scope, receive, send, _TOO_LARGE)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send, _TOO_LARGE)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send,
                      refusal: BadRequest) -> None:
        """The refusal in the shape of the surface the path belongs to; the connection is
        closed (a body may be left unread)."""
        request = Request(scope, receive)
        response = _surface_for(request).render_bad_request(request, refusal)
        if refusal.status == 413:  # whatever status the surface gives other bad requests
            response.status_code = 413
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


_TOO_LARGE = BadRequest("The request body is too large.", status=413)


class _TooLarge(Exception):
    pass


class Timing:
    """Record request latency by method and status class (not by path: bounded cardinality)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            REQUESTS.labels(scope["method"], f"{status // 100}xx").observe(
                time.perf_counter() - start)


def _surface_for(request: Request) -> Surface:
    surface = getattr(request.state, "surface", None)
    if surface is not None:
        return surface
    path = request.url.path
    for prefix, candidate in request.app.state.surface_prefixes:
        if path == prefix or path.startswith(prefix + "/"):
            return candidate
    return native


def create_app(settings: Settings, core: Core | None = None) -> SurfaceDispatch:
    """Build the application. With ``core`` given (tests), the caller owns its lifecycle."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = core is None
        app.state.core = core if core is not None else await build_core(settings)
        workers = [start() for start in app.state.background]
        if owned:
            _freeze_startup_objects()

        async def shut_down() -> None:
            for worker in workers:
                await worker.stop()
            if owned:
                await app.state.core.close()

        try:
            yield
        except asyncio.CancelledError:
            # A forced exit (a second Ctrl-C): uvicorn skips the shutdown, and the end of the
            # event loop cancels this task with every other. The shutdown runs all the same,
            # and the exit, which is what was asked for, is not reported as an error.
            await completed(shut_down())
            return
        await shut_down()

    configure_logging(settings)
    # /docs is served by api/docs.py (its files pinned and integrity-checked); no /redoc.
    app = FastAPI(title="Authgate", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  description="A self-hosted authentication server: OAuth 2.0 token semantics, "
                              "JWT, JWKS, OpenID Connect discovery, and five sign-in dialects.")
    app.state.settings = settings
    app.state.log = log
    app.state.core = core
    app.state.background = [
        lambda: OutboxWorker(app.state.core).start(),
        lambda: Periodic("housekeeping", app.state.core.housekeeping.purge,
                         settings.housekeeping_interval).start(),
    ]
    app.state.trusted_proxies = [ipaddress.ip_network(p, strict=False)
                                 for p in settings.trusted_proxies]
    app.state.surface_prefixes = []

    # Routes are matched one by one, in the order they are included, at a few microseconds
    # each. So requests are dispatched by their first path segment (``SurfaceDispatch``) to
    # apps holding only the routes under it: the per-realm routes, the admin API, each
    # dialect, and each native router for the segments it alone uses. The native app holds
    # every native route too (health probes first): it serves what no segment claims, the
    # OpenAPI document, and any dialect served at the root. A dialect is served at the root
    # so that its clients work unchanged: where its route and a native one share a path and
    # method, the dialect's is matched first (the native one stays under /realms/{realm}).
    app.include_router(health.router)
    serve_docs(app)
    served, rooted = mount_dialects(app, settings)
    per_realm, administration = _sub_app(app, settings), _sub_app(app, settings)
    native_routers = (oauth.router, oidc.router, account.router, verification.router,
                      devices.router)
    for router in native_routers:
        app.include_router(router)
        per_realm.include_router(router, prefix="/realms/{realm}")
        _warn_shadowed(router, rooted)
    administration.include_router(admin.router)
    administration.include_router(admin_organisations.router)
    by_prefix: dict[str, FastAPI] = {"/realms": per_realm, "/admin": administration, **served}
    owners = _segment_owners((health.router, *native_routers), rooted)
    router_apps: dict[int, FastAPI] = {}  # by id of the native router the app serves
    for router in (health.router, *native_routers):
        segments = [s for s, owner in owners.items() if owner is router and s not in by_prefix]
        if segments:
            router_apps[id(router)] = router_app = _sub_app(app, settings)
            router_app.include_router(router)
            by_prefix.update(dict.fromkeys(segments, router_app))
    for router in (health.router, *native_routers, *rooted):  # what the native app serves
        for route in router.routes:
            first = _first_segment(route)
            if first in by_prefix and by_prefix[first] is not router_apps.get(id(router)):
                raise RuntimeError(f"{route.path} is unreachable: {first} has an app of its own")
    _serve(app, settings)
    _document_together(app, [per_realm, administration, *served.values()],
                       native=[app, per_realm, administration])
    # The hot endpoints, in lanes of their own (api/lanes.py): under /realms/{realm}, and at the
    # root unless a dialect served there takes the same method and path.
    hot = lanes(native_routers, native, lambda lane: _wrapped(lane, settings))
    taken = _taken(rooted)
    return SurfaceDispatch(app, by_prefix,
                           lanes={key: lane for key, lane in hot.items() if key not in taken},
                           realm_lanes=hot)


def _taken(rooted: list[APIRouter]) -> set[tuple[str, str]]:
    """The (method, path) pairs the dialects served at the root answer."""
    return {(method, route.path) for dialect in rooted for route in dialect.routes
            for method in getattr(route, "methods", ())}


def _warn_shadowed(router: APIRouter, rooted: list[APIRouter]) -> None:
    """Say which native routes a dialect served at the root takes over."""
    taken = _taken(rooted)
    for route in router.routes:
        for method in sorted(getattr(route, "methods", ())):
            if (method, route.path) in taken:
                log.warning("native route served only under /realms/{realm}: a dialect "
                            "served at the root answers it", method=method, path=route.path)


def _first_segment(route: Any) -> str:
    return "/" + getattr(route, "path", "/").split("/", 2)[1]


def _segment_owners(routers: tuple[APIRouter, ...],
                    rooted: list[APIRouter]) -> dict[str, APIRouter]:
    """The first path segments that one native router alone uses (no other native router,
    no dialect served at the root), and that router."""
    users: dict[str, list[APIRouter]] = {}
    for router in (*routers, *rooted):
        for segment in {_first_segment(route) for route in router.routes}:
            users.setdefault(segment, []).append(router)
    return {segment: found[0] for segment, found in users.items()
            if len(found) == 1 and found[0] in routers}


def _sub_app(app: FastAPI, settings: Settings) -> FastAPI:
    """An app for the routes under one first path segment: ``app``'s state, error handling
    and middleware; documented in ``app``'s OpenAPI document."""
    sub_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    sub_app.state = app.state
    _serve(sub_app, settings)
    return sub_app


def _serve(app: FastAPI, settings: Settings) -> None:
    """What every app of the server shares: error handling and the outer middleware."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _surface_for(request).render_http(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _surface_for(request).render_validation(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return server_error(request, exc)

    for middleware, options in _outer_middleware(settings):
        app.add_middleware(middleware, **options)


def _outer_middleware(settings: Settings) -> list[tuple[Any, dict[str, Any]]]:
    """The middleware around every app of the server and every lane, innermost first."""
    return [(RequestLimits, {"limit": settings.max_body_bytes}), (Timing, {})]


def _wrapped(app: ASGIApp, settings: Settings) -> ASGIApp:
    """``app`` inside the outer middleware, as ``add_middleware`` stacks it on an app."""
    for middleware, options in _outer_middleware(settings):
        app = middleware(app, **options)
    return app


def mount_dialects(app: FastAPI,
                   settings: Settings) -> tuple[dict[str, FastAPI], list[APIRouter]]:
    """An app of its own for each dialect, served under its prefix by ``SurfaceDispatch``
    (sharing the native app's state); a dialect served at the root is also included in the
    native app. Returns the apps by prefix, and the routers included at the root."""
    served: dict[str, FastAPI] = {}
    rooted: list[APIRouter] = []
    for name in settings.dialects:
        if name not in dialects.REGISTRY:
            continue
        module: Any = dialects.load(name)
        prefix = f"/{name}"
        dialect_app = _sub_app(app, settings)
        dialect_app.include_router(module.router, prefix=prefix)
        served[prefix] = dialect_app
        app.state.surface_prefixes.append((prefix, module.surface))
        if name in settings.dialects_at_root:
            app.include_router(module.router)
            rooted.append(module.router)
        for start in getattr(module, "background", ()):
            app.state.background.append(start)
    return served, rooted


def _document_together(app: FastAPI, others: list[FastAPI], native: list[FastAPI]) -> None:
    """One OpenAPI document (``/openapi.json``, ``/docs``) for the native app and the dialects'.
    The native operations that take a bearer access token say so (``/docs`` then offers to
    authorise them); a dialect's credentials are its own, described in its documentation."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for other in others:
                part = get_openapi(title=app.title, version=app.version, routes=other.routes)
                schema["paths"].update(part["paths"])
                schema.setdefault("components", {}).setdefault("schemas", {}).update(
                    part.get("components", {}).get("schemas", {}))
            for path, operations in schema["paths"].items():
                if path.startswith("/realms/{realm}/"):
                    for operation in operations.values():
                        _document_realm(operation)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "An access token from POST /oauth/token."},
                **oauth.API_KEY_SCHEMES}
            for path, method in _bearer_operations(native):
                operation = schema["paths"].get(path, {}).get(method)
                if operation is not None:
                    operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# What takes a bearer access token: these dependencies, and the hot endpoints that read it
# themselves (FastAPI's dependency solving costs more than their work).
_BEARER_DEPENDENCIES = {deps.get_principal, deps.get_principal_with_user, deps.get_admin}
_BEARER_ENDPOINTS = {oidc.userinfo, oidc.userinfo_post}


def _bearer_operations(apps: list[FastAPI]) -> set[tuple[str, str]]:
    """(path, method) of each operation of ``apps`` that takes a bearer access token, as the
    OpenAPI document names them (the routers' prefixes included)."""
    def takes_bearer(dependant: Any) -> bool:
        return any(sub.call in _BEARER_DEPENDENCIES or takes_bearer(sub)
                   for sub in dependant.dependencies)

    return {(context.path_format, method.lower())
            for served in apps for context in iter_route_contexts(served.routes)
            if isinstance(context.original_route, APIRoute)
            and (context.endpoint in _BEARER_ENDPOINTS
                 or takes_bearer(context.original_route.dependant))
            for method in context.methods or ()}


_REALM_PARAMETER = {"name": "realm", "in": "path", "required": True,
                    "schema": {"type": "string"},
                    "description": "The realm's name; the same routes at the root serve the "
                                   "default realm."}


def _document_realm(operation: dict[str, Any]) -> None:
    """The ``realm`` path parameter, which the endpoints read from the path themselves."""
    parameters = operation.setdefault("parameters", [])
    if not any(p.get("name") == "realm" and p.get("in") == "path" for p in parameters):
        parameters.insert(0, dict(_REALM_PARAMETER))


class SurfaceDispatch:
    """The ASGI app servers run. A hot endpoint's method and path go to its lane
    (``api/lanes.py``); a request whose first path segment has an app of its own (a dialect's
    prefix, ``/realms``, ``/admin``, a native router's segment such as ``/oauth``) goes
    straight to it; everything else to the native app.

    FastAPI matches routes one by one (some 20 k instructions each): in one app holding every
    route, a dialect request paid for matching every native route first. Attributes not
    defined here are the native app's (``state``, ``openapi``, ...)."""

    def __init__(self, native: FastAPI, by_prefix: dict[str, FastAPI], *,
                 lanes: dict[tuple[str, str], ASGIApp] | None = None,
                 realm_lanes: dict[tuple[str, str], ASGIApp] | None = None) -> None:
        self.native = native
        self.by_prefix = by_prefix
        self.lanes = lanes or {}  # by (method, path) at the root
        self.realm_lanes = realm_lanes or {}  # by (method, path) under /realms/{realm}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.by_prefix:
            path = scope["path"]
            root = scope.get("root_path") or ""
            if root and path.startswith(root):
                path = path[len(root):]
            if scope["type"] == "http":
                lane = self._lane(scope, path)
                if lane is not None:
                    scope["app"] = self.native  # whose state the endpoint reads
                    await lane(scope, receive, send)
                    return
            end = path.find("/", 1)
            target = self.by_prefix.get(path if end < 0 else path[:end])
            if target is not None:
                await target(scope, receive, send)
                return
        await self.native(scope, receive, send)

    def _lane(self, scope: Scope, path: str) -> ASGIApp | None:
        """The lane serving this request, if any; under ``/realms/{realm}`` the realm's name
        becomes the path parameter the endpoint reads, as its route would have made it."""
        lane = self.lanes.get((scope["method"], path))
        if lane is None and path.startswith("/realms/"):
            realm, slash, rest = path[len("/realms/"):].partition("/")
            if realm and slash:
                lane = self.realm_lanes.get((scope["method"], slash + rest))
                if lane is not None:
                    scope["path_params"] = {"realm": realm}
        return lane

    def __getattr__(self, name: str) -> Any:
        return getattr(self.native, name)
