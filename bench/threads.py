"""Where a figure's CPU goes: CPU per request of each thread of the server and the database,
read from /proc while wrk loads one figure. The wrk ratios of ``run.py`` are set by the event
loop's thread: a figure runs at 1 / (its CPU per request on that thread) when the thread is busy
all the time, and slower when it waits (the ``busy`` column; a group commit's fsync, a
round trip). The other threads (the SQLite commit, the hashing pool, PostgreSQL's backends)
run on the other core. For sign-ins (``--figures signin``) the hashing pool is the work and
the rest is what it competes with for the two cores.

    python bench/threads.py [--stores sqlite,postgres] [--figures trivial,userinfo,refresh,signin]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402 - the server, the sessions and wrk, as the benchmark makes them

TICKS = os.sysconf("SC_CLK_TCK")
SHOWN = 0.02  # cores: threads that use less are left out


def _thread_cpu() -> dict[tuple[str, str, str], float]:
    """CPU seconds so far of every thread of the machine, by (process, thread, name)."""
    seconds = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                    line = stat.read()
                name = line[line.index("(") + 1:line.rindex(")")]
                fields = line[line.rindex(")") + 2:].split()
                seconds[(pid, tid, name)] = (int(fields[11]) + int(fields[12])) / TICKS
        except OSError:  # a process or thread that ended meanwhile
            continue
    return seconds


def _prepare(server: run.Server, figure: str, seconds: int,
             data_dir: Path) -> Callable[[], run.Load]:
    """The figure's wrk load as run.py runs it, with its sessions made beforehand (outside the
    measurement): 16 connections, 8 for sign-ins (a user each)."""
    lines = None
    if figure in ("refresh", "userinfo"):
        refresh_tokens, access = run.sign_in(server.url, run.signup(server.url), 16)
        lines = run.lines_file(data_dir / f"{figure}-tokens.txt",
                               refresh_tokens if figure == "refresh" else access)
    elif figure == "signin":
        lines = run.lines_file(data_dir / "sign-in-emails.txt",
                               [run.signup(server.url) for _ in range(8)])
    connections = 8 if figure == "signin" else 16
    return lambda: run.figure_load(server.url, figure, seconds=seconds, connections=connections,
                                   lines=lines)


def measure(store: str, figure: str, seconds: int) -> list[str]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"authgate-threads-{store}-"))
    pg_name, database_url = run.new_database(store, data_dir)
    server = run.Server(database_url, data_dir, 1)
    server.start()
    try:
        assert server.process is not None
        wrk = _prepare(server, figure, seconds, data_dir)
        before, started = _thread_cpu(), time.monotonic()
        load = wrk()
        after, elapsed = _thread_cpu(), time.monotonic() - started
    finally:
        server.stop()
        if pg_name:
            asyncio.run(run.drop_pg_database(pg_name))
        shutil.rmtree(data_dir, ignore_errors=True)
    pid = str(server.process.pid)
    roles: dict[str, list[float]] = {}
    for (owner, tid, name), total in after.items():
        used = total - before.get((owner, tid, name), 0.0)
        if owner == pid:
            role = "event loop" if tid == pid else "other server threads"
        elif name.startswith("postgres"):
            role = "PostgreSQL processes"
        else:
            continue
        if used > 0:
            roles.setdefault(role, []).append(used)
    rows = []
    for role, used in sorted(roles.items(), key=lambda item: -sum(item[1])):
        busy = sum(used) / elapsed
        if busy >= SHOWN:
            rows.append(f"| {store} | {figure} | {load.rps:,.0f} | {role} ({len(used)}) "
                        f"| {busy:.2f} | {sum(used) * 1e6 / elapsed / load.rps:,.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--figures", default="trivial,userinfo,refresh")
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    print("| store | figure | req/s | threads (how many) | busy (cores) | CPU µs per request |")
    print("|---|---|---:|---|---:|---:|")
    for store in args.stores.split(","):
        for figure in args.figures.split(","):
            print("\n".join(measure(store, figure, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
