"""The first administrator, the admin API, configuration, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from authgate.config import ConfigError, load_master_secret, load_settings
from authgate.core.bootstrap import ADMIN_USERNAME, ensure_admin
from authgate.core.engine import Core
from tests.conftest import PASSWORD, unique_email


async def admin_token(client: httpx.AsyncClient, core: Core) -> str:
    password = await ensure_admin(core)
    if password is None:  # made by an earlier test on this backend: reset it
        realm = await core.realms.require("default")
        admin = await core.users.find(realm, ADMIN_USERNAME)
        password = "admin passphrase for tests"
        await core.users.set_password(realm, admin.id, password)
    response = await client.post("/oauth/token", data={
        "grant_type": "password", "username": ADMIN_USERNAME, "password": password})
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


async def test_the_first_admin_is_created_once(core: Core):
    await ensure_admin(core)
    assert await ensure_admin(core) is None


async def test_the_admin_api_manages_realms_users_keys_and_events(client, core):
    headers = {"Authorization": f"Bearer {await admin_token(client, core)}"}
    name = f"adm-{os.urandom(4).hex()}"
    created = await client.post("/admin/realms", json={"name": name}, headers=headers)
    assert created.status_code == 201 and created.json()["project_id"].startswith("P")
    assert name in [r["name"] for r in (await client.get("/admin/realms",
                                                         headers=headers)).json()["realms"]]
    email = unique_email()
    user = await client.post(f"/admin/realms/{name}/users",
                             json={"email": email, "password": PASSWORD}, headers=headers)
    assert user.status_code == 201
    disabled = await client.post(f"/admin/realms/{name}/users/{user.json()['id']}/disable",
                                 headers=headers)
    assert disabled.json()["status"] == "disabled"
    rotated = await client.post(f"/admin/realms/{name}/keys/rotate", json={"alg": "RS256"},
                                headers=headers)
    assert rotated.json()["alg"] == "RS256"
    keys = (await client.get(f"/admin/realms/{name}/keys", headers=headers)).json()["keys"]
    assert [k["status"] for k in keys] == ["active", "retired"]
    events = (await client.get(f"/admin/events?realm={name}", headers=headers)).json()
    assert {"keys.rotated", "admin.action", "admin.user_created"} <= {
        e["type"] for e in events["events"]}


async def test_the_admin_api_refuses_users_without_the_admin_role(client, core):
    realm = await core.realms.require("default")
    email = unique_email()
    await client.post("/signup", json={"email": email, "password": PASSWORD})
    token = (await client.post("/oauth/token", data={
        "grant_type": "password", "username": email, "password": PASSWORD})).json()
    assert token.get("access_token"), token
    response = await client.get("/admin/realms",
                                headers={"Authorization": f"Bearer {token['access_token']}"})
    assert response.status_code == 403
    assert (await client.get("/admin/realms")).status_code == 401
    assert realm.name == "default"


def test_a_bad_setting_stops_the_start_naming_it(tmp_path: Path):
    with pytest.raises(ConfigError, match="AUTHGATE_ACCESS_TOKEN_TTL"):
        load_settings(data_dir=tmp_path, access_token_ttl=5)
    with pytest.raises(ConfigError, match="AUTHGATE_DATABASE_URL"):
        load_settings(data_dir=tmp_path, database_url="mysql://x")
    with pytest.raises(ConfigError, match="AUTHGATE_DIALECTS"):
        load_settings(data_dir=tmp_path, dialects=["nope"])


def test_settings_come_from_a_toml_file_and_the_environment_wins(tmp_path: Path,
                                                                monkeypatch):
    config = tmp_path / "authgate.toml"
    config.write_text('access_token_ttl = 600\nissuer = "https://id.example.com/"\n'
                      'dialects = ["descope"]\n')
    monkeypatch.setenv("AUTHGATE_CONFIG", str(config))
    monkeypatch.setenv("AUTHGATE_ACCESS_TOKEN_TTL", "300")
    settings = load_settings(data_dir=tmp_path)
    assert settings.access_token_ttl == 300
    assert settings.issuer == "https://id.example.com"
    assert settings.dialects == ["descope"]
    config.write_text("access_token_ttl = [broken")
    with pytest.raises(ConfigError):
        load_settings(data_dir=tmp_path)


def test_the_master_secret_is_generated_once_with_private_permissions(tmp_path: Path):
    settings = load_settings(data_dir=tmp_path / "d")
    first = load_master_secret(settings)
    path = tmp_path / "d" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_master_secret(settings) == first and len(first) == 32
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_master_secret(settings)
    with pytest.raises(ConfigError, match="AUTHGATE_MASTER_SECRET"):
        load_master_secret(load_settings(data_dir=tmp_path, master_secret="too-short"))


def test_processes_starting_at_once_agree_on_one_master_secret(tmp_path: Path):
    """Server workers started together (uvicorn --workers) each read the secret that won,
    never a file still being written."""
    code = ("import sys, time; from authgate.config import load_settings, load_master_secret; "
            "settings = load_settings(data_dir=sys.argv[1])\n"
            "while time.time() < float(sys.argv[2]): pass\n"  # all at the same moment
            "sys.stdout.write(load_master_secret(settings).hex())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGATE_")}
    moment = str(time.time() + 3)
    starts = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "d"), moment],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(8)]
    results = [start.communicate(timeout=60) for start in starts]
    assert all(start.returncode == 0 for start in starts), [err for _, err in results]
    assert len({out for out, _ in results}) == 1
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["master.key"]  # no drafts left


def cli(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AUTHGATE_DATA_DIR": str(tmp_path), "AUTHGATE_ARGON2_MEMORY_KIB": "1024",
           "AUTHGATE_ARGON2_TIME_COST": "1", "COLUMNS": "200"}
    env.pop("AUTHGATE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "authgate", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_the_cli_administers_realms_users_keys_and_events(tmp_path: Path):
    assert "database at revision" in cli(tmp_path, "migrate").stdout
    assert "realm acme created" in cli(tmp_path, "realm", "create", "acme").stdout
    assert "acme" in cli(tmp_path, "realm", "list").stdout
    made = cli(tmp_path, "user", "create", "ann@example.com", "-r", "acme", "--password",
               PASSWORD)
    assert made.returncode == 0, made.stderr
    lines = "\n".join([json.dumps({"email": "imp@example.com",
                                   "password_hash": "$2b$04$" + "a" * 53}),
                       "not json", json.dumps({"email": "not-an-email"})])
    imported = cli(tmp_path, "user", "import", "-", "-r", "acme", stdin=lines)
    assert imported.returncode == 1
    assert "imported 1 user(s); 2 failed" in imported.stdout
    assert "line 2" in imported.stderr and "line 3" in imported.stderr
    listed = cli(tmp_path, "user", "list", "-r", "acme").stdout
    assert "ann@example.com" in listed and "imp@example.com" in listed
    assert "is now disabled" in cli(tmp_path, "user", "disable", "ann@example.com",
                                    "-r", "acme").stdout
    assert "no user" in cli(tmp_path, "user", "disable", "ghost@example.com", "-r",
                            "acme").stderr
    assert "new active key" in cli(tmp_path, "keys", "rotate", "-r", "acme").stdout
    assert cli(tmp_path, "keys", "list", "-r", "acme").stdout.count("ES256") == 2
    events = [json.loads(line) for line in
              cli(tmp_path, "events", "-r", "acme", "--json").stdout.splitlines()]
    assert {"keys.rotated", "user.imported", "admin.user_created"} <= {e["type"] for e in events}
    broken = subprocess.run([sys.executable, "-m", "authgate", "realm", "list"],
                            env={**os.environ, "AUTHGATE_DATA_DIR": str(tmp_path),
                                 "AUTHGATE_PORT": "not-a-port"},
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2 and "AUTHGATE_PORT" in broken.stderr


def test_identifiers_are_printed_whole_in_a_narrow_terminal(tmp_path: Path):
    """A realm's project id (what a Descope client is configured with) and a user's id are
    copied from these tables: at 80 columns the other columns wrap, the ids are not cut."""
    made = cli(tmp_path, "realm", "create", "a-realm-with-a-rather-long-name")
    project_id = made.stdout.split("project id ")[1].rstrip().rstrip(")")
    cli(tmp_path, "user", "create", "someone.with.a.long.address@example.com", "-r",
        "a-realm-with-a-rather-long-name", "--password", PASSWORD)
    env = {**os.environ, "AUTHGATE_DATA_DIR": str(tmp_path), "COLUMNS": "80"}
    env.pop("AUTHGATE_CONFIG", None)

    def narrow(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "authgate", *args], env=env,
                              capture_output=True, text=True, timeout=120).stdout

    assert project_id in narrow("realm", "list")
    users = narrow("user", "list", "-r", "a-realm-with-a-rather-long-name")
    user_id = json.loads(cli(tmp_path, "events", "-r", "a-realm-with-a-rather-long-name",
                             "--json").stdout.splitlines()[0])["user_id"]
    assert user_id in users


def test_a_configuration_file_that_is_missing_stops_the_start(tmp_path, monkeypatch):
    from authgate.config import ConfigError, load_settings

    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("AUTHGATE_CONFIG", str(missing))
    with pytest.raises(ConfigError) as raised:
        load_settings(data_dir=tmp_path)
    assert "AUTHGATE_CONFIG" in str(raised.value) and str(missing) in str(raised.value)


def test_a_trusted_proxy_that_is_not_a_network_is_named(tmp_path, monkeypatch):
    from authgate.config import ConfigError, load_settings

    monkeypatch.delenv("AUTHGATE_CONFIG", raising=False)
    monkeypatch.setenv("AUTHGATE_TRUSTED_PROXIES", '["10.0.0.0/8", "not-an-ip"]')
    with pytest.raises(ConfigError) as raised:
        load_settings(data_dir=tmp_path)
    assert "AUTHGATE_TRUSTED_PROXIES" in str(raised.value) and "not-an-ip" in str(raised.value)


async def test_admin_events_name_the_administrator_who_acted(client, core):
    """Every audit event of an admin request carries the administrator's user and session."""
    from authgate.core.realms import DEFAULT_REALM
    from authgate.core.users import NewUser

    realm = await core.realms.require(DEFAULT_REALM)
    email = f"acting-admin-{uuid.uuid4().hex[:8]}@example.com"
    chief = await core.users.create(realm, NewUser(email=email, password="admin passphrase!!",
                                                   roles=["admin"]))
    tokens = (await client.post("/oauth/token", data={
        "grant_type": "password", "username": email, "password": "admin passphrase!!"})).json()
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    created = await client.post(f"/admin/realms/{realm.name}/users", headers=bearer, data={
        "email": f"made-{uuid.uuid4().hex[:8]}@example.com", "email_verified": "false"})
    assert created.status_code == 201 and created.json()["email_verified"] is False
    user_id = created.json()["id"]
    assert (await client.post(f"/admin/realms/{realm.name}/users/{user_id}/disable",
                              headers=bearer)).status_code == 200
    events = [e for e in await core.audit.recent(realm.id, user_id=user_id)]
    assert {e.type for e in events} >= {"admin.user_created", "admin.action"}
    import jwt

    sid = jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"]
    for event in events:
        assert (event.data["actor"], event.data["actor_session"]) == (chief.id, sid)
    # A request that is not an admin's records no actor.
    signed_in = await core.audit.recent(realm.id, user_id=chief.id)
    assert all("actor" not in e.data for e in signed_in)


