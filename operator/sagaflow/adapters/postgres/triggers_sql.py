"""SQL of the Triggers' counts (`migrations/0010_triggers.sql`).

One row per Trigger, added to once per batch of events rather than once per event,
so a busy queue costs one statement per receive. A count under another uid than the
row's (the Trigger was deleted and created again under its name) restarts the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import asyncpg

from sagaflow.core.trigger_specs import TriggerStatus

# The counted outcomes, as columns (TriggerStatus's fields, snake case).
COUNTS = ("started", "signalled", "filtered", "duplicates", "dead_lettered")

_ADD = f"""
INSERT INTO sagaflow_trigger_counts AS t
    (namespace, name, uid, {", ".join(COUNTS)}, last_event_time)
VALUES ($1, $2, $3, {", ".join(f"${i + 4}" for i in range(len(COUNTS)))}, $9)
ON CONFLICT (namespace, name) DO UPDATE SET
    {
    ", ".join(
        f"{c} = CASE WHEN t.uid = EXCLUDED.uid THEN t.{c} ELSE 0 END + EXCLUDED.{c}" for c in COUNTS
    )
},
    last_event_time = CASE WHEN t.uid = EXCLUDED.uid
        THEN greatest(t.last_event_time, EXCLUDED.last_event_time)
        ELSE EXCLUDED.last_event_time END,
    uid = EXCLUDED.uid
"""


async def add(
    pool: asyncpg.Pool,
    namespace: str,
    name: str,
    uid: str,
    counts: Mapping[str, int],
    at: datetime,
) -> None:
    """Add `counts` (keys from COUNTS) to the Trigger's row; `at` is its last event."""
    unknown = set(counts) - set(COUNTS)
    if unknown:
        raise ValueError(f"unknown trigger counts {sorted(unknown)}")
    values = [int(counts.get(c, 0)) for c in COUNTS]
    async with pool.acquire() as conn:
        await conn.execute(_ADD, namespace, name, uid, *values, at)


async def read(
    pool: asyncpg.Pool, keys: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str], TriggerStatus]:
    """The status of each (namespace, name, uid) that has a row under that uid."""
    if not keys:
        return {}
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT t.namespace, t.name, {', '.join(COUNTS)}, last_event_time "
            "FROM sagaflow_trigger_counts t JOIN unnest($1::text[], $2::text[], $3::text[]) "
            "AS k(namespace, name, uid) USING (namespace, name, uid)",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
    found = {}
    for row in rows:
        at = row["last_event_time"]
        found[(row["namespace"], row["name"])] = TriggerStatus(
            **{c: int(row[c]) for c in COUNTS},
            last_event_time=None if at is None else at.isoformat(),
        )
    return found


async def forget(pool: asyncpg.Pool, namespace: str, name: str, uid: str) -> None:
    """Drop the row of a deleted Trigger (only under its uid: a newer one keeps its own)."""
    async with pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM sagaflow_trigger_counts WHERE namespace = $1 AND name = $2 AND uid = $3",
            namespace,
            name,
            uid,
        )
