"""Instructions per request inside the real server: the repeatable companion of ``run.py``.

Wall-clock rates on these machines swing by a factor of two from minute to minute; the number
of instructions a request executes does not. This serves Authgate as ``run.py`` does (uvicorn,
uvloop, httptools, one worker), but under callgrind with instrumentation off until the load
starts. Then, for each figure, it switches counting on, sends ``--requests`` requests over
``--connections`` keep-alive connections at once (as wrk does; each refresh connection follows
its own token chain), and dumps the count: every thread of the server counts, the commit's
included; the kernel's work does not. The load comes from another process, so its cost is not
counted. The ratio to the trivial request predicts ``run.py``'s ratios. Sign-ins are counted
on a server of their own whose Argon2id is as cheap as it goes (8 KiB, one pass): what is left
is the work beside the hash, which the sign-in ratio loses to. Needs valgrind (Debian:
apt-get install valgrind); a few minutes per store.

    python bench/instructions.py [--requests 320] [--stores sqlite,postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402 - the server and the sessions, as the wrk benchmark makes them

FIGURES = ("trivial", "userinfo", "refresh", "dialect JWKS")
TARGETS = {"userinfo": 0.6, "refresh": 0.35}
# A sign-in's work beside its Argon2id verification, measured on a server of its own whose
# hashes are as cheap as Argon2id allows: what the sign-in ratio of run.py loses to.
SIGN_IN = "sign-in outside Argon2id"
CHEAP_ARGON2 = {"AUTHGATE_ARGON2_MEMORY_KIB": "8", "AUTHGATE_ARGON2_TIME_COST": "1"}
# One at a time: sign-ins at once from one address make the throttle's compare-and-set lose
# to each other at a rate set by timing, and under callgrind everything but PostgreSQL runs
# fifty times slower, so the count would neither repeat nor match run.py's. How often that
# happens at full speed is measured apart.
SIGN_IN_CONNECTIONS = 1
WARM_UP = 5  # requests per connection and figure before counting
SLOWDOWN = 50  # how many times slower the server runs under callgrind


async def _connection(port: int, request: Callable[[dict[str, str]], bytes], count: int,
                      chain: dict[str, str]) -> None:
    """``count`` requests on one keep-alive connection; a refresh takes its successor."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(request(chain))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError((head + body).decode(errors="replace"))
            if b'"refresh_token"' in body:
                chain["refresh"] = json.loads(body)["refresh_token"]
    finally:
        writer.close()


def _requests(host: str, project: str) -> dict[str, Callable[[dict[str, str]], bytes]]:
    def form(body: str) -> bytes:
        return (f"POST /oauth/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                f"application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
                f"{body}").encode()

    def refresh(chain: dict[str, str]) -> bytes:
        return form(f"grant_type=refresh_token&refresh_token={chain['refresh']}")

    def sign_in(chain: dict[str, str]) -> bytes:
        return form(urlencode({"grant_type": "password", "username": chain["email"],
                               "password": run.PASSWORD}))

    return {
        "trivial": lambda _: f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        "userinfo": lambda chain: (f"GET /userinfo HTTP/1.1\r\nHost: {host}\r\n"
                                   f"Authorization: Bearer {chain['access']}\r\n\r\n").encode(),
        "refresh": refresh,
        "dialect JWKS": lambda _: (f"GET /descope/v2/keys/{project} HTTP/1.1\r\n"
                                   f"Host: {host}\r\n\r\n").encode(),
        SIGN_IN: sign_in,
    }


def measure(store: str, requests: int, connections: int,
            sign_in: bool = False) -> dict[str, float]:
    """Instructions per request of each figure, counted in the server; with ``sign_in``, of
    sign-ins alone, on a server whose Argon2id is as cheap as it goes."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"authgate-instructions-{store}-"))
    pg_name, database_url = run.new_database(store, data_dir)
    out = data_dir / "callgrind.out"
    server = run.Server(database_url, data_dir, 1, wrapper=(
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"))
    figures: tuple[str, ...] = FIGURES
    if sign_in:
        server.env.update(CHEAP_ARGON2)
        figures, connections = (SIGN_IN,), SIGN_IN_CONNECTIONS
    # Under valgrind a request takes about fifty times as long, so the caches that expire by
    # the clock (realms, keys, verified tokens: key_cache_seconds, 5 s by default) would miss
    # fifty times as often per request as in the server wrk measures: their period is
    # stretched by as much.
    server.env["AUTHGATE_KEY_CACHE_SECONDS"] = str(5 * SLOWDOWN)
    server.start()
    assert server.process is not None
    pid = str(server.process.pid)  # valgrind runs the program in its own process

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, pid], check=True, capture_output=True)

    try:
        created = subprocess.run([sys.executable, "-m", "authgate", "realm", "create", "bench"],
                                 env=server.env, check=True, capture_output=True, text=True)
        project = re.search(r"project id (\S+?)\)", created.stdout).group(1)
        if sign_in:  # each connection a user of its own, as run.py's
            chains = [{"email": run.signup(server.url)} for _ in range(connections)]
        else:
            email = run.signup(server.url)
            refresh_tokens, access = run.sign_in(server.url, email, connections)
            # Each connection a session of its own, as run.py's.
            chains = [{"refresh": token, "access": bearer}
                      for token, bearer in zip(refresh_tokens, access)]
        make = _requests(f"127.0.0.1:{server.port}", project)

        def load(figure: str, per_connection: int) -> None:
            async def all_connections() -> None:
                await asyncio.gather(*(_connection(server.port, make[figure], per_connection,
                                                   chain) for chain in chains))
            asyncio.run(all_connections())

        for figure in figures:
            load(figure, WARM_UP)
        per_connection = max(1, requests // connections)
        for figure in figures:
            control("--instr=on")
            control("--zero")
            load(figure, per_connection)
            control(f"--dump={figure.replace(' ', '_')}")
            control("--instr=off")
        counts: dict[str, float] = {}
        for dump in out.parent.glob(out.name + "*"):
            text = dump.read_text()
            trigger = re.search(r"^desc: Trigger: dump (\S+)", text, re.M)
            total = re.search(r"^totals: (\d+)", text, re.M)
            if trigger and total:
                counts[trigger.group(1).replace("_", " ")] = \
                    int(total.group(1)) / (per_connection * connections)
        return counts
    finally:
        server.stop()
        if pg_name:
            asyncio.run(run.drop_pg_database(pg_name))
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--stores", default="sqlite,postgres")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    stores = args.stores.split(",")
    # Counts do not depend on what else the machine runs: the stores run side by side.
    with ThreadPoolExecutor(max_workers=2 * len(stores)) as pool:
        results = list(pool.map(lambda s: measure(s, args.requests, args.connections), stores))
        sign_ins = list(pool.map(lambda s: measure(s, args.requests, args.connections,
                                                   sign_in=True), stores))
    print("| store | figure | instructions per request | trivial / figure | target |")
    print("|---|---|---:|---:|---:|")
    for store, counts, signed_in in zip(stores, results, sign_ins):
        for figure in FIGURES:
            ratio = counts["trivial"] / counts[figure]
            target = TARGETS.get(figure)
            print(f"| {store} | {figure} | {counts[figure] / 1e6:.3f} M | {ratio:.2f} "
                  f"| {f'≥ {target}' if target else ''} |")
        print(f"| {store} | {SIGN_IN} (its own server, Argon2id m=8 KiB, t=1; one at a time) "
              f"| {signed_in[SIGN_IN] / 1e6:.3f} M | | |")


if __name__ == "__main__":
    main()