async def test_changing_a_membership_is_audited_with_what_it_was(core):
    from authgate.core.realms import DEFAULT_REALM
    from authgate.core.users import NewUser

    realm = await core.realms.require(DEFAULT_REALM)
    org = await core.organisations.create(realm, f"audited-{uuid.uuid4().hex[:8]}")
    user = await core.users.create(realm, NewUser(email=f"m-{uuid.uuid4().hex[:8]}@example.com"))
    await core.organisations.add_member(realm, org, user.id, roles=["user"])
    await core.organisations.add_member(realm, org, user.id, roles=["user"])  # no change
    await core.organisations.add_member(realm, org, user.id, roles=["owner"], status="inactive")
    updated = [e for e in await core.audit.recent(realm.id, user_id=user.id)
               if e.type == "membership.updated"]
    assert len(updated) == 1
    assert updated[0].data["before"] == {"roles": ["user"], "status": "active"}
    assert (updated[0].data["roles"], updated[0].data["status"]) == (["owner"], "inactive")


async def test_concurrent_additions_of_one_member_all_succeed(core):
    """Eight requests adding the same user to an organisation at once: one makes the
    membership, the others change it (on PostgreSQL the others had failed on its unique key,
    a 500)."""
    import asyncio

    from authgate.core.users import NewUser

    realm = await core.realms.create(f"race-{os.urandom(4).hex()}")
    user = await core.users.create(realm, NewUser(email=unique_email(), password=PASSWORD))
    org = await core.organisations.create(realm, "race")
    results = await asyncio.gather(*(core.organisations.add_member(realm, org, user.id,
                                                                   roles=["member"])
                                     for _ in range(8)))
    assert {membership.id for membership in results} == {results[0].id}
    async with core.store.transaction() as tx:
        created = await tx.audit.recent(realm.id, types=["membership.created"])
    assert len(created) == 1


