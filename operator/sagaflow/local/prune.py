"""`sagaflow prune`: delete finished executions older than a duration, and their payloads.

Retention for a state database that otherwise only grows: executions that are
Completed, Failed or Cancelled and finished more than `--older-than` ago go, with
their history, step attempts, inbox records and timers, and every payload stored
under their execution id. Running executions are never touched.

Works in batches, each one transaction: lock a batch of finished executions
(SKIP LOCKED), delete their payloads, then their rows, commit. A failure leaves
earlier batches done and the current one intact (its payloads may be partly gone,
which is harmless for an execution about to be deleted); running prune again
finishes the job. Payloads go before rows so that no payload is ever left without
a row that leads to it.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

import asyncpg

from sagaflow.adapters.postgres import retention
from sagaflow.core.durations import parse_duration
from sagaflow.core.ports import Clock, PayloadError, PayloadStore, utc_now
from sagaflow.local.inputs import InvalidInputError
from sagaflow.settings import Settings
from sagaflow.wiring.database import open_database
from sagaflow.wiring.payloads import make_payload_store

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
BATCH = 500


async def run_prune(
    older_than: str,
    state_dir: Path,
    settings: Settings,
    *,
    clock: Clock = utc_now,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    try:
        seconds = parse_duration(older_than)
        before = clock() - timedelta(seconds=seconds)
        store = make_payload_store(settings, state_dir)
    except (ValueError, OverflowError) as exc:
        print(f"error: --older-than {older_than}: {exc}", file=err)
        return EXIT_INVALID
    except InvalidInputError as exc:
        print(f"error: {exc.problems[0]}", file=err)
        return EXIT_INVALID
    try:
        if not settings.database_url and not (state_dir / "postgres").exists():
            # Opening would create an empty embedded database just to find nothing.
            print(f"nothing to prune: no state in {state_dir}", file=out)
            return EXIT_OK
        async with open_database(settings, state_dir) as db:
            deleted, payloads = await prune(db.pool, store, before)
    except PayloadError as exc:
        print(f"error: {exc}; executions of that batch were kept, run prune again", file=err)
        return EXIT_FAILED
    finally:
        await store.close()
    print(
        f"pruned {deleted.executions} executions finished before {before.isoformat()}: "
        f"{deleted.history} history rows, {deleted.attempts} step attempts, "
        f"{deleted.inbox} inbox records, {deleted.timers} timers, {payloads} payloads",
        file=out,
    )
    return EXIT_OK


async def prune(
    pool: asyncpg.Pool, store: PayloadStore, before: datetime, batch: int = BATCH
) -> tuple[retention.Deleted, int]:
    """Delete finished executions that finished before `before`; (rows, payloads) deleted."""
    total, payloads = retention.Deleted(), 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            ids = await retention.lock_finished(conn, before, batch)
            for execution_id in ids:
                # The trailing '/' keeps execution "ab" from matching "abc".
                payloads += await store.delete_prefix(f"{execution_id}/")
            total += await retention.delete_executions(conn, ids)
        if len(ids) < batch:
            return total, payloads
