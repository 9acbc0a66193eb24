"""The ``authgate`` command: serve, migrate, and administer realms, users, keys and events."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table

from authgate.config import ConfigError, Settings, load_settings
from authgate.core.errors import AuthError

app = typer.Typer(help="Authgate: a self-hosted authentication server.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
realm_app = typer.Typer(help="Realms: isolated sets of users, keys and settings.",
                        no_args_is_help=True)
user_app = typer.Typer(help="Users of a realm.", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys of a realm.", no_args_is_help=True)
org_app = typer.Typer(help="Organisations of a realm.", no_args_is_help=True)
device_app = typer.Typer(help="Remembered devices of a user.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys of a realm: the web API's APIKey, and a resource "
                         "server's credential for token introspection.", no_args_is_help=True)
app.add_typer(realm_app, name="realm")
app.add_typer(user_app, name="user")
app.add_typer(keys_app, name="keys")
app.add_typer(org_app, name="org")
app.add_typer(device_app, name="device")
app.add_typer(apikey_app, name="apikey")

console = Console()
err = Console(stderr=True)


def whole(header: str, values: list[str]) -> Column:
    """A column of identifiers to copy: never cut short, however narrow the terminal (the
    other columns wrap instead)."""
    return Column(header, no_wrap=True, min_width=max((len(v) for v in values), default=0))


T = TypeVar("T")

RealmOption = typer.Option("default", "--realm", "-r", help="The realm's name.")


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def run(work: Callable[[Any], Awaitable[T]], **overrides: Any) -> T:
    """Run ``work(core)`` against the configured store, reporting core errors plainly."""
    from authgate.api.app import build_core

    settings = settings_or_exit(**overrides)

    async def main() -> T:
        core = await build_core(settings)
        try:
            return await work(core)
        finally:
            await core.close()

    try:
        return asyncio.run(main())
    except AuthError as exc:
        err.print(f"[red]error:[/red] {exc.message} ({exc.code.value})")
        raise typer.Exit(1) from None
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def run_in(realm: str, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Run ``work(core, realm)`` for the named realm."""
    async def in_realm(core: Any) -> T:
        return await work(core, await core.realms.require(realm))

    return run(in_realm)


@app.command()
def serve(host: str = typer.Option(None, help="Address to bind (AUTHGATE_HOST)."),
          port: int = typer.Option(None, help="Port (AUTHGATE_PORT)."),
          workers: int = typer.Option(None, help="Worker processes (AUTHGATE_WORKERS).")) -> None:
    """Migrate the database, make sure a first admin exists, and serve HTTP."""
    import uvicorn

    from authgate.core.bootstrap import ADMIN_USERNAME, ensure_admin
    from authgate.logging import configure_logging

    overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items()
                 if v is not None}
    # Worker processes read their settings from the environment: pass the overrides on.
    for key, value in overrides.items():
        os.environ[f"AUTHGATE_{key.upper()}"] = str(value)
    settings = settings_or_exit()
    configure_logging(settings)
    password = run(ensure_admin)
    config = uvicorn.Config("authgate.asgi:app", host=settings.host, port=settings.port,
                            workers=settings.workers, log_level=settings.log_level,
                            access_log=False, proxy_headers=False, server_header=False)
    # The socket listens before the URL is printed: a client that connects at once waits in
    # the backlog until the app is ready, instead of being refused.
    sock = config.bind_socket()  # a port in use: uvicorn logs it and exits
    sock.listen(config.backlog)
    base = settings.listen_url
    console.print(f"[bold green]Authgate[/bold green] serving on [bold]{base}[/bold] "
                  f"(issuer {settings.issuer}, database {_safe_url(settings.database_url)})",
                  soft_wrap=True)
    console.print(f"  API docs: {base}/docs   discovery: {base}/.well-known/openid-configuration",
                  soft_wrap=True)
    if password:
        console.print(f"  First admin created: username [bold]{ADMIN_USERNAME}[/bold] password "
                      f"[bold]{password}[/bold]  (shown once; change it with "
                      f"`{_program()} user set-password {ADMIN_USERNAME}`)", soft_wrap=True)
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if config.workers == 1 and not server.started:
        raise typer.Exit(3)  # the app failed to start; uvicorn logged why