async def test_an_offset_past_any_table_is_refused_not_a_server_error(client, core):
    headers = {"Authorization": f"Bearer {await admin_token(client, core)}"}
    for offset in (2 ** 63, 2 ** 64, 10 ** 30):
        response = await client.get(f"/admin/realms/default/users?offset={offset}",
                                    headers=headers)
        assert response.status_code in (400, 422) and "offset" in response.text, response.text
    assert (await client.get("/admin/realms/default/users?offset=5",
                             headers=headers)).status_code == 200


def _serve(tmp_path: Path, port: int, *args: str, host: str = "127.0.0.1") -> subprocess.Popen:
    env = {**os.environ, "AUTHGATE_DATA_DIR": str(tmp_path), "AUTHGATE_PORT": str(port),
           "AUTHGATE_HOST": host,
           "AUTHGATE_ARGON2_MEMORY_KIB": "1024", "AUTHGATE_ARGON2_TIME_COST": "1",
           "COLUMNS": "300", "PYTHONUNBUFFERED": "1"}
    env.pop("AUTHGATE_CONFIG", None)
    env.pop("AUTHGATE_DATABASE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "authgate", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _until_url(server: subprocess.Popen) -> list[str]:
    """The lines ``serve`` prints up to and including the one with its URL."""
    assert server.stdout is not None
    lines: list[str] = []
    for line in server.stdout:
        lines.append(line)
        if "serving on" in line:
            return lines
    raise AssertionError("serve ended without printing its URL:\n" + "".join(lines))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_answers_the_moment_it_prints_its_url(tmp_path: Path, workers: str):
    """A newcomer who runs ``make run`` and then requests the printed URL at once is answered,
    not refused: the port listens before the URL is printed."""
    from tests.conftest import free_port

    port = free_port()
    server = _serve(tmp_path, port, "--workers", workers)
    try:
        printed = "".join(_until_url(server))
        assert f"http://127.0.0.1:{port}" in printed
        # At once: no retry, no wait for readiness.
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60)
        assert answer.status_code == 200
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    # Stopped by SIGTERM, it shuts down cleanly (uvicorn then re-raises the signal).
    assert server.returncode in (0, -signal.SIGTERM)


