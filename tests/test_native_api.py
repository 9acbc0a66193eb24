"""The native API: sign-up, the token endpoint's grants and errors, userinfo, sessions."""

from __future__ import annotations

import base64
from urllib.parse import quote_plus

import httpx
import jwt

from authgate.core.models import Realm
from tests.conftest import PASSWORD, realm_url, unique_email


async def sign_up(client: httpx.AsyncClient, realm: Realm, email: str,
                  password: str = PASSWORD) -> httpx.Response:
    return await client.post(realm_url(realm, "/signup"), json={"email": email,
                                                                 "password": password})


async def password_grant(client: httpx.AsyncClient, realm: Realm, username: str,
                         password: str = PASSWORD, **extra: str) -> httpx.Response:
    return await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "password", "username": username, "password": password, **extra})


async def test_sign_up_then_sign_in_returns_bearer_tokens(client, realm):
    email = unique_email()
    created = await sign_up(client, realm, email)
    assert created.status_code == 201
    assert created.json()["email"] == email
    response = await password_grant(client, realm, email.upper())
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert {"access_token", "refresh_token", "id_token"} <= set(body)
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    info = await client.get(realm_url(realm, "/userinfo"),
                            headers={"Authorization": f"Bearer {body['access_token']}"})
    assert info.status_code == 200
    # Personal data: no cache keeps it; each header once, the body's length right.
    assert info.headers.get_list("cache-control") == ["no-store"]
    assert info.headers["pragma"] == "no-cache"
    assert info.headers["content-type"] == "application/json"
    assert int(info.headers["content-length"]) == len(info.content)
    assert info.json()["email"] == email
    assert info.json()["sub"] == created.json()["id"]


async def signed_in(client: httpx.AsyncClient, realm: Realm) -> tuple[str, dict]:
    email = unique_email()
    assert (await sign_up(client, realm, email)).status_code == 201
    response = await password_grant(client, realm, email)
    assert response.status_code == 200, response.text
    return email, response.json()


