"""Refresh-token rotations against a large token table: random (version 4) row ids beside
time-ordered (version 7) ones, on the real store.

Every rotation inserts a row into ``refresh_tokens`` and its three indexes. With random ids
the primary key's index takes each new row at a random place, so on a large table each insert
touches a page nobody else touched lately; with time-ordered ids new rows gather at the
index's end. The request benchmark (``run.py``) cannot show this: its table holds tens of
thousands of rows; a deployment's holds every token of the refresh TTL.

For each store, two databases are filled alike (``--rows`` rotated tokens of the past month,
ids of the scheme measured), then 16 chains of refreshes rotate through ``Store.rotate_live``
in process, the two databases alternated round by round. Appends a table to bench/RESULTS.md.

    python bench/ordered_ids.py [--stores sqlite,postgres] [--rows 300000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402 - databases made as the request benchmark makes them

from authgate.api.app import build_core  # noqa: E402
from authgate.config import load_settings  # noqa: E402
from authgate.core import sessions as core_sessions  # noqa: E402
from authgate.core.engine import Core  # noqa: E402
from authgate.core.users import NewUser  # noqa: E402
from authgate.crypto.tokens import digest, new_id, new_ordered_id, new_token  # noqa: E402

HERE = Path(__file__).parent
SCHEMES = {"random (v4)": new_id, "time-ordered (v7)": new_ordered_id}
CHAINS = 16


async def _prepared(store: str, scheme: str, rows: int,
                    data_dir: Path) -> tuple[Core, Any, list[str], str | None]:
    """A core on a new database of ``store``: a user, 16 sessions (a chain each), and ``rows``
    rotated tokens of the past month spread over them."""
    pg_name, url = (None, f"sqlite+aiosqlite:///{data_dir / 'authgate.db'}") \
        if store == "sqlite" else await run.create_pg_database()
    settings = load_settings(database_url=url, data_dir=data_dir, issuer="http://bench.test",
                             argon2_memory_kib=1024, argon2_time_cost=1)
    core = await build_core(settings)
    realm = await core.realms.by_name("default")
    assert realm is not None
    user = await core.users.create(realm, NewUser(email=f"ids-{new_id()[:8]}@example.com",
                                                  password=run.PASSWORD))
    chains = []
    for _ in range(CHAINS):
        tokens = await core.sessions.start(realm, user, amr=["pwd"])
        chains.append(tokens.refresh_token)
    async with core.store.transaction() as tx:
        session_ids = [row[0] for row in await tx.conn.execute(text(
            "SELECT id FROM sessions WHERE user_id = :u"), {"u": user.id})]
    now = datetime.now(UTC)
    make = SCHEMES[scheme]
    batch = 5_000
    for start in range(0, rows, batch):
        values = []
        for i in range(start, min(rows, start + batch)):
            at = now - timedelta(days=30) + timedelta(seconds=30 * 86400 * i / rows)
            token_id = (new_ordered_id(int(at.timestamp() * 1000)) if make is new_ordered_id
                        else new_id())
            values.append({"id": token_id, "session_id": session_ids[i % len(session_ids)],
                           "token_hash": digest(new_token()), "created_at": at,
                           "expires_at": at + timedelta(days=30), "rotated_at": at})
        async with core.store.transaction(write=True) as tx:
            await tx.refresh_tokens._insert_rows(values)  # one statement run for each
    return core, realm, chains, pg_name


async def _rotate(core: Core, realm: Any, chains: list[str], scheme: str, count: int) -> float:
    """Rotations per second: ``count`` by each chain, all chains at once."""
    core_sessions.new_ordered_id = SCHEMES[scheme]  # what the core makes successors' ids with

    async def chain(at: int) -> None:
        raw = chains[at]
        for _ in range(count):
            rotation, successor = core.sessions._rotation(realm, digest(raw), None, None)
            assert await core.store.rotate_live(rotation) is not None
            raw = successor
        chains[at] = raw

    started = time.perf_counter()
    await asyncio.gather(*(chain(at) for at in range(len(chains))))
    return len(chains) * count / (time.perf_counter() - started)


async def measure(store: str, args: argparse.Namespace) -> list[str]:
    prepared = {}
    dirs = []
    try:
        for scheme in SCHEMES:
            data_dir = Path(tempfile.mkdtemp(prefix=f"authgate-ids-{store}-"))
            dirs.append(data_dir)
            prepared[scheme] = await _prepared(store, scheme, args.rows, data_dir)
        rates: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
        for round_ in range(args.rounds):
            order = list(SCHEMES) if round_ % 2 == 0 else list(SCHEMES)[::-1]
            for scheme in order:
                core, realm, chains, _ = prepared[scheme]
                rates[scheme].append(await _rotate(core, realm, chains, scheme, args.count))
        base = rates["random (v4)"]
        lines = []
        for scheme, found in rates.items():
            ratios = [a / b for a, b in zip(found, base)]
            lines.append(f"| {store} | {scheme} | {statistics.median(found):,.0f} | "
                         f"{', '.join(f'{r:,.0f}' for r in found)} | "
                         f"{statistics.median(ratios):.2f} |")
        return lines
    finally:
        for scheme, (core, _, _, pg_name) in prepared.items():
            await core.store.close()
            if pg_name:
                await run.drop_pg_database(pg_name)
        for data_dir in dirs:
            shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--count", type=int, default=200, help="rotations per chain a round")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    lines = []
    for store in args.stores.split(","):
        lines += asyncio.run(measure(store, args))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join([
        f"## Refresh-token ids on a large table, {stamp}", "",
        f"Machine: {run.machine()}", "",
        f"`bench/ordered_ids.py`: {args.rows:,} rotated tokens of the past month in each "
        f"database, then {CHAINS} chains of refreshes through `Store.rotate_live` in process, "
        f"{args.count} each a round, {args.rounds} rounds alternating the two databases. "
        "Ratio: the median of each round's rate over random ids' rate in the same round.", "",
        "| store | row ids | rotations/s (median) | per round | ratio to random |",
        "|---|---|---:|---|---:|", *lines, ""])
    print(report)
    with args.output.open("a") as out:
        out.write("\n" + report)


if __name__ == "__main__":
    main()