def test_an_ipv6_address_makes_a_bracketed_issuer_and_url(tmp_path: Path):
    """The issuer derived from an IPv6 listening address is a URL (RFC 3986: the address in
    brackets), and so is the URL ``serve`` prints; that URL answers at once."""
    import socket

    settings = load_settings(host="::1", port=8443, data_dir=tmp_path / "d")
    assert settings.issuer == "http://[::1]:8443" == settings.public_url
    assert load_settings(host="localhost", data_dir=tmp_path / "d").issuer == \
        "http://localhost:8000"
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    server = _serve(tmp_path, port, host="::1")
    try:
        printed = "".join(_until_url(server))
        assert f"serving on http://[::1]:{port}" in printed
        assert httpx.get(f"http://[::1]:{port}/healthz", timeout=60).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_prints_the_first_admin_once_and_stops_on_a_port_in_use(tmp_path: Path):
    from tests.conftest import free_port

    port = free_port()
    first = _serve(tmp_path, port)
    try:
        _until_url(first)
        assert first.stdout is not None
        admin_line = first.stdout.readline() + first.stdout.readline()
        assert f"First admin created: username {ADMIN_USERNAME} password" in admin_line
        # The command to change it, as this server was started (not on the PATH).
        assert f"`python -m authgate user set-password {ADMIN_USERNAME}`" in admin_line
        # A second server on the same port cannot bind: it says so and stops, non-zero.
        second = _serve(tmp_path, port)
        out, _ = second.communicate(timeout=60)
        assert second.returncode != 0
        assert "serving on" not in out
        assert "address already in use" in out.lower()
    finally:
        first.terminate()
        first.wait(timeout=30)
    again = _serve(tmp_path, free_port())
    try:
        after_url = "".join(_until_url(again)) + (again.stdout.readline() if again.stdout else "")
        assert "First admin created" not in after_url
    finally:
        again.terminate()
        again.wait(timeout=30)
