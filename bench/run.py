"""Load benchmark: Authgate served for real, driven by wrk, each figure beside its baseline.

For each store (SQLite, PostgreSQL) it starts ``uvicorn authgate.asgi:app`` with production
Argon2id parameters, then measures in one run, side by side:

- password sign-ins/s (POST /oauth/token, grant_type=password; each connection a user of its
  own) beside the raw Argon2id verify rate of this machine (the same parameters, one thread per
  core, no server): target >= 0.85;
- refresh-token rotations/s (each connection refreshes its own chain of tokens) and userinfo/s
  (each connection sends the access token of a session of its own; all of one user),
  beside a trivial JSON endpoint of the same server (GET /healthz) loaded in the same shape (one
  connection per wrk thread): targets >= 0.35 and >= 0.6;
- p50/p99 latency of each.

The machines are noisy: only ratios measured in the same run mean anything, so each figure is
measured beside its baseline in several interleaved rounds and the median ratio is reported. Results are appended
to bench/RESULTS.md as a markdown table. Needs wrk (Debian: apt-get install wrk).

    python bench/run.py [--duration 5] [--rounds 3] [--stores sqlite,postgres] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import httpx
from argon2 import PasswordHasher, Type

HERE = Path(__file__).parent
LUA = HERE / "lua"
PG_DSN = os.environ.get("AUTHGATE_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PASSWORD = "bench passphrase that is long"
ARGON2 = {"memory_cost": 19_456, "time_cost": 2, "parallelism": 1}


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def argon2_rate(seconds: float, threads: int) -> float:
    """Raw Argon2id verifies/s with one thread per core (argon2-cffi releases the GIL)."""
    hasher = PasswordHasher(type=Type.ID, **ARGON2)
    stored = hasher.hash(PASSWORD)
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(index: int) -> None:
        while time.monotonic() < stop:
            hasher.verify(stored, PASSWORD)
            counts[index] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.monotonic() - start)


def parse_wrk(output: str) -> Load:
    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", output)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return Load(rps=rps, p50_ms=ms("50"), p99_ms=ms("99"), errors=errors)


def wrk(url: str, *, seconds: int, connections: int, threads: int, script: Path | None = None,
        env: dict[str, str] | None = None) -> Load:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
               "--timeout", "10s"]
    if script is not None:
        command += ["-s", str(script)]
    result = subprocess.run([*command, url], capture_output=True, text=True, check=True,
                            env={**os.environ, "LUA_PATH": f"{LUA}/?.lua;;", **(env or {})})
    return parse_wrk(result.stdout)


def lines_file(path: Path, lines: list[str]) -> Path:
    """A file of one line each (tokens, e-mails) for the Lua scripts' ``own_line``."""
    path.write_text("\n".join(lines) + "\n")
    return path


def figure_load(base: str, figure: str, *, seconds: int, connections: int,
                lines: Path | None = None) -> Load:
    """A figure's wrk load, in the shape every tool here measures it in: one connection per wrk
    thread, so each thread's Lua state owns one line of ``lines`` (a refresh token's chain, an
    access token, a user's e-mail); "trivial" is the baseline in that same shape. A token of
    its own per connection, as distinct clients have: one token for all would read one
    session, hot in every cache, many times in each batched statement (store/batch.py)."""
    shape = {"seconds": seconds, "connections": connections, "threads": connections}
    if figure == "trivial":
        return wrk(base + "/healthz", **shape)
    assert lines is not None
    if figure == "userinfo":
        return wrk(base + "/userinfo", **shape, script=LUA / "bearers.lua",
                   env={"AUTHGATE_BENCH_TOKENS": str(lines)})
    if figure == "refresh":
        return wrk(base + "/oauth/token", **shape, script=LUA / "refresh.lua",
                   env={"AUTHGATE_BENCH_TOKENS": str(lines)})
    if figure == "signin":
        return wrk(base + "/oauth/token", **shape, script=LUA / "signin.lua",
                   env={"AUTHGATE_BENCH_EMAILS": str(lines), "AUTHGATE_BENCH_PASSWORD": PASSWORD})
    raise ValueError(f"unknown figure {figure!r}")


