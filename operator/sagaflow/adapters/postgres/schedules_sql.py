"""SQL of the Schedules' rows (`migrations/0009_schedules.sql`).

A row is what the pure core keeps about a schedule between passes (`ScheduleState`)
beside its spec and counts. Reads that lead to a pass lock the row and skip rows
another replica holds; a put waits for such a pass instead, so a changed spec never
overwrites the cursor a pass is about to store. A put under another uid than the
row's (the Schedule was deleted and created again) starts the counts from zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sagaflow.core.schedules import ScheduleRef, ScheduleState
from sagaflow.core.trigger_specs import ScheduleSpec

COUNTS = ("started", "skipped", "missed", "failed")

_COLUMNS = (
    "namespace, name, uid, spec::text AS spec, created_at, cursor, buffered_tick, "
    f"{', '.join(COUNTS)}, last_schedule_time, next_schedule_time"
)

# Due: its next tick has come, or a tick waits for a run to finish (BufferOne).
_DUE = "(next_schedule_time <= $1 OR buffered_tick IS NOT NULL)"


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    ref: ScheduleRef
    spec: ScheduleSpec
    state: ScheduleState
    started: int = 0
    skipped: int = 0
    missed: int = 0
    failed: int = 0
    last_schedule_time: datetime | None = None
    next_schedule_time: datetime | None = None


def _row(record: asyncpg.Record) -> ScheduleRow:
    return ScheduleRow(
        ScheduleRef(record["namespace"], record["name"], record["uid"]),
        ScheduleSpec.model_validate(json.loads(record["spec"])),
        ScheduleState(record["created_at"], record["cursor"], record["buffered_tick"]),
        started=int(record["started"]),
        skipped=int(record["skipped"]),
        missed=int(record["missed"]),
        failed=int(record["failed"]),
        last_schedule_time=record["last_schedule_time"],
        next_schedule_time=record["next_schedule_time"],
    )


async def load(conn: asyncpg.Connection, namespace: str, name: str) -> ScheduleRow | None:
    """The row, locked until the transaction ends (waiting for a pass that holds it)."""
    record = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sagaflow_schedules WHERE namespace = $1 AND name = $2 FOR UPDATE",
        namespace,
        name,
    )
    return None if record is None else _row(record)


async def upsert(
    conn: asyncpg.Connection,
    ref: ScheduleRef,
    spec: ScheduleSpec,
    state: ScheduleState,
    next_time: datetime | None,
    now: datetime,
) -> None:
    """Write the row; under a new uid the counts and the last tick start afresh."""
    fresh = ", ".join(f"{c} = CASE WHEN t.uid = EXCLUDED.uid THEN t.{c} ELSE 0 END" for c in COUNTS)
    await conn.execute(
        "INSERT INTO sagaflow_schedules AS t (namespace, name, uid, spec, created_at, cursor, "
        "buffered_tick, next_schedule_time, updated_at) "
        "VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9) "
        "ON CONFLICT (namespace, name) DO UPDATE SET "
        f"{fresh}, last_schedule_time = CASE WHEN t.uid = EXCLUDED.uid "
        "THEN t.last_schedule_time END, uid = EXCLUDED.uid, spec = EXCLUDED.spec, "
        "created_at = EXCLUDED.created_at, cursor = EXCLUDED.cursor, "
        "buffered_tick = EXCLUDED.buffered_tick, "
        "next_schedule_time = EXCLUDED.next_schedule_time, updated_at = EXCLUDED.updated_at",
        ref.namespace,
        ref.name,
        ref.uid,
        json.dumps(spec.model_dump(mode="json", by_alias=True)),
        state.anchor,
        state.cursor,
        state.buffered,
        next_time,
        now,
    )


async def due(
    pool: asyncpg.Pool, now: datetime, limit: int, after: tuple[str, str] = ("", "")
) -> list[tuple[str, str]]:
    """(namespace, name) of rows due at `now`, in key order after `after`: a pass
    pages through them and visits each once."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT namespace, name FROM sagaflow_schedules WHERE {_DUE} "
            "AND (namespace, name) > ($2, $3) ORDER BY namespace, name LIMIT $4",
            now,
            after[0],
            after[1],
            limit,
        )
    return [(r["namespace"], r["name"]) for r in rows]


async def lock_due(
    conn: asyncpg.Connection, namespace: str, name: str, now: datetime
) -> ScheduleRow | None:
    """The row if it is still due and no other pass holds it; locked until commit."""
    record = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sagaflow_schedules WHERE namespace = $2 AND name = $3 "
        f"AND {_DUE} FOR UPDATE SKIP LOCKED",
        now,
        namespace,
        name,
    )
    return None if record is None else _row(record)


async def advance(
    conn: asyncpg.Connection,
    ref: ScheduleRef,
    state: ScheduleState,
    next_time: datetime | None,
    added: dict[str, int],
    last: datetime | None,
    now: datetime,
) -> None:
    """Store a pass: the new cursor and waiting tick, the counts added, the last start."""
    values = [int(added.get(c, 0)) for c in COUNTS]
    await conn.execute(
        "UPDATE sagaflow_schedules SET cursor = $3, buffered_tick = $4, "
        "next_schedule_time = $5, "
        f"{', '.join(f'{c} = {c} + ${i + 6}' for i, c in enumerate(COUNTS))}, "
        "last_schedule_time = greatest(last_schedule_time, $10), updated_at = $11 "
        "WHERE namespace = $1 AND name = $2 AND uid = $12",
        ref.namespace,
        ref.name,
        state.cursor,
        state.buffered,
        next_time,
        *values,
        last,
        now,
        ref.uid,
    )


async def delete(pool: asyncpg.Pool, namespace: str, name: str) -> bool:
    """Drop the row; whether there was one."""
    async with pool.acquire() as conn:
        done = await conn.execute(
            "DELETE FROM sagaflow_schedules WHERE namespace = $1 AND name = $2", namespace, name
        )
    return bool(done != "DELETE 0")


async def rows(pool: asyncpg.Pool, namespace: str | None = None) -> list[ScheduleRow]:
    """Every row of `namespace` (all namespaces when None), by namespace and name."""
    async with pool.acquire() as conn:
        records = await conn.fetch(
            f"SELECT {_COLUMNS} FROM sagaflow_schedules "
            "WHERE $1::text IS NULL OR namespace = $1 ORDER BY namespace, name",
            namespace,
        )
    return [_row(r) for r in records]


async def next_due(pool: asyncpg.Pool) -> datetime | None:
    """When the next row falls due (None when none has a next tick)."""
    async with pool.acquire() as conn:
        found: datetime | None = await conn.fetchval(
            "SELECT min(next_schedule_time) FROM sagaflow_schedules"
        )
    return found
