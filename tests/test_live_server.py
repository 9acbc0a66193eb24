"""Behaviour that needs a real server on 127.0.0.1: JWKS fetched over HTTP by real verifiers,
key rotation seen by them, and concurrent refreshes of one token."""

from __future__ import annotations

import asyncio

import httpx
import jwt
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from authgate.core.engine import Core
from authgate.core.models import Realm
from tests.conftest import PASSWORD, LiveServer, unique_email


async def sign_in(http: httpx.AsyncClient, realm: Realm, **extra: str) -> dict:
    email = unique_email()
    base = f"/realms/{realm.name}"
    created = await http.post(f"{base}/signup", json={"email": email, "password": PASSWORD})
    assert created.status_code == 201, created.text
    response = await http.post(f"{base}/oauth/token", data={
        "grant_type": "password", "username": email, "password": PASSWORD, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def discovery(server: LiveServer, realm: Realm) -> dict:
    return httpx.get(f"{server.url}/realms/{realm.name}/.well-known/openid-configuration").json()


async def test_pyjwt_verifies_access_and_id_tokens_through_the_served_jwks(
        live_server: LiveServer, core: Core, realm: Realm):
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        tokens = await sign_in(http, realm, client_id="my-app", nonce="n-123")
    config = await asyncio.to_thread(discovery, live_server, realm)
    issuer = core.realms.issuer(realm)
    assert config["issuer"] == issuer
    assert config["jwks_uri"] == f"{issuer}/.well-known/jwks.json"
    # The issuer URL is the configured public one; fetch the same JWKS from the live server.
    jwks = jwt.PyJWKClient(f"{live_server.url}/realms/{realm.name}/.well-known/jwks.json")
    key = await asyncio.to_thread(jwks.get_signing_key_from_jwt, tokens["access_token"])
    access = jwt.decode(tokens["access_token"], key, algorithms=["ES256"], issuer=issuer,
                        audience=core.realms.audience(realm))
    assert {"iss", "aud", "sub", "exp", "iat", "jti", "sid", "amr"} <= set(access)
    assert access["amr"] == ["pwd"] and access["azp"] == "my-app"
    assert jwt.get_unverified_header(tokens["access_token"])["kid"] == key.key_id
    id_token = jwt.decode(tokens["id_token"], key, algorithms=["ES256"], issuer=issuer,
                          audience="my-app")
    assert id_token["nonce"] == "n-123" and id_token["sid"] == access["sid"]
    assert id_token["sub"] == access["sub"]


async def test_joserfc_verifies_tokens_through_the_served_jwks(live_server: LiveServer,
                                                               core: Core, realm: Realm):
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        tokens = await sign_in(http, realm)
        keys = (await http.get(f"/realms/{realm.name}/.well-known/jwks.json")).json()
    token = jose_jwt.decode(tokens["access_token"], KeySet.import_key_set(keys),
                            algorithms=["ES256"])
    claims = jose_jwt.JWTClaimsRegistry(iss={"essential": True,
                                             "value": core.realms.issuer(realm)},
                                        sub={"essential": True}, exp={"essential": True})
    claims.validate(token.claims)
    assert token.header["kid"] == keys["keys"][0]["kid"]


async def test_after_key_rotation_old_tokens_still_verify_and_new_ones_use_the_new_key(
        live_server: LiveServer, core: Core, realm: Realm):
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        before = await sign_in(http, realm)
        new_key = await core.keys.rotate(realm, "EdDSA")
        await asyncio.sleep(core.settings.key_cache_seconds + 0.2)  # other nodes' key caches
        after = await sign_in(http, realm)
        keys = (await http.get(f"/realms/{realm.name}/.well-known/jwks.json")).json()
        old_still_good = await http.get(f"/realms/{realm.name}/userinfo", headers={
            "Authorization": f"Bearer {before['access_token']}"})
    assert old_still_good.status_code == 200
    kids = {k["kid"] for k in keys["keys"]}
    old_kid = jwt.get_unverified_header(before["access_token"])["kid"]
    assert jwt.get_unverified_header(after["access_token"]) == {
        "alg": "EdDSA", "kid": new_key.kid, "typ": "at+jwt"}
    assert {old_kid, new_key.kid} <= kids
    for tokens, alg in ((before, "ES256"), (after, "EdDSA")):
        kid = jwt.get_unverified_header(tokens["access_token"])["kid"]
        jwk = next(k for k in keys["keys"] if k["kid"] == kid)
        jwt.decode(tokens["access_token"], jwt.PyJWK(jwk).key, algorithms=[alg],
                   audience=core.realms.audience(realm))


async def test_concurrent_refreshes_of_one_token_all_get_the_same_successor(
        live_server: LiveServer, core: Core, realm: Realm):
    async with httpx.AsyncClient(base_url=live_server.url,
                                 limits=httpx.Limits(max_connections=20)) as http:
        tokens = await sign_in(http, realm)

        async def refresh() -> httpx.Response:
            return await http.post(f"/realms/{realm.name}/oauth/token", data={
                "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})

        responses = await asyncio.gather(*(refresh() for _ in range(12)))
        assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses]
        successors = {r.json()["refresh_token"] for r in responses}
        assert len(successors) == 1
        # The session survived, and the successor works once more.
        onward = await http.post(f"/realms/{realm.name}/oauth/token", data={
            "grant_type": "refresh_token", "refresh_token": successors.pop()})
        assert onward.status_code == 200
    events = [e.type for e in await core.audit.recent(realm.id, limit=100)]
    assert events.count("session.refreshed") == 2
    assert "session.refresh_token_reused" not in events


async def test_concurrent_sign_ups_with_one_email_create_one_user(live_server: LiveServer,
                                                                  core: Core, realm: Realm):
    email = unique_email()
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        responses = await asyncio.gather(*(
            http.post(f"/realms/{realm.name}/signup", json={"email": email,
                                                            "password": PASSWORD})
            for _ in range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 5
    assert len(await core.users.list(realm)) == 1
