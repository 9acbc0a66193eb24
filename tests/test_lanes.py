"""Hot endpoints are served in lanes (api/lanes.py): the same answers as their FastAPI routes,
the same outer middleware, and none of the framework's request machinery. (Introspection's
answers are compared here too; what they mean is tested in test_native_api.py.)"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from prometheus_client import REGISTRY

from authgate.api import app as app_module
from authgate.api.app import create_app
from authgate.api.errors import native
from authgate.api.lanes import hot, lanes
from authgate.api.surface import JSONResponse
from authgate.core.models import Realm
from tests.conftest import asgi_client, realm_url, unique_email
from tests.test_native_api import resource_server

PASSWORD = "correct horse battery staple"

# The headers an answer's meaning travels in (the date and the length of a token differ).
COMPARED_HEADERS = ("content-type", "cache-control", "pragma", "www-authenticate",
                    "retry-after")


@pytest.fixture
async def signed_in(client: httpx.AsyncClient, realm: Realm) -> dict[str, Any]:
    email = unique_email()
    response = await client.post(realm_url(realm, "/signup"),
                                 json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, response.text
    response = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "password", "username": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return {"email": email, **response.json()}


class Counting:
    """An ASGI app that counts the requests it is given, then serves them as ``app`` does."""

    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:  # the app's state, as its endpoints read it
        return getattr(self.app, name)


@pytest.fixture
async def framework_counted(settings: Any, core: Any) -> AsyncIterator[tuple[Any, list[Counting]]]:
    """A server app whose FastAPI apps count the requests that reach them."""
    served = create_app(settings, core)
    counters = [Counting(served.native)]
    served.native = counters[0]
    for prefix, sub_app in list(served.by_prefix.items()):
        served.by_prefix[prefix] = counter = Counting(sub_app)
        counters.append(counter)
    yield served, counters


async def test_hot_endpoints_are_served_without_the_framework(framework_counted, core, realm,
                                                              signed_in):
    served, counters = framework_counted
    bearer = {"Authorization": f"Bearer {signed_in['access_token']}"}
    caller = await resource_server(core, realm)
    async with asgi_client(served) as http:
        answers = [
            await http.get(realm_url(realm, "/userinfo"), headers=bearer),
            await http.post(realm_url(realm, "/userinfo"), headers=bearer),
            await http.post(realm_url(realm, "/oauth/introspect"),
                            data={"token": signed_in["access_token"]}, headers=caller),
            await http.post(realm_url(realm, "/oauth/token"), data={
                "grant_type": "refresh_token", "refresh_token": signed_in["refresh_token"]}),
            await http.post("/oauth/token", data={"grant_type": "refresh_token",
                                                  "refresh_token": "not a token"}),
            await http.get("/userinfo"),
        ]
        assert [a.status_code for a in answers] == [200, 200, 200, 200, 400, 401]
        assert answers[2].json()["active"] is True
        assert sum(counter.calls for counter in counters) == 0
        # Another method on a hot path is the framework's: 405 in the native shape.
        response = await http.get(realm_url(realm, "/oauth/token"))
        assert response.status_code == 405
        assert response.json()["error"] == "invalid_request"
        assert sum(counter.calls for counter in counters) == 1


async def _framework_answer(app: Any, method: str, path: str, **request: Any) -> httpx.Response:
    """The answer of the FastAPI app that holds the route (what served it before lanes)."""
    fastapi_app = app.by_prefix["/realms"] if path.startswith("/realms/") else app.native
    async with asgi_client(fastapi_app) as http:
        return await http.request(method, path, **request)


async def test_hot_endpoints_answer_as_their_routes_do(app, client, core, realm, signed_in):
    bearer = signed_in["access_token"]
    caller = await resource_server(core, realm)
    introspect = realm_url(realm, "/oauth/introspect")
    form = {"content-type": "application/x-www-form-urlencoded"}
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/oauth/token", {"content": b"grant_type=foo", "headers": form}),
        ("POST", realm_url(realm, "/oauth/token"), {"content": b"", "headers": form}),
        ("POST", realm_url(realm, "/oauth/token"), {"content": b"{not json",
                                                    "headers": {"content-type":
                                                                "application/json"}}),
        ("POST", realm_url(realm, "/oauth/token"), {"content": b"<x/>",
                                                    "headers": {"content-type": "text/xml"}}),
        ("POST", realm_url(realm, "/oauth/token"), {"json": {"grant_type": "refresh_token",
                                                             "refresh_token": ["x"]}}),
        ("POST", realm_url(realm, "/oauth/token"), {"content": b"grant_type=refresh_token&"
                                                    b"refresh_token=a%00b", "headers": form}),
        ("POST", realm_url(realm, "/oauth/token"), {"data": {"grant_type": "refresh_token",
                                                             "refresh_token": bearer}}),
        ("POST", realm_url(realm, "/oauth/token"), {"data": {
            "grant_type": "password", "username": signed_in["email"], "password": "wrong"}}),
        ("POST", "/realms/no-such-realm/oauth/token", {"data": {"grant_type": "password"}}),
        ("GET", realm_url(realm, "/userinfo"), {}),
        ("GET", realm_url(realm, "/userinfo"), {"headers": {"Authorization": "Bearer x.y.z"}}),
        ("GET", realm_url(realm, "/userinfo"), {"headers": {"Authorization":
                                                            f"Bearer {bearer}"}}),
        ("POST", realm_url(realm, "/userinfo"), {"headers": {"Authorization":
                                                             f"Bearer {bearer}"}}),
        ("GET", "/userinfo", {"headers": {"Authorization": f"Bearer {bearer}"}}),
        ("POST", introspect, {"data": {"token": bearer}, "headers": caller}),
        ("POST", introspect, {"data": {"token": "nothing"}, "headers": caller}),
        ("POST", introspect, {"data": {"token": bearer}}),
        ("POST", introspect, {"data": {"token": bearer},
                              "headers": {"Authorization": f"Bearer {bearer}"}}),
        ("POST", introspect, {"data": {"token": bearer},
                              "headers": {"Authorization": "Basic !!"}}),
        ("POST", introspect, {"data": {}, "headers": caller}),
        ("POST", "/realms/no-such-realm/oauth/introspect", {"data": {"token": bearer}}),
    ]
    for method, path, request in requests:
        laned = await client.request(method, path, **request)
        routed = await _framework_answer(app, method, path, **request)
        assert (laned.status_code, laned.json()) == (routed.status_code, routed.json()), path
        for name in COMPARED_HEADERS:
            assert laned.headers.get(name) == routed.headers.get(name), (path, name)
    # A good refresh: both answer with the same members (each rotated the token it was given).
    tokens = {}
    for which in ("laned", "routed"):
        request = {"data": {"grant_type": "refresh_token",
                            "refresh_token": signed_in["refresh_token"]}}
        path = realm_url(realm, "/oauth/token")
        answer = (await client.post(path, **request) if which == "laned"
                  else await _framework_answer(app, "POST", path, **request))
        assert answer.status_code == 200, answer.text
        tokens[which] = answer
        signed_in["refresh_token"] = answer.json()["refresh_token"]
    assert set(tokens["laned"].json()) == set(tokens["routed"].json())
    for name in COMPARED_HEADERS:
        assert tokens["laned"].headers.get(name) == tokens["routed"].headers.get(name), name


async def test_a_lane_keeps_the_outer_middleware(client, realm, settings):
    too_big = b"a=" + b"x" * settings.max_body_bytes
    response = await client.post(realm_url(realm, "/oauth/token"), content=too_big, headers={
        "content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"
    assert (await client.get("/realms/a%00b/userinfo")).status_code == 400

    def timed() -> float:
        return REGISTRY.get_sample_value("authgate_http_request_seconds_count",
                                         {"method": "GET", "status": "4xx"}) or 0.0

    before = timed()
    assert (await client.get(realm_url(realm, "/userinfo"))).status_code == 401
    assert timed() == before + 1


async def test_an_unexpected_error_in_a_lane_is_a_500_raised_to_the_server(
        app, core, realm, signed_in, monkeypatch, capsys):
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug holding a secret: s3cr3t")

    monkeypatch.setattr(core.sessions, "refresh", broken)
    request = {"data": {"grant_type": "refresh_token",
                        "refresh_token": signed_in["refresh_token"]}}
    async with asgi_client(app, raise_app_exceptions=False) as http:
        response = await http.post(realm_url(realm, "/oauth/token"), **request)
    assert response.status_code == 500
    assert response.json() == {"error": "server_error",
                               "error_description": "An internal error occurred."}
    assert "unhandled error" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="a bug holding a secret"):
        async with asgi_client(app) as http:
            await http.post(realm_url(realm, "/oauth/token"), **request)


async def test_a_dialect_served_at_the_root_keeps_a_hot_path(settings, core, realm, signed_in,
                                                             monkeypatch):
    router = APIRouter(route_class=native.route_class)

    @router.get("/userinfo")
    async def dialect_userinfo() -> JSONResponse:
        return JSONResponse({"dialect": True})

    dialect = types.SimpleNamespace(router=router, surface=native, background=())
    monkeypatch.setattr(app_module.dialects, "load", lambda name: dialect)
    served = create_app(settings.model_copy(update={"dialects": ["tiledesk"],
                                                    "dialects_at_root": ["tiledesk"]}), core)
    bearer = {"Authorization": f"Bearer {signed_in['access_token']}"}
    async with asgi_client(served) as http:
        assert (await http.get("/userinfo", headers=bearer)).json() == {"dialect": True}
        # Under the realm's prefix, and for another method, the native endpoint answers.
        response = await http.get(realm_url(realm, "/userinfo"), headers=bearer)
        assert response.status_code == 200 and "sub" in response.json()
        # (At the root, the default realm's: this realm's token is refused there.)
        response = await http.post("/userinfo", headers=bearer)
        assert response.status_code == 401 and response.json()["error"] == "invalid_token"


def test_a_hot_endpoint_must_take_only_the_request():
    router = APIRouter()

    def dependency() -> str:
        return "x"

    @router.get("/hot")
    @hot
    async def with_dependency(request: Request, value: str = Depends(dependency)) -> JSONResponse:
        return JSONResponse({})

    with pytest.raises(RuntimeError, match="takes only the request"):
        lanes([router], native, lambda lane: lane)

    plain = APIRouter()

    @plain.post("/hot")
    @hot
    async def only_the_request(request: Request) -> JSONResponse:
        return JSONResponse({})

    assert set(lanes([plain], native, lambda lane: lane)) == {("POST", "/hot")}
