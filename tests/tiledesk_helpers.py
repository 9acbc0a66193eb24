"""Helpers shared by the Tiledesk and verification tests: reading delivered mail, admin tokens."""

from __future__ import annotations

import re
from email.message import Message
from typing import Any

import httpx

from authgate.core.engine import Core
from authgate.core.users import NewUser
from authgate.mail.worker import OutboxWorker
from tests.conftest import PASSWORD, MailBox, unique_email


def body_of(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


async def deliver_and_read(core: Core, box: MailBox, to: str) -> str:
    """Run the outbox worker once (real SMTP to the test server) and return the newest mail's
    text to ``to``."""
    await OutboxWorker(core).run_once()
    return body_of(await box.wait_for(to))


def mailed_code(text: str) -> str:
    found = re.search(r"(?:code|password): (\d{6})\b", text)
    assert found, text
    return found.group(1)


def mailed_link(text: str) -> str:
    found = re.search(r"link: (\S+)", text)
    assert found, text
    return found.group(1)


async def admin_token(client: httpx.AsyncClient, core: Core) -> dict[str, str]:
    """Authorization headers of a fresh administrator of the default realm."""
    realm = await core.realms.require("default")
    email = unique_email("admin")
    await core.users.create(realm, NewUser(email=email, password=PASSWORD, roles=["admin"]))
    response = await client.post("/oauth/token", data={
        "grant_type": "password", "username": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def json_of(response: httpx.Response) -> Any:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()