class Server:
    """``uvicorn authgate.asgi:app`` on a free port, configured as ``authgate serve`` runs it
    (no proxy headers: the app decides which proxies it trusts; no Server header);
    ``wrapper`` runs it under another program (``instructions.py``: valgrind)."""

    def __init__(self, database_url: str, data_dir: Path, workers: int,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "AUTHGATE_DATABASE_URL": database_url,
                    "AUTHGATE_DATA_DIR": str(data_dir), "AUTHGATE_PORT": str(self.port),
                    "AUTHGATE_LOG_LEVEL": "warning", "AUTHGATE_WORKERS": str(workers),
                    "AUTHGATE_THROTTLE_IP_FREE_ATTEMPTS": "100000"}
        self.env.pop("AUTHGATE_CONFIG", None)
        self.process: subprocess.Popen[bytes] | None = None
        self.workers = workers
        self.log = data_dir / "server.log"
        self.wrapper = wrapper

    def start(self) -> None:
        # Migrate and create the realm once, before the workers race to do it.
        subprocess.run([sys.executable, "-m", "authgate", "migrate"], env=self.env, check=True,
                       capture_output=True)
        # The server's log goes to a file: a pipe nobody reads would stall it once full.
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "uvicorn", "authgate.asgi:app", "--host",
                 "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
                 "--log-level", "warning", "--no-access-log", "--loop", "uvloop", "--http",
                 "httptools", "--no-proxy-headers", "--no-server-header"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + (600 if self.wrapper else 60)
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not become ready:\n" + self.log.read_text()[-2000:])

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


def signup(base: str) -> str:
    """Sign a user up; return its e-mail."""
    email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
    with httpx.Client(base_url=base, timeout=60) as http:
        http.post("/signup", json={"email": email, "password": PASSWORD}).raise_for_status()
    return email


def sign_in(base: str, email: str, count: int) -> tuple[list[str], list[str]]:
    """``count`` new sessions of the user: their refresh tokens and their access tokens."""
    refresh: list[str] = []
    access: list[str] = []
    with httpx.Client(base_url=base, timeout=60) as http:
        for _ in range(count):
            response = http.post("/oauth/token", data={
                "grant_type": "password", "username": email, "password": PASSWORD})
            response.raise_for_status()
            refresh.append(response.json()["refresh_token"])
            access.append(response.json()["access_token"])
    return refresh, access


async def create_pg_database() -> tuple[str, str]:
    import asyncpg

    name = f"authgate_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return name, f"{base}/{name}"


async def drop_pg_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


def new_database(store: str, data_dir: Path) -> tuple[str | None, str]:
    """An empty database for ``store``: (the PostgreSQL database's name to drop after, or
    None for a SQLite file in ``data_dir``; its URL)."""
    if store == "sqlite":
        return None, f"sqlite+aiosqlite:///{data_dir / 'authgate.db'}"
    return asyncio.run(create_pg_database())