def _program() -> str:
    """This command as it was run (``make run`` runs ``.venv/bin/authgate``, which is not on
    the PATH), for the commands a message tells the user to run."""
    if os.path.basename(sys.argv[0]) != "authgate":
        return "python -m authgate"
    path = os.path.relpath(sys.argv[0])
    return path if not path.startswith("..") else sys.argv[0]


def _safe_url(url: str) -> str:
    """A database URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def migrate() -> None:
    """Bring the database schema up to date."""
    from authgate.store.migrate import current_revision

    revision = run(lambda core: current_revision(core.store.engine))
    console.print(f"database at revision {revision}")


@app.command()
def purge() -> None:
    """Delete ended sessions, expired codes and challenges, sent mail and stale counters
    older than AUTHGATE_RETENTION_DAYS (servers also do this every few minutes)."""
    counts = run(lambda core: core.housekeeping.purge())
    console.print(", ".join(f"{name}: {count}" for name, count in counts.items()))


@realm_app.command("create")
def realm_create(name: str, display_name: str = typer.Option(None, help="A display name.")) -> None:
    realm = run(lambda core: core.realms.create(name, display_name=display_name))
    console.print(f"realm {realm.name} created (project id {realm.project_id})")


@realm_app.command("list")
def realm_list() -> None:
    realms = run(lambda core: core.realms.list())
    table = Table("name", "display name", whole("project id", [r.project_id for r in realms]),
                  "created")
    for realm in realms:
        table.add_row(realm.name, realm.display_name, realm.project_id,
                      realm.created_at.isoformat(timespec="seconds"))
    console.print(table)


@user_app.command("create")
def user_create(
    login_id: str = typer.Argument(..., help="An e-mail address or a username."),
    realm: str = RealmOption,
    password: str = typer.Option(None, help="The password (prompted for if omitted)."),
    name: str = typer.Option(None, help="Display name."),
    role: list[str] = typer.Option([], "--role", help="A realm role (repeatable); "
                                   "'admin' in the default realm may use the admin API."),
) -> None:
    """Create a user with a password."""
    from authgate.core.users import NewUser

    if password is None:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    is_email = "@" in login_id
    new = NewUser(email=login_id if is_email else None, username=None if is_email else login_id,
                  password=password, name=name, roles=list(role))

    user = run_in(realm, lambda core, target: core.users.create(
        target, new, event="admin.user_created"))
    console.print(f"user {user.id} created in realm {realm}")


@user_app.command("list")
def user_list(realm: str = RealmOption, limit: int = typer.Option(100, min=1, max=10_000)) -> None:
    found = run_in(realm, lambda core, target: core.users.list(target, limit=limit))
    table = Table(whole("id", [u.id for u in found]), "email", "username", "status", "roles",
                  "created")
    for user in found:
        table.add_row(user.id, user.email or "", user.username or "", user.status,
                      ",".join(user.roles), user.created_at.isoformat(timespec="seconds"))
    console.print(table)


async def _user_or_exit(core: Any, realm: Any, login_id: str) -> Any:
    """The user with this login id in the realm, or an error message and exit status 1."""
    user = await core.users.find(realm, login_id)
    if user is None:
        err.print(f"[red]error:[/red] no user {login_id!r} in realm {realm.name}")
        raise typer.Exit(1)
    return user


def _user_status(login_id: str, realm: str, status: str) -> None:
    async def work(core: Any) -> Any:
        target = await core.realms.require(realm)
        user = await _user_or_exit(core, target, login_id)
        return await core.users.set_status(target, user.id, status, actor="cli")

    user = run(work)
    console.print(f"user {user.id} is now {user.status}")


@user_app.command("disable")
def user_disable(login_id: str, realm: str = RealmOption) -> None:
    """Disable a user and end all their sessions."""
    _user_status(login_id, realm, "disabled")


@user_app.command("enable")
def user_enable(login_id: str, realm: str = RealmOption) -> None:
    _user_status(login_id, realm, "active")


@user_app.command("set-password")
def user_set_password(login_id: str, realm: str = RealmOption,
                      password: str = typer.Option(None, help="Prompted for if omitted.")) -> None:
    """Replace a user's password (ends their sessions)."""
    if password is None:
        password = typer.prompt("new password", hide_input=True, confirmation_prompt=True)

    async def work(core: Any) -> None:
        target = await core.realms.require(realm)
        user = await _user_or_exit(core, target, login_id)
        await core.users.set_password(target, user.id, password)

    run(work)
    console.print("password changed")


