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
        assert await current_revision(engine) == head_revision() == "0007"
        async with engine.connect() as conn:
            drift = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), metadata))
        assert drift == []
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
        assert await current_revision(engine) is None
        await upgrade(engine)  # and up again
        assert await current_revision(engine) == "0007"
    finally:
        await engine.dispose()
        await asyncio.sleep(0)


async def test_sessions_granted_only_openid_keep_the_claims_they_showed(empty_url):
    """0006: before scopes decided the claims shown, ``openid`` (the default grant) showed
    them all; such sessions now hold the grant that shows them."""
    from datetime import UTC, datetime, timedelta

    from authgate.store import tables as t

    engine = create_engine(empty_url)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0005"))
        async with engine.begin() as conn:
            await conn.execute(t.realms.insert().values(
                id="r1", name="r1", display_name="r1", project_id="P1", settings={},
                created_at=now))
            await conn.execute(t.users.insert().values(
                id="u1", realm_id="r1", email_verified=False, phone_verified=False,
                custom_attributes={}, roles=[], status="active", is_anonymous=False,
                created_at=now, updated_at=now, security_stamp=""))
            for sid, scope in (("s1", "openid"), ("s2", "openid email"), ("s3", None)):
                await conn.execute(t.sessions.insert().values(
                    id=sid, realm_id="r1", user_id="u1", amr=["pwd"], created_at=now,
                    last_used_at=now, expires_at=now + timedelta(days=1), scope=scope))
        await upgrade(engine)
        async with engine.connect() as conn:
            rows = (await conn.execute(t.sessions.select().order_by(t.sessions.c.id))).all()
        assert [row.scope for row in rows] == ["openid profile email phone", "openid email",
                                                None]
    finally:
        await engine.dispose()
        await asyncio.sleep(0)


async def test_refresh_token_pages_keep_room_for_the_rotations_update(tmp_path):
    """0007, PostgreSQL: a rotated token's new version can stay on its page (fillfactor), and
    a downgrade takes the setting away."""
    from sqlalchemy import text

    async with new_database("postgres", tmp_path) as url:
        engine = create_engine(url)

        async def options() -> list[str] | None:
            async with engine.connect() as conn:
                return (await conn.execute(text(
                    "SELECT reloptions FROM pg_class WHERE relname = 'refresh_tokens'"))).scalar()

        try:
            await upgrade(engine)
            assert await options() == ["fillfactor=60"]
            async with engine.begin() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0006"))
            assert await options() is None
        finally:
            await engine.dispose()
            await asyncio.sleep(0)