def bearer(tokens: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def refresh(client: httpx.AsyncClient, realm: Realm, token: str) -> httpx.Response:
    return await client.post(realm_url(realm, "/oauth/token"),
                             data={"grant_type": "refresh_token", "refresh_token": token})


async def test_unknown_user_and_wrong_password_get_the_same_answer(client, realm):
    email, _ = await signed_in(client, realm)
    wrong = await password_grant(client, realm, email, "not the password at all")
    unknown = await password_grant(client, realm, unique_email(), "not the password at all")
    assert wrong.status_code == unknown.status_code == 400
    assert wrong.json() == unknown.json() == {
        "error": "invalid_grant", "error_description": "Invalid login id or password.",
        "error_code": "invalid_credentials"}


async def test_a_realm_may_choose_to_tell_unknown_users_apart(client, core, realm):
    await core.realms.update_settings(realm, {"reveal_unknown_users": True})
    email, _ = await signed_in(client, realm)
    wrong = await password_grant(client, realm, email, "not the password at all")
    unknown = await password_grant(client, realm, unique_email(), "not the password at all")
    assert wrong.json()["error_code"] == "wrong_password"
    assert unknown.json()["error_code"] == "user_not_found"


async def test_refresh_rotates_the_token_and_keeps_the_session(client, realm):
    _, tokens = await signed_in(client, realm)
    rotated = await refresh(client, realm, tokens["refresh_token"])
    assert rotated.status_code == 200
    new = rotated.json()
    assert new["refresh_token"] != tokens["refresh_token"]
    again = await refresh(client, realm, new["refresh_token"])
    assert again.status_code == 200
    info = await client.get(realm_url(realm, "/userinfo"), headers=bearer(again.json()))
    assert info.status_code == 200


async def test_reusing_a_rotated_refresh_token_revokes_the_session(client, core, realm):
    core.settings.refresh_grace_seconds = 0
    try:
        _, tokens = await signed_in(client, realm)
        first = (await refresh(client, realm, tokens["refresh_token"])).json()
        reuse = await refresh(client, realm, tokens["refresh_token"])
        assert reuse.status_code == 400
        assert reuse.json()["error"] == "invalid_grant"
        assert reuse.json()["error_code"] == "refresh_token_reused"
        # The whole session is gone: its newest refresh token and its access tokens too.
        assert (await refresh(client, realm, first["refresh_token"])).json()["error_code"] == \
            "session_revoked"
        denied = await client.get(realm_url(realm, "/userinfo"), headers=bearer(first))
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"].startswith("Bearer")
        kinds = [e.type for e in await core.audit.recent(realm.id)]
        assert "session.refresh_token_reused" in kinds
    finally:
        core.settings.refresh_grace_seconds = 10


async def test_within_the_grace_window_a_rotated_token_gets_the_same_successor(client, realm):
    _, tokens = await signed_in(client, realm)
    first = (await refresh(client, realm, tokens["refresh_token"])).json()
    second = (await refresh(client, realm, tokens["refresh_token"])).json()
    assert first["refresh_token"] == second["refresh_token"]
    assert (await refresh(client, realm, second["refresh_token"])).status_code == 200


async def test_sign_out_ends_the_session_for_access_and_refresh_tokens(client, realm):
    _, tokens = await signed_in(client, realm)
    out = await client.post(realm_url(realm, "/signout"), headers=bearer(tokens))
    assert out.status_code == 204
    assert (await client.get(realm_url(realm, "/userinfo"), headers=bearer(tokens))
            ).status_code == 401
    assert (await refresh(client, realm, tokens["refresh_token"])).json()["error_code"] == \
        "session_revoked"


async def test_discovery_names_only_endpoints_that_serve_what_it_says(client, realm):
    """No end_session_endpoint: OpenID Connect clients send the browser there with GET and an
    id_token_hint (RP-Initiated Logout), which /signout does not serve; the OpenAPI
    document says what /signout answers."""
    discovery = (await client.get(realm_url(realm, "/.well-known/openid-configuration"))).json()
    assert "end_session_endpoint" not in discovery
    for name in ("token_endpoint", "userinfo_endpoint", "jwks_uri", "revocation_endpoint",
                 "introspection_endpoint"):
        path = discovery[name].removeprefix(discovery["issuer"])
        assert (await client.options(realm_url(realm, path))).status_code != 404, name
    document = (await client.get("/openapi.json")).json()
    assert set(document["paths"]["/signout"]["post"]["responses"]) >= {"204"}
    assert "200" not in document["paths"]["/signout"]["post"]["responses"]


async def test_sign_out_everywhere_and_revoking_one_of_my_sessions(client, realm):
    email, first = await signed_in(client, realm)
    second = (await password_grant(client, realm, email)).json()
    third = (await password_grant(client, realm, email)).json()
    listed = (await client.get(realm_url(realm, "/sessions"), headers=bearer(first))).json()
    assert len(listed["sessions"]) == 3
    assert sum(s["current"] for s in listed["sessions"]) == 1
    target = jwt.decode(second["access_token"], options={"verify_signature": False})["sid"]
    assert target in [s["id"] for s in listed["sessions"]]
    gone = await client.delete(realm_url(realm, f"/sessions/{target}"), headers=bearer(first))
    assert gone.status_code == 204
    again = await client.delete(realm_url(realm, f"/sessions/{target}"), headers=bearer(first))
    assert again.status_code == 404
    everywhere = await client.post(realm_url(realm, "/signout/all"), headers=bearer(third))
    assert everywhere.json() == {"revoked": 2}
    for tokens in (first, second, third):
        assert (await client.get(realm_url(realm, "/me"), headers=bearer(tokens))
                ).status_code == 401


async def test_rfc7009_revocation_ends_the_session_and_ignores_unknown_tokens(client, realm):
    _, tokens = await signed_in(client, realm)
    unknown = await client.post(realm_url(realm, "/oauth/revoke"), data={"token": "nope"})
    assert unknown.status_code == 200
    revoked = await client.post(realm_url(realm, "/oauth/revoke"),
                                data={"token": tokens["refresh_token"],
                                      "token_type_hint": "refresh_token"})
    assert revoked.status_code == 200
    assert (await client.get(realm_url(realm, "/userinfo"), headers=bearer(tokens))
            ).status_code == 401
    _, other = await signed_in(client, realm)
    by_access = await client.post(realm_url(realm, "/oauth/revoke"),
                                  data={"token": other["access_token"]})
    assert by_access.status_code == 200
    assert (await refresh(client, realm, other["refresh_token"])).status_code == 400


async def resource_server(core, realm, organisation_id: str | None = None) -> dict[str, str]:
    """The Authorization header of a protected resource of ``realm``: one of its API keys."""
    _, raw = await core.api_keys.create(realm, "resource server",
                                        organisation_id=organisation_id)
    return {"Authorization": f"Bearer {raw}"}


async def test_rfc7662_introspection(client, core, realm):
    _, subject = await signed_in(client, realm)
    caller = await resource_server(core, realm)
    url = realm_url(realm, "/oauth/introspect")
    active = (await client.post(url, data={"token": subject["access_token"]},
                                headers=caller)).json()
    assert active["active"] is True and active["token_type"] == "access_token"
    assert {"sub", "exp", "iat", "iss", "aud", "sid", "jti"} <= set(active)
    as_refresh = (await client.post(url, data={"token": subject["refresh_token"]},
                                    headers=caller)).json()
    assert as_refresh["active"] is True and as_refresh["sid"] == active["sid"]
    assert (await client.post(url, data={"token": "garbage"}, headers=caller)
            ).json() == {"active": False}
    await client.post(realm_url(realm, "/signout"), headers=bearer(subject))
    assert (await client.post(url, data={"token": subject["access_token"]},
                              headers=caller)).json() == {"active": False}


async def test_introspection_refuses_callers_without_the_realms_api_key(client, core, realm):
    """A user's own access token is not a protected resource's credential: with it, anyone
    signed in could test a stolen refresh token without spending it."""
    _, user = await signed_in(client, realm)
    _, subject = await signed_in(client, realm)
    url = realm_url(realm, "/oauth/introspect")
    key, raw = await core.api_keys.create(realm, "revoked later")
    await core.api_keys.revoke(realm, key.id)
    other_realm = await core.realms.create(f"t-i{key.id[:12]}")
    _, of_another_realm = await core.api_keys.create(other_realm, "elsewhere")
    for headers in ({}, bearer(user), {"Authorization": f"Bearer {raw}"},
                    {"Authorization": f"Bearer {of_another_realm}"},
                    {"Authorization": "Basic " + "not base64!"},
                    {"Authorization": "Basic " + base64.b64encode(b"no colon").decode()}):
        for token in (subject["refresh_token"], subject["access_token"]):
            refused = await client.post(url, data={"token": token}, headers=headers)
            assert refused.status_code == 401, (headers, refused.text)
            assert refused.json()["error"] == "invalid_client"
            assert "active" not in refused.text and subject["refresh_token"] not in refused.text
    missing = await client.post(url, data={"token": subject["access_token"]})
    assert "bearer token or as the Basic password" in missing.json()["error_description"]
    # Nothing was spent: the refresh token still rotates.
    assert (await refresh(client, realm, subject["refresh_token"])).status_code == 200


async def test_introspection_takes_the_api_key_as_the_basic_password(client, core, realm):
    _, subject = await signed_in(client, realm)
    _, raw = await core.api_keys.create(realm, "resource server")
    url = realm_url(realm, "/oauth/introspect")
    # RFC 6749 §2.3.1: user name and password form-encoded, then base64; any user name.
    basic = base64.b64encode(f"rs%3A1:{quote_plus(raw)}".encode()).decode()
    answer = await client.post(url, data={"token": subject["access_token"]},
                               headers={"Authorization": f"Basic {basic}"})
    assert answer.status_code == 200 and answer.json()["active"] is True
    wrong = base64.b64encode(f"rs:{raw}x".encode()).decode()
    refused = await client.post(url, data={"token": subject["access_token"]},
                                headers={"Authorization": f"Basic {wrong}"})
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"


async def test_an_organisations_key_learns_only_of_its_active_members_tokens(client, core, realm):
    email, member = await signed_in(client, realm)
    _, stranger = await signed_in(client, realm)
    org = await core.organisations.create(realm, f"org-{unique_email()[:8]}")
    user = await core.users.find(realm, email)
    await core.organisations.add_member(realm, org, user.id, roles=[])
    caller = await resource_server(core, realm, organisation_id=org.id)
    url = realm_url(realm, "/oauth/introspect")
    for token in (member["access_token"], member["refresh_token"]):
        answer = (await client.post(url, data={"token": token}, headers=caller)).json()
        assert answer["active"] is True and answer["sub"] == user.id
    for token in (stranger["access_token"], stranger["refresh_token"]):
        assert (await client.post(url, data={"token": token}, headers=caller)
                ).json() == {"active": False}
    await core.organisations.add_member(realm, org, user.id, roles=[], status="inactive")
    assert (await client.post(url, data={"token": member["access_token"]}, headers=caller)
            ).json() == {"active": False}
    # The realm's own keys still see every live token.
    realm_wide = await resource_server(core, realm)
    assert (await client.post(url, data={"token": stranger["access_token"]},
                              headers=realm_wide)).json()["active"] is True


async def test_introspection_calls_only_the_current_refresh_token_active(client, core, realm):
    caller = await resource_server(core, realm)
    _, subject = await signed_in(client, realm)
    url = realm_url(realm, "/oauth/introspect")
    successor = (await refresh(client, realm, subject["refresh_token"])).json()
    rotated = (await client.post(url, data={"token": subject["refresh_token"]},
                                 headers=caller)).json()
    assert rotated == {"active": False}
    current = (await client.post(url, data={"token": successor["refresh_token"]},
                                 headers=caller)).json()
    assert current["active"] is True and current["token_type"] == "refresh_token"
    assert current["scope"] == "openid profile email phone"  # the realm's default scope
    # The token's own expiry (30 days), not its session's (90 days).
    assert abs(current["exp"] - current["iat"] - 30 * 86_400) <= 2


async def test_an_id_token_is_not_an_access_token(client, core, realm):
    _, tokens = await signed_in(client, realm)
    assert jwt.get_unverified_header(tokens["access_token"])["typ"] == "at+jwt"
    assert jwt.get_unverified_header(tokens["id_token"])["typ"] == "JWT"
    as_bearer = {"Authorization": f"Bearer {tokens['id_token']}"}
    refused = await client.get(realm_url(realm, "/userinfo"), headers=as_bearer)
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_token"
    assert (await client.get(realm_url(realm, "/me"), headers=as_bearer)).status_code == 401
    introspected = await client.post(realm_url(realm, "/oauth/introspect"),
                                     data={"token": tokens["id_token"]},
                                     headers=await resource_server(core, realm))
    assert introspected.json() == {"active": False}
    assert (await client.get(realm_url(realm, "/userinfo"), headers=bearer(tokens))
            ).status_code == 200


async def test_failed_sign_ins_back_off_exponentially_with_retry_after(client, core, realm):
    email, _ = await signed_in(client, realm)
    free = core.settings.throttle_free_attempts
    for _ in range(free):
        assert (await password_grant(client, realm, email, "wrong password!")).status_code == 400
    blocked = await password_grant(client, realm, email)  # even the right password waits
    assert blocked.status_code == 429
    assert blocked.json()["error"] == "slow_down"
    assert int(blocked.headers["retry-after"]) >= 1
    # Another login id from the same address is not blocked by this one's failures.
    other_email, _ = await signed_in(client, realm)
    assert (await password_grant(client, realm, other_email)).status_code == 200
    events = [e.type for e in await core.audit.recent(realm.id, limit=100)]
    assert "session.throttled" in events


async def test_a_disabled_user_cannot_sign_in_and_loses_its_sessions(client, core, realm):
    email, tokens = await signed_in(client, realm)
    user = await core.users.find(realm, email)
    await core.users.set_status(realm, user.id, "disabled")
    assert (await client.get(realm_url(realm, "/userinfo"), headers=bearer(tokens))
            ).status_code == 401
    refused = await password_grant(client, realm, email)
    assert refused.status_code == 400 and refused.json()["error_code"] == "user_disabled"


async def test_changing_my_password_keeps_this_session_and_ends_the_others(client, realm):
    email, first = await signed_in(client, realm)
    second = (await password_grant(client, realm, email)).json()
    url = realm_url(realm, "/me/password")
    wrong = await client.post(url, json={"current_password": "nope nope",
                                         "new_password": "a brand new passphrase"},
                              headers=bearer(first))
    assert wrong.status_code == 400 and wrong.json()["error_code"] == "wrong_password"
    changed = await client.post(url, json={"current_password": PASSWORD,
                                           "new_password": "a brand new passphrase"},
                                headers=bearer(first))
    assert changed.status_code == 204
    assert (await client.get(realm_url(realm, "/me"), headers=bearer(first))).status_code == 200
    assert (await client.get(realm_url(realm, "/me"), headers=bearer(second))).status_code == 401
    assert (await password_grant(client, realm, email, "a brand new passphrase")
            ).status_code == 200


async def test_tokens_of_one_realm_are_refused_in_another(client, core, realm):
    _, tokens = await signed_in(client, realm)
    other = await core.realms.create(realm.name + "-x")
    response = await client.get(realm_url(other, "/userinfo"), headers=bearer(tokens))
    assert response.status_code == 401
    assert (await refresh(client, other, tokens["refresh_token"])).status_code == 400


async def test_health_readiness_and_metrics_answer(client, core):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ok", "database": "ok"}
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert "authgate_events_total" in metrics.text
    async with core.store.transaction() as tx:
        from sqlalchemy import text

        row = (await tx.conn.execute(text("SELECT 41 + 1"))).first()
    assert row[0] == 42


async def test_refresh_keeps_to_the_granted_scope(client, realm):
    email = unique_email()
    await sign_up(client, realm, email)
    granted = (await password_grant(client, realm, email, scope="openid profile")).json()
    assert granted["scope"] == "openid profile"
    claims = jwt.decode(granted["access_token"], options={"verify_signature": False})
    assert claims["scope"] == "openid profile"  # RFC 9068
    same = (await refresh(client, realm, granted["refresh_token"])).json()
    assert same["scope"] == "openid profile" and "id_token" in same
    narrower = (await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": same["refresh_token"],
        "scope": "openid"})).json()
    assert narrower["scope"] == "openid"
    wider = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": narrower["refresh_token"],
        "scope": "openid admin"})
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    # The refused request did not spend the token.
    assert (await refresh(client, realm, narrower["refresh_token"])).status_code == 200


