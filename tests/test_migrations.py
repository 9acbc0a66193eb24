"""Migrations: from an empty database to head, the schema is exactly the tables' definitions,
and it downgrades cleanly; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from authgate.store.db import create_engine
from authgate.store.migrate import alembic_config, current_revision, head_revision, upgrade
from authgate.store.tables import metadata
from tests.conftest import new_database


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_url(request, tmp_path):
    async with new_database(request.param, tmp_path) as url:
        yield url


async def test_upgrade_reaches_head_with_no_drift_and_downgrades_to_base(empty_url):
    engine = create_engine(empty_url)
    try:
        await upgrade(engine)
        assert await current_revision(engine) == head_revision() == "0005"
        async with engine.connect() as conn:
            drift = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), metadata))
        assert drift == []
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
        assert await current_revision(engine) is None
        await upgrade(engine)  # and up again
        assert await current_revision(engine) == "0005"
    finally:
        await engine.dispose()
        await asyncio.sleep(0)
