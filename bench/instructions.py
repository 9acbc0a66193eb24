"""Instructions per request, counted by callgrind: the repeatable companion of ``run.py``.

Wall-clock rates on these machines swing by a factor of two from minute to minute; the number
of instructions a request executes does not. This runs Authgate's ASGI app in process (no HTTP
server, SQLite in a temporary directory, test-speed Argon2id), drives a trivial request
(GET /healthz), userinfo, refresh rotations and a dialect's cheapest request (the Descope
project's JWKS, a cache hit: mostly routing and framework) through it, and reports the instructions each
costs: callgrind's total for N requests minus its total for none, over N. Every thread counts,
the commit's included; the hash seed is fixed, so a run repeats to the instruction. Needs valgrind (Debian: apt-get install valgrind); takes a few minutes.

    python bench/instructions.py [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FORM = [(b"content-type", b"application/x-www-form-urlencoded")]
PASSWORD = "correct horse battery staple 1"
WARM_UP = 30
FIGURES = ("trivial", "userinfo", "refresh", "dialect JWKS")


async def call(app: Any, method: str, path: str, body: bytes = b"",
               headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
    """One request through the ASGI app, as a server would make it."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000), "state": {},
             "headers": [(b"host", b"localhost"), (b"content-length", str(len(body)).encode()),
                         *(headers or [])]}
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:])


async def drive(figure: str, count: int) -> None:
    """Set up, warm every path up, then make ``count`` requests of ``figure``."""
    from authgate.api.app import build_core, create_app
    from authgate.config import load_settings
    from authgate.core.users import NewUser

    data = Path(tempfile.mkdtemp(prefix="authgate-instructions-"))
    try:
        settings = load_settings(data_dir=data, database_url=f"sqlite+aiosqlite:///{data}/a.db",
                                 master_secret="q" * 43, issuer="http://authgate.test",
                                 argon2_memory_kib=1024, argon2_time_cost=1)
        core = await build_core(settings)
        app = create_app(settings, core)
        realm = await core.realms.ensure_default()
        await core.users.create(realm, NewUser(email="a@example.com", password=PASSWORD))
        status, body = await call(app, "POST", "/oauth/token", (
            "grant_type=password&username=a%40example.com&password="
            + PASSWORD.replace(" ", "+")).encode(), FORM)
        assert status == 200, body
        tokens = json.loads(body)
        refresh, bearer = tokens["refresh_token"], f"Bearer {tokens['access_token']}".encode()

        async def one(name: str) -> None:
            nonlocal refresh
            if name == "trivial":
                status, body = await call(app, "GET", "/healthz")
            elif name == "dialect JWKS":
                status, body = await call(app, "GET", f"/descope/v2/keys/{realm.project_id}")
            elif name == "userinfo":
                status, body = await call(app, "GET", "/userinfo",
                                          headers=[(b"authorization", bearer)])
            else:
                status, body = await call(app, "POST", "/oauth/token", (
                    f"grant_type=refresh_token&refresh_token={refresh}").encode(), FORM)
                refresh = json.loads(body)["refresh_token"] if status == 200 else refresh
            assert status == 200, body

        for _ in range(WARM_UP):
            for name in FIGURES:
                await one(name)
        for _ in range(count):
            await one(figure)
        await core.store.close()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def collected(figure: str, count: int) -> int:
    """callgrind's instruction total for a run of ``count`` requests of ``figure``."""
    # A fixed hash seed: dict and set layouts, and so the instruction counts, repeat exactly.
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--drive", figure, str(count)], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"})
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(result.stderr[-2000:])
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--drive", nargs=2, metavar=("FIGURE", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        import uvloop

        uvloop.run(drive(args.drive[0], int(args.drive[1])))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    # Counts do not depend on what else the machine runs: one run per core at a time.
    runs = [("trivial", 0), *((name, args.requests) for name in FIGURES)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        totals = list(pool.map(lambda run: collected(*run), runs))
    base = totals[0]
    per_request = {name: (total - base) / args.requests
                   for name, total in zip(FIGURES, totals[1:])}
    print(f"| figure | instructions per request | trivial / figure |\n|---|---:|---:|")
    for name in FIGURES:
        print(f"| {name} | {per_request[name] / 1e6:.2f} M "
              f"| {per_request['trivial'] / per_request[name]:.2f} |")


if __name__ == "__main__":
    main()