async def test_a_refresh_token_is_refreshed_only_for_the_client_it_was_issued_to(client, realm):
    email = unique_email()
    await sign_up(client, realm, email)
    issued = (await password_grant(client, realm, email, client_id="app-a")).json()
    other = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": issued["refresh_token"],
        "client_id": "app-b"})
    assert other.status_code == 400 and other.json()["error"] == "invalid_grant"
    same = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": issued["refresh_token"],
        "client_id": "app-a"})
    assert same.status_code == 200  # the refused request did not spend the token
    unnamed = await refresh(client, realm, same.json()["refresh_token"])
    assert unnamed.status_code == 200  # a client that does not name itself is not refused


async def test_a_session_with_no_recorded_grant_cannot_gain_a_scope_on_refresh(client, core,
                                                                              realm):
    """Sessions a dialect started record no scope: there is nothing for a scope to narrow."""
    email, _ = await signed_in(client, realm)
    user = await core.users.find(realm, email)
    started = await core.sessions.start(realm, user, amr=["pwd"])  # as a dialect does
    assert started.session.scope is None
    widened = await client.post(realm_url(realm, "/oauth/token"), data={
        "grant_type": "refresh_token", "refresh_token": started.refresh_token,
        "scope": "admin payments:write"})
    assert widened.status_code == 400 and widened.json()["error"] == "invalid_scope"
    assert (await refresh(client, realm, started.refresh_token)).status_code == 200