@user_app.command("import")
def user_import(path: Path = typer.Argument(..., help="A JSON-lines file, or - for stdin."),
                realm: str = RealmOption) -> None:
    """Import users from JSON lines: {"email", "username", "phone", "name", ...,
    "password_hash": "$2b$..." | "pbkdf2_sha256$..." | "$argon2id$..."}."""
    handle = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
    records: list[dict[str, Any]] = []
    lines: list[int] = []  # the file line of each record
    bad: list[tuple[int, str]] = []
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                records.append(record)
                lines.append(number)
            except ValueError as exc:
                bad.append((number, f"not a JSON object: {exc}"))

    report = run_in(realm, lambda core, target: core.users.import_records(target, records))
    failures = bad + [(lines[index - 1], reason) for index, reason in report.failed]
    for number, reason in sorted(failures):
        err.print(f"line {number}: {reason}")
    console.print(f"imported {report.created} user(s); {len(bad) + len(report.failed)} failed")
    if bad or report.failed:
        raise typer.Exit(1)


@keys_app.command("rotate")
def keys_rotate(realm: str = RealmOption,
                alg: str = typer.Option(None, help="ES256, EdDSA or RS256.")) -> None:
    """Make a new active signing key; the old one stays published until its tokens expire."""
    key = run_in(realm, lambda core, target: core.keys.rotate(target, alg))
    console.print(f"new active key {key.kid} ({key.alg})")


@keys_app.command("list")
def keys_list(realm: str = RealmOption) -> None:
    found = run_in(realm, lambda core, target: core.keys.list(target))
    table = Table(whole("kid", [k.kid for k in found]), "alg", "status", "created",
                  "published until")
    for key in found:
        table.add_row(key.kid, key.alg, key.status, key.created_at.isoformat(timespec="seconds"),
                      key.publish_until.isoformat(timespec="seconds") if key.publish_until
                      else "")
    console.print(table)


