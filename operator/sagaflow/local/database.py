"""Open the state database: the embedded Postgres of a state dir, or SAGAFLOW_DATABASE_URL.

Migrations run on every open (they are forward-only, idempotent and serialised
by an advisory lock), so any command may be the first to touch a database.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from sagaflow.adapters.postgres.embedded import EmbeddedPostgres
from sagaflow.adapters.postgres.migrate import migrate
from sagaflow.settings import Settings


@dataclass(frozen=True)
class Database:
    dsn: str
    pool: asyncpg.Pool
    embedded: bool


@asynccontextmanager
async def open_database(
    settings: Settings, state_dir: Path, pool_size: int = 8
) -> AsyncIterator[Database]:
    server: EmbeddedPostgres | None = None
    if settings.database_url:
        dsn = settings.database_url
    else:
        server = EmbeddedPostgres(state_dir / "postgres")
        dsn = await asyncio.to_thread(server.start)
    try:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=pool_size)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            yield Database(dsn=dsn, pool=pool, embedded=server is not None)
        finally:
            await pool.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