async def test_without_openid_no_id_token_is_issued_on_sign_in_or_refresh(client, realm):
    email = unique_email()
    await sign_up(client, realm, email)
    plain = (await password_grant(client, realm, email, scope="offline_access")).json()
    assert "id_token" not in plain and plain["scope"] == "offline_access"
    again = (await refresh(client, realm, plain["refresh_token"])).json()
    assert "id_token" not in again and again["scope"] == "offline_access"


async def test_the_openapi_document_describes_every_surface(client):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a duplicate operation id would warn
        document = (await client.get("/openapi.json")).json()
    paths = set(document["paths"])
    for expected in ("/oauth/token", "/userinfo", "/.well-known/jwks.json",
                     "/tiledesk/auth/signin", "/descope/v1/auth/password/signin",
                     "/deskera/v1/iam/auth/sign-in/web/sign-in",
                     "/webapi/api/v1/Authentication/Login", "/classroom/auth/sign-in-verify"):
        assert expected in paths, expected


async def test_the_openapi_document_names_the_realm_and_the_token_request(client):
    document = (await client.get("/openapi.json")).json()
    per_realm = [(path, operation) for path, operations in document["paths"].items()
                 if path.startswith("/realms/{realm}/") for operation in operations.values()]
    assert len(per_realm) > 20
    for path, operation in per_realm:
        names = [(p["name"], p["in"]) for p in operation["parameters"]]
        assert names.count(("realm", "path")) == 1, path
    body = document["paths"]["/oauth/token"]["post"]["requestBody"]["content"]
    schema = body["application/x-www-form-urlencoded"]["schema"]
    assert schema["required"] == ["grant_type"]
    assert {"username", "password", "refresh_token", "scope"} <= set(schema["properties"])