@app.command()
def events(realm: str = RealmOption, limit: int = typer.Option(50, min=1, max=10_000),
           as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Recent audit events, newest first."""
    found = run_in(realm, lambda core, target: core.audit.recent(target.id, limit=limit))
    if as_json:
        for event in found:
            print(json.dumps({"id": event.id, "at": event.at.isoformat(), "type": event.type,
                              "user_id": event.user_id, "session_id": event.session_id,
                              "ip": event.ip, "data": event.data}))
        return
    table = Table("at", "type", "user", "session", "ip", "data")
    for event in found:
        table.add_row(event.at.isoformat(timespec="seconds"), event.type, event.user_id or "",
                      (event.session_id or "")[:8], event.ip or "", json.dumps(event.data))
    console.print(table)


@org_app.command("create")
def org_create(name: str, realm: str = RealmOption,
               display_name: str = typer.Option(None)) -> None:
    org = run_in(realm, lambda core, target: core.organisations.create(
        target, name, display_name=display_name))
    console.print(f"organisation {org.name} created: id {org.id}")


@org_app.command("list")
def org_list(realm: str = RealmOption) -> None:
    found = run_in(realm, lambda core, target: core.organisations.list(target))
    table = Table(whole("id", [o.id for o in found]), "name", "display name", "active",
                  "suspended", "has secret")
    for org in found:
        table.add_row(org.id, org.name, org.display_name, str(org.is_active),
                      str(org.is_suspended), str(org.secret_enc is not None))
    console.print(table)


@org_app.command("rotate-secret")
def org_rotate_secret(organisation: str = typer.Argument(..., help="Id or name."),
                      realm: str = RealmOption) -> None:
    """Create or replace the organisation's secret for customer-signed tokens (shown once)."""
    async def work(core: Any) -> Any:
        target = await core.realms.require(realm)
        org = await core.organisations.find(target, organisation)
        return await core.organisations.rotate_secret(target, org)

    secret = run(work)
    console.print(f"new secret (shown once, store it now): {secret}")


@device_app.command("list")
def device_list(login_id: str = typer.Argument(..., help="The user's e-mail or username."),
                realm: str = RealmOption,
                all_devices: bool = typer.Option(False, "--all", help="Include revoked ones.")
                ) -> None:
    """A user's remembered devices."""
    async def work(core: Any) -> Any:
        target = await core.realms.require(realm)
        user = await _user_or_exit(core, target, login_id)
        return await core.devices.list_for_user(target, user.id, include_revoked=all_devices)

    devices = run(work)
    table = Table(whole("id", [d.id for d in devices]), "name", "device key", "created",
                  "last seen", "revoked")
    for device in devices:
        table.add_row(device.id, device.name or "", device.device_key,
                      device.created_at.isoformat(timespec="seconds"),
                      device.last_seen_at.isoformat(timespec="seconds"),
                      device.revoked_at.isoformat(timespec="seconds") if device.revoked_at
                      else "")
    console.print(table)


@device_app.command("revoke")
def device_revoke(device_id: str, realm: str = RealmOption) -> None:
    """Forget a device: its re-authentication token and its sessions end."""
    device = run_in(realm, lambda core, target: core.devices.revoke(target, device_id))
    console.print(f"device {device.id} revoked")


@apikey_app.command("create")
def apikey_create(name: str = typer.Argument(..., help="What the key is for."),
                  realm: str = RealmOption,
                  organisation: str = typer.Option(None, "--org",
                                                   help="An organisation (id or name).")
                  ) -> None:
    """Create an API key (shown once)."""
    async def work(core: Any) -> Any:
        target = await core.realms.require(realm)
        org_id = None
        if organisation:
            org_id = (await core.organisations.find(target, organisation)).id
        return await core.api_keys.create(target, name, organisation_id=org_id)

    key, raw = run(work)
    console.print(f"API key {key.id} created in realm {realm}")
    console.print(f"key (shown once, store it now): {raw}")


@apikey_app.command("list")
def apikey_list(realm: str = RealmOption) -> None:
    found = run_in(realm, lambda core, target: core.api_keys.list(target))
    table = Table(whole("id", [k.id for k in found]), "prefix", "name", "organisation",
                  "created", "last used", "revoked")
    for key in found:
        table.add_row(key.id, key.prefix, key.name, key.organisation_id or "",
                      key.created_at.isoformat(timespec="seconds"),
                      key.last_used_at.isoformat(timespec="seconds") if key.last_used_at
                      else "",
                      key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "")
    console.print(table)


@apikey_app.command("revoke")
def apikey_revoke(key: str = typer.Argument(..., help="The key's id or prefix."),
                  realm: str = RealmOption) -> None:
    revoked = run_in(realm, lambda core, target: core.api_keys.revoke(
        target, key, actor="cli"))
    console.print(f"API key {revoked.id} revoked")


if __name__ == "__main__":
    app()
