"""The native API: sign-up, the token endpoint's grants and errors, userinfo, sessions."""

from __future__ import annotations

import httpx

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
    info = await client.get(realm_url(realm, "/userinfo"),
                            headers={"Authorization": f"Bearer {body['access_token']}"})
    assert info.status_code == 200
    assert info.json()["email"] == email
    assert info.json()["sub"] == created.json()["id"]
