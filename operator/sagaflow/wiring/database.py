"""Open the state database: the embedded Postgres of a state dir, or SAGAFLOW_DATABASE_URL.

Migrations run on every open (they are forward-only, idempotent and serialised
by an advisory lock), so any command may be the first to touch a database. An
external database that is not answering yet (a pod starting before its Postgres, a
server restarting) is waited for, with one log line, rather than failing the start.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class GaveUpWaiting(Exception):
    """The caller was told to stop while it waited for the database to answer."""


@asynccontextmanager
async def open_database(
    settings: Settings,
    state_dir: Path,
    pool_size: int = 8,
    give_up: asyncio.Event | None = None,
) -> AsyncIterator[Database]:
    """The migrated database; while it does not answer, wait (GaveUpWaiting once
    `give_up` is set: a command told to stop must not wait for ever)."""
    server: EmbeddedPostgres | None = None
    if settings.database_url:
        dsn = settings.database_url
    else:
        server = EmbeddedPostgres(state_dir / "postgres")
        dsn = await asyncio.to_thread(server.start)
    try:
        # min_size=0: connections are made when needed. A pool with a floor tries to
        # restore it on its own during an outage, logging a traceback every time.
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=pool_size)
        try:
            await _migrate_when_answering(pool, give_up)
            yield Database(dsn=dsn, pool=pool, embedded=server is not None)
        finally:
            await pool.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _migrate_when_answering(pool: asyncpg.Pool, give_up: asyncio.Event | None) -> None:
    delay, waiting = 0.1, False
    while True:
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            return
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            if not waiting:
                waiting = True
                log.warning("the database is not answering (%s); waiting for it", describe(exc))
        stop = give_up or asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            raise GaveUpWaiting("stopped while waiting for the database")
        delay = min(delay * 2, 2.0)