def measure(store: str, args: argparse.Namespace) -> dict[str, object]:
    """Every figure and its baseline, in ``args.rounds`` interleaved rounds: each round
    measures a baseline and its figure back to back, so each ratio compares like with like."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"authgate-bench-{store}-"))
    pg_name, database_url = new_database(store, data_dir)
    server = Server(database_url, data_dir, args.workers)
    server.start()
    try:
        seconds, conns = args.duration, args.connections
        threads = min(conns, args.wrk_threads)
        email = signup(server.url)
        # A user per sign-in connection: concurrent sign-ins come from different users.
        emails_file = lines_file(data_dir / "sign-in-emails.txt",
                                 [signup(server.url) for _ in range(args.signin_connections)])
        results: dict[str, list[Load]] = {}
        argon2: list[float] = []

        def add(name: str, load: Load) -> None:
            results.setdefault(name, []).append(load)

        for _ in range(args.rounds):
            # A new session per connection each round: a rotated chain cannot be replayed.
            refresh_tokens, access = sign_in(server.url, email, conns)
            token_file = lines_file(data_dir / "refresh-tokens.txt", refresh_tokens)
            access_file = lines_file(data_dir / "access-tokens.txt", access)

            add("trivial", wrk(server.url + "/healthz", seconds=seconds, connections=conns,
                               threads=threads))
            add("trivial_1conn_per_thread", figure_load(server.url, "trivial", seconds=seconds,
                                                        connections=conns))
            add("userinfo", figure_load(server.url, "userinfo", seconds=seconds,
                                        connections=conns, lines=access_file))
            add("refresh", figure_load(server.url, "refresh", seconds=seconds,
                                       connections=conns, lines=token_file))
            # Password sign-ins beside the raw Argon2id rate, both saturating the same cores.
            argon2.append(argon2_rate(seconds, os.cpu_count() or 2))
            add("signin", figure_load(server.url, "signin", seconds=seconds,
                                      connections=args.signin_connections, lines=emails_file))
        return {"store": store, "loads": results, "argon2": argon2}
    finally:
        server.stop()
        if pg_name:
            asyncio.run(drop_pg_database(pg_name))
        shutil.rmtree(data_dir, ignore_errors=True)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in (
        "fastapi", "starlette", "uvicorn", "SQLAlchemy", "aiosqlite", "asyncpg", "argon2-cffi",
        "PyJWT"))
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; {versions}; "
            f"{wrk_version.splitlines()[0] if wrk_version else 'wrk'}")


FIGURES = [
    # name, label, baseline, baseline label, target
    ("userinfo", "userinfo", "trivial_1conn_per_thread", "trivial, same shape", 0.6),
    ("refresh", "refresh rotation", "trivial_1conn_per_thread", "trivial, same shape", 0.35),
    ("signin", "password sign-in", "argon2", "raw Argon2id", 0.85),
]


def report(all_results: list[dict[str, object]], args: argparse.Namespace) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Run of {now}", "", f"Machine: {machine()}", "",
             f"Load: wrk, {args.rounds} interleaved rounds of {args.duration}s per figure, "
             f"{args.connections} connections ({args.signin_connections} for sign-ins, a user "
             "each); "
             f"server: uvicorn, {args.workers} workers, uvloop + httptools; Argon2id m=19 MiB "
             "t=2 p=1. Rates and latencies are medians over the rounds; the ratio is the median "
             "of the per-round ratios (each figure over its baseline of the same round).", "",
             "| store | figure | req/s | p50 ms | p99 ms | errors | baseline (same rounds) | "
             "ratio | per round | target |",
             "|---|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for result in all_results:
        store = result["store"]
        loads: dict[str, list[Load]] = result["loads"]  # type: ignore[assignment]
        argon2: list[float] = result["argon2"]  # type: ignore[assignment]
        baselines = {"trivial": [load.rps for load in loads["trivial"]],
                     "trivial_1conn_per_thread": [load.rps for load in
                                                  loads["trivial_1conn_per_thread"]],
                     "argon2": argon2}
        trivial = loads["trivial"]
        lines.append(_row(store, "trivial JSON (GET /healthz)", trivial, "-", [], None))
        for name, label, baseline, baseline_label, target in FIGURES:
            rates = baselines[baseline]
            ratios = [load.rps / rate for load, rate in zip(loads[name], rates)]
            lines.append(_row(store, label, loads[name],
                              f"{baseline_label} {statistics.median(rates):,.1f}/s", ratios,
                              target))
    lines.append("")
    return "\n".join(lines)


def _row(store: object, label: str, loads: list[Load], baseline: str, ratios: list[float],
         target: float | None) -> str:
    median = statistics.median
    ratio = f"{median(ratios):.2f}" if ratios else ""
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    return (f"| {store} | {label} | {median(x.rps for x in loads):,.1f} "
            f"| {median(x.p50_ms for x in loads):.2f} | {median(x.p99_ms for x in loads):.2f} "
            f"| {sum(x.errors for x in loads)} | {baseline} | {ratio} | {rounds} "
            f"| {'' if target is None else f'≥ {target}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--signin-connections", type=int, default=8)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    results = [measure(store, args) for store in args.stores.split(",")]
    table = report(results, args)
    print(table)
    with args.output.open("a", encoding="utf-8") as handle:
        handle.write(table + "\n")


if __name__ == "__main__":
    main()