async def test_the_openapi_document_says_which_operations_take_a_bearer(client):
    """/docs can then authorise the calls that need an access token; the dialects keep their
    own credentials."""
    document = (await client.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = document["paths"]

    def secured(path: str, method: str) -> bool:
        return paths[path][method].get("security") == [{"bearer": []}]

    for path, method in (("/userinfo", "get"), ("/realms/{realm}/userinfo", "get"),
                         ("/signout", "post"), ("/sessions", "get"), ("/me", "get"),
                         ("/admin/realms", "post"), ("/admin/realms/{realm_name}/users", "get")):
        assert secured(path, method), (path, method)
    # Introspection takes the realm's API key, as a bearer or as the Basic password.
    schemes = document["components"]["securitySchemes"]
    for path in ("/oauth/introspect", "/realms/{realm}/oauth/introspect"):
        assert paths[path]["post"]["security"] == [{"apiKey": []}, {"apiKeyBasic": []}]
    assert (schemes["apiKey"]["scheme"], schemes["apiKeyBasic"]["scheme"]) == ("bearer", "basic")
    for path, method in (("/oauth/introspect", "post"), ("/oauth/token", "post"),
                         ("/signup", "post"),
                         ("/.well-known/jwks.json", "get"), ("/healthz", "get"),
                         ("/descope/v1/auth/me", "get"), ("/tiledesk/auth/signin", "post")):
        assert not secured(path, method), (path, method)


async def test_the_openapi_document_shows_the_admin_request_bodies(client):
    """The admin handlers read their JSON themselves; the document still shows what they read."""
    paths = (await client.get("/openapi.json")).json()["paths"]

    def body(path: str) -> dict:
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    assert body("/admin/realms")["required"] == ["name"]
    assert {"email", "password", "roles"} <= set(body("/admin/realms/{realm_name}/users")[
        "properties"])
    assert body("/admin/realms/{realm_name}/organisations")["required"] == ["name"]
    assert body("/admin/realms/{realm_name}/organisations/{org}/members")["required"] == \
        ["user_id"]
    assert paths["/admin/realms/{realm_name}/keys/rotate"]["post"]["requestBody"][
        "required"] is False


async def test_each_native_route_is_reached_through_the_app_of_its_first_segment(app):
    """Dispatch by first path segment: each native router's segments lead to an app holding
    that router alone, so a request is matched among a few routes, not all of them."""
    async def status(segment: str, method: str, path: str) -> int:
        transport = httpx.ASGITransport(app=app.by_prefix[segment])
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return (await http.request(method, path)).status_code

    assert await status("/healthz", "GET", "/healthz") == 200
    assert await status("/.well-known", "GET", "/.well-known/jwks.json") == 200
    assert await status("/userinfo", "GET", "/userinfo") == 401  # reached: no bearer
    assert await status("/oauth", "POST", "/oauth/token") == 400  # reached: no body
    assert await status("/healthz", "GET", "/.well-known/jwks.json") == 404
    assert await status("/oauth", "GET", "/userinfo") == 404
    assert app.by_prefix["/userinfo"] is app.by_prefix["/.well-known"]


async def test_a_server_owning_its_core_keeps_start_up_objects_out_of_garbage_collection(
        settings):
    """Full collections walked the hundreds of thousands of objects start-up builds, and their
    pauses were the server's p99 latency: a server that built its own core freezes them."""
    import gc

    from authgate.api.app import create_app

    gc.unfreeze()
    served = create_app(settings)
    try:
        async with served.native.router.lifespan_context(served.native):
            frozen = gc.get_freeze_count()
            assert frozen > 10_000
    finally:
        gc.unfreeze()


async def test_a_forced_exit_still_closes_the_store_and_is_not_reported_as_an_error(
        settings, monkeypatch):
    """A second Ctrl-C makes uvicorn skip the application's shutdown, and the event loop's
    end cancels every task, the background workers' too. The lifespan still stops them and
    closes the store, and ends without an error (uvicorn logged one as a traceback)."""
    import asyncio

    from authgate.api.app import create_app
    from authgate.store.db import SqlStore

    closed: list[bool] = []
    close = SqlStore.close

    async def recording_close(self: SqlStore) -> None:
        await close(self)
        closed.append(True)

    monkeypatch.setattr(SqlStore, "close", recording_close)
    served = create_app(settings)
    serving = asyncio.Event()

    async def lifespan() -> None:
        async with served.native.router.lifespan_context(served.native):
            serving.set()
            await asyncio.Event().wait()  # serves until cancelled

    task = asyncio.create_task(lifespan())
    await asyncio.wait_for(serving.wait(), 30)
    workers = [other for other in asyncio.all_tasks()
               if other.get_name() in ("outbox", "housekeeping")]
    assert len(workers) == 2
    for cancelled in (task, *workers):  # as asyncio.run cancels what is left
        cancelled.cancel()
    await asyncio.wait({task})
    assert not task.cancelled() and task.exception() is None
    assert closed == [True]
    assert all(worker.done() for worker in workers)


async def test_an_unknown_realm_gets_404_realm_not_found_on_the_hot_endpoints(client):
    token = await client.post("/realms/no-such-realm/oauth/token",
                              data={"grant_type": "refresh_token", "refresh_token": "x"})
    assert token.status_code == 404 and token.json()["error"] == "realm_not_found"
    userinfo = await client.get("/realms/no-such-realm/userinfo",
                                headers={"Authorization": "Bearer x.y.z"})
    assert userinfo.status_code == 404 and userinfo.json()["error"] == "realm_not_found"


async def test_the_docs_page_runs_only_its_pinned_integrity_checked_files(client):
    """/docs runs on the server's own origin: its files are named by exact version with their
    integrity hashes, and its policy lets it run those and its own start-up script only, and
    send requests only here. There is no /redoc (a floating CDN version before)."""
    import base64
    import hashlib
    import re

    from authgate.api.docs import SWAGGER_UI_CSS, SWAGGER_UI_JS

    page = await client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    body = page.text
    for url, integrity in (SWAGGER_UI_JS, SWAGGER_UI_CSS):
        assert re.search(r"@\d+\.\d+\.\d+/", url), url  # an exact version
        assert f'"{url}" integrity="{integrity}" crossorigin="anonymous"' in body
        assert re.fullmatch(r"sha384-[A-Za-z0-9+/]{64}", integrity)
    # Every script the page holds is one the policy allows, and nothing else.
    policy = dict(part.split(" ", 1) for part in page.headers["content-security-policy"]
                  .split("; ") if " " in part)
    inline = re.findall(r"<script>(.*?)</script>", body, re.S)
    assert len(inline) == 1 and '"/openapi.json"' in inline[0]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert policy["script-src"] == f"{SWAGGER_UI_JS[0]} 'sha256-{digest}'"
    assert re.findall(r'<script src="([^"]+)"', body) == [SWAGGER_UI_JS[0]]
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert "validatorUrl: null" in inline[0]  # nothing sent to the public validator
    head = await client.head("/docs")
    assert head.status_code == 200 and head.headers["content-security-policy"] == \
        page.headers["content-security-policy"]
    assert (await client.get("/redoc")).status_code == 404
    assert (await client.get("/openapi.json")).status_code == 200


async def test_the_docs_page_finds_the_document_under_the_servers_root_path(app):
    """Behind a proxy that strips a prefix (uvicorn --root-path /auth), the page asks for
    /auth/openapi.json, as FastAPI's page did; its policy allows its own script still."""
    import base64
    import hashlib
    import re

    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000), root_path="/auth")
    async with httpx.AsyncClient(transport=transport, base_url="http://authgate.test") as c:
        page = await c.get("/auth/docs")
        document = await c.get("/auth/openapi.json")
    assert page.status_code == 200 and document.status_code == 200
    (inline,) = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    assert 'url: "/auth/openapi.json"' in inline
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page.headers["content-security-policy"]
