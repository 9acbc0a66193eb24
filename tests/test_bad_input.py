"""Bad input of every kind gets a 4xx in the native error shape, never a 500."""

from __future__ import annotations

import itertools

import httpx
import pytest

from authgate.core.models import Realm
from tests.conftest import realm_url

ENDPOINTS = [
    ("POST", "/oauth/token"), ("POST", "/oauth/revoke"), ("POST", "/oauth/introspect"),
    ("POST", "/signup"), ("GET", "/userinfo"), ("POST", "/signout"), ("GET", "/sessions"),
    ("POST", "/me/password"), ("DELETE", "/sessions/x"),
]

BODIES: list[tuple[str, bytes | None]] = [
    ("application/json", b"{not json"),
    ("application/json", b"[1, 2, 3]"),
    ("application/json", b'"a string"'),
    ("application/json", b'{"grant_type": 5, "email": ["x"], "password": {"a": 1}}'),
    ("application/json", b'{"grant_type": "password", "username": null}'),
    ("application/json", b'{"email": "x@example.com", "password": "' + b"p" * 5000 + b'"}'),
    ("application/json", "{\"email\": \"\u202e@\u0000.com\", \"password\": 1e999}".encode()),
    ("application/x-www-form-urlencoded", b"grant_type=password&username=%FF%FE&password="),
    ("application/x-www-form-urlencoded", b"%%%%&&&==="),
    ("text/xml", b"<xml/>"),
    ("application/json", b"\xff\xfe\x00garbage"),
    # NUL characters, which PostgreSQL cannot store in text, escaped in JSON and in a form.
    ("application/json", b'{"email": "a\\u0000b@example.com", "password": "long enough pass",'
                         b' "name": "x\\u0000", "grant_type": "password",'
                         b' "username": "a\\u0000b@example.com", "token": "a\\u0000"}'),
    ("application/x-www-form-urlencoded",
     b"grant_type=password&username=a%00b%40example.com&password=long+enough+pass&token=%00"),
    ("application/json", None),
]

HEADERS = [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer not.a.jwt"},
           {"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."},
           {"Authorization": "Basic Zm9vOmJhcg=="}]


