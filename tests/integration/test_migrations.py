"""Schema migrations: applied once, in order, safely from concurrent processes."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest

from sagaflow.adapters.postgres.migrate import Migration, MigrationError, load_migrations, migrate

pytestmark = pytest.mark.timeout(60)


async def _recorded(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM sagaflow_schema_migrations ORDER BY 1")
    return [(r["version"], r["name"]) for r in rows]


def test_packaged_migrations_are_numbered_from_one() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions[0] == 1
    assert versions == sorted(set(versions))
    assert load_migrations()[0].name == "bus"


async def test_migrates_an_empty_database(pg_empty_database: str) -> None:
    conn = await asyncpg.connect(pg_empty_database)
    try:
        applied = await migrate(conn)
        assert applied == [m.version for m in load_migrations()]
        assert await _recorded(conn) == [(m.version, m.name) for m in load_migrations()]
        assert await conn.fetchval("SELECT to_regclass('bus_messages') IS NOT NULL")
    finally:
        await conn.close()


async def test_migrating_twice_applies_nothing_the_second_time(pg_empty_database: str) -> None:
    conn = await asyncpg.connect(pg_empty_database)
    try:
        await migrate(conn)
        before = await _recorded(conn)
        assert await migrate(conn) == []
        assert await _recorded(conn) == before
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_version_exactly_once(
    pg_empty_database: str,
) -> None:
    conns = [await asyncpg.connect(pg_empty_database) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(v for result in results for v in result)
        assert applied == [m.version for m in load_migrations()]
        assert len(await _recorded(conns[0])) == len(applied)
    finally:
        for conn in conns:
            await conn.close()


async def test_an_applied_migration_under_another_name_raises(pg_empty_database: str) -> None:
    conn = await asyncpg.connect(pg_empty_database)
    try:
        await migrate(conn)
        renamed = [replace(m, name="renamed") if m.version == 1 else m for m in load_migrations()]
        with pytest.raises(MigrationError, match="0001 was applied as 'bus'"):
            await migrate(conn, renamed)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(pg_empty_database: str) -> None:
    conn = await asyncpg.connect(pg_empty_database)
    try:
        broken = Migration(9001, "broken", "CREATE TABLE half_done (x int); SELECT 1 / 0;")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(conn, [*load_migrations(), broken])
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert 9001 not in dict(await _recorded(conn))
        # The earlier migrations committed in their own transactions, and the lock is free.
        assert await migrate(conn) == []
    finally:
        await conn.close()
