"""Hot endpoints served without FastAPI's request machinery.

The token endpoint, userinfo and introspection carry most of a deployment's requests: every
refresh, and every resource server's check of a bearer or a token. Through FastAPI, a request
passes the framework's middleware stack (server errors, telemetry, body limits, exception
handlers, exit stacks), the router's matching and the route's handler: about 300 Python calls
around an endpoint that reads its own body and resolves its own realm (a refresh: 1,181 calls,
876 in a lane).

A lane serves one such endpoint for one method and path, with what of that machinery it
needs: the server's own outer middleware (``api/app.py``: body limit, NUL refusal, timing), its
surface's error shapes, and the handling of an unexpected error as FastAPI's would (a logged
500, and the error raised on to the server). FastAPI still holds the route: it documents it and
answers every other method on its path (405); where a dialect served at the root takes the same
method and path, the dialect's route answers it there, as FastAPI would have chosen
(``api/app.py``).

An endpoint is marked with ``@hot`` under its router's decorator. It must take only the
request: a lane solves no dependencies, so one with parameters or dependencies is refused when
the app is built.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from authgate.api.surface import HANDLED, JSONResponse, Surface

log = structlog.get_logger("authgate")

Endpoint = Callable[[Request], Awaitable[Response]]

_HOT = "__authgate_hot__"


def hot(endpoint: Endpoint) -> Endpoint:
    """Serve ``endpoint`` in a lane (put it under the router's decorator)."""
    setattr(endpoint, _HOT, True)
    return endpoint


def server_error(request: Request, exc: Exception) -> Response:
    """A bug, not bad input: logged (no bodies, no headers: no secrets), answered plainly."""
    log.error("unhandled error", path=request.url.path, error=type(exc).__name__,
              exc_info=exc)
    return JSONResponse({"error": "server_error",
                         "error_description": "An internal error occurred."},
                        status_code=500)


class Lane:
    """One endpoint, served with its surface's error handling. The scope names the app whose
    state the endpoint reads (``request.app``), as a Starlette app names itself."""

    __slots__ = ("endpoint", "surface")

    def __init__(self, endpoint: Endpoint, surface: Surface) -> None:
        self.endpoint, self.surface = endpoint, surface

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        request.state.surface = self.surface
        try:
            response = await self.endpoint(request)
        except HANDLED as exc:
            response = self.surface.handle(request, exc)
        except Exception as exc:
            # As FastAPI's outermost middleware does: the answer, then the error for the
            # server (which logs it; a test client raises it).
            await server_error(request, exc)(scope, receive, send)
            raise
        await response(scope, receive, send)


def lanes(routers: Iterable[Any], surface: Surface,
          wrap: Callable[[ASGIApp], ASGIApp]) -> dict[tuple[str, str], ASGIApp]:
    """The lanes of the ``@hot`` endpoints of ``routers``, by (method, path), each wrapped in
    ``wrap`` (the outer middleware) and answering in ``surface``'s shape."""
    found: dict[tuple[str, str], ASGIApp] = {}
    for router in routers:
        for route in router.routes:
            if not (isinstance(route, APIRoute) and getattr(route.endpoint, _HOT, False)):
                continue
            dependant = route.dependant
            if (dependant.dependencies or dependant.path_params or dependant.query_params
                    or dependant.header_params or dependant.cookie_params
                    or dependant.body_params):
                raise RuntimeError(f"{route.path}: a hot endpoint takes only the request")
            lane = wrap(Lane(route.endpoint, surface))
            for method in route.methods:
                found[(method, route.path)] = lane
    return found
