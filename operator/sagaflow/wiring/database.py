"""Open the state database: the embedded Postgres of a state dir, or SAGAFLOW_DATABASE_URL.

Migrations run on every open (they are forward-only, idempotent and serialised
by an advisory lock), so any command may be the first to touch a database. An
external database that is not answering yet (a pod starting before its Postgres, a
server restarting) is waited for, with one log line, rather than failing the start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from sagaflow.adapters.postgres.embedded import EmbeddedPostgres
from sagaflow.adapters.postgres.errors import database_unavailable
from sagaflow.adapters.postgres.migrate import migrate
from sagaflow.runtime.outages import describe
from sagaflow.settings import Settings

log = logging.getLogger("sagaflow.database")


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
        pool = await _connect(dsn, pool_size)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            yield Database(dsn=dsn, pool=pool, embedded=server is not None)
        finally:
            await pool.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _connect(dsn: str, pool_size: int) -> asyncpg.Pool:
    delay, waiting = 0.1, False
    while True:
        try:
            # min_size=0: connections are made when needed. A pool with a floor tries to
            # restore it on its own during an outage, logging a traceback every time.
            return await asyncpg.create_pool(dsn, min_size=0, max_size=pool_size)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            if not waiting:
                waiting = True
                log.warning("the database is not answering (%s); waiting for it", describe(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