@pytest.mark.parametrize("method,path", ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
async def test_malformed_requests_get_a_4xx_in_the_native_shape(client: httpx.AsyncClient,
                                                                realm: Realm, method: str,
                                                                path: str):
    for (content_type, body), headers in itertools.product(BODIES, HEADERS):
        response = await client.request(method, realm_url(realm, path), content=body,
                                         headers={"content-type": content_type, **headers})
        assert 400 <= response.status_code < 500, (content_type, body, headers, response.text)
        payload = response.json()
        assert set(payload) >= {"error", "error_description"}, payload
        assert "Traceback" not in response.text


async def test_unknown_paths_methods_and_realms_answer_in_the_native_shape(client, realm):
    cases = [("GET", "/no/such/path", 404), ("PUT", realm_url(realm, "/oauth/token"), 405),
             ("GET", "/realms/NOT_A_REALM!/userinfo", 404),
             ("GET", "/realms/a%00b/userinfo", 400),
             ("POST", "/realms/a%00b/oauth/token", 400),
             ("GET", realm_url(realm, "/userinfo?x=%00"), 400),
             ("GET", "/realms/missing/.well-known/jwks.json", 404)]
    for method, path, status in cases:
        response = await client.request(method, path)
        assert response.status_code == status, (path, response.text)
        assert "error" in response.json()


async def test_a_body_over_the_limit_is_refused_before_it_is_read(client, realm, settings):
    big = b"a=" + b"x" * (settings.max_body_bytes + 1)
    response = await client.post(realm_url(realm, "/oauth/token"), content=big,
                                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


async def test_a_password_over_the_maximum_is_refused_without_hashing(client, realm, settings):
    response = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "password", "username": "a@example.com",
        "password": "x" * (settings.password_max_length + 1)})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_an_oversized_body_is_refused_in_each_surfaces_own_shape(client, settings):
    big = b'{"a": "' + b"x" * (settings.max_body_bytes + 10) + b'"}'
    expectations = {
        "/tiledesk/auth/signin": "success",
        "/descope/v1/auth/password/signin": "errorCode",
        "/deskera/v1/iam/auth/sign-in/web/sign-in": "errorMessage",
        "/webapi/api/v1/Authentication/Login?APIKey=x": "Message",
        "/classroom/auth/sign-in-verify": "status_code",
        "/oauth/token": "error",
    }
    for path, field in expectations.items():
        response = await client.post(path, content=big,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 413, (path, response.text)
        assert field in response.json(), (path, response.json())


def test_every_core_error_code_is_documented_with_its_native_mapping():
    from pathlib import Path

    from authgate.api.errors import NATIVE_ERRORS
    from authgate.core.errors import ErrorCode

    page = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    for code in ErrorCode:
        status, wire = NATIVE_ERRORS[code]
        assert f"| `{code.value}` | {status} | `{wire}` |" in page, code


async def test_a_nul_in_a_dialect_path_is_refused_in_the_dialect_shape(client, core):
    """Path parameters reach the store (a user id, a code): a NUL is refused before."""
    response = await client.put("/tiledesk/auth/verifyemail/a%00b/c%00d")
    assert response.status_code == 400
    assert response.json() == {"success": False,
                               "msg": "Text must not contain NUL characters."}


async def test_a_nul_inside_a_token_is_bad_input_not_a_server_error(client, realm):
    """Text inside a JWT (a header's kid, an unverified audience) reaches lookups: a NUL there
    is refused like one in a body."""
    import base64
    import json

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    forged = ".".join([part({"alg": "EdDSA", "kid": "a\u0000b", "typ": "at+jwt"}),
                       part({"sub": "x", "sid": "y"}), "c2ln"])
    response = await client.get(realm_url(realm, "/userinfo"),
                                headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401 and response.json()["error"] == "invalid_token"
    custom = ".".join([part({"alg": "HS256", "typ": "JWT"}),
                       part({"aud": "http://authgate.test/projects/a\u0000b", "sub": "x"}),
                       "c2ln"])
    response = await client.post("/tiledesk/auth/signinWithCustomToken",
                                 headers={"Authorization": f"JWT {custom}"})
    assert 400 <= response.status_code < 500, response.text
    assert "Traceback" not in response.text


async def test_json_nested_too_deeply_is_refused_in_each_surfaces_own_shape(client, core):
    """Deep nesting (with a NUL at the end, which used to be looked for recursively) is a 400,
    not a 500, and what is refused is never stored: every kept value encodes again."""
    deep = "[" * 400 + "]" * 400
    body = f'{{"email": "deep@example.com", "password": "a long passphrase 1", ' \
           f'"custom_attributes": {{"a": {deep}}}, "x": "\\u0000"}}'
    expectations = {
        "/signup": ("error", "invalid_request"),
        "/tiledesk/auth/signin": ("success", False),
        "/descope/v1/auth/password/signin": ("errorCode", "E011001"),
        "/deskera/v1/iam/auth/sign-in/web/sign-in": ("errorMessage", None),
        "/classroom/auth/sign-in-verify": ("status_code", 400),
    }  # (webapi checks its APIKey before the body, which read_body parses for it alike)
    project = (await core.realms.require("default")).project_id
    for path, (field, value) in expectations.items():
        response = await client.post(path, content=body.encode(), headers={
            "content-type": "application/json", "authorization": f"Bearer {project}"})
        assert response.status_code in (400, 422), (path, response.text)
        assert field in response.json(), (path, response.text)
        if value is not None:
            assert response.json()[field] == value, (path, response.text)
    stored = await client.post("/signup", json={
        "email": "deep@example.com", "password": "a long passphrase 1",
        "custom_attributes": {"a": [[[[["fine"]]]]]}})
    assert stored.status_code == 201, stored.text  # the first refusal stored nothing
