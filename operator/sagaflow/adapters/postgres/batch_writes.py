"""The write side of a transition batch: one statement per table per batch.

Array parameters (`unnest`) turn a batch of decisions into a handful of statements,
because round trips and commits, not Python, bound the orchestrator's throughput.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from sagaflow.core.decisions import Timer
from sagaflow.core.effects import split_item_key
from sagaflow.core.state import ExecutionState, Failure

# Notified when timers change, so the timer loop recomputes when to wake.
TIMERS_CHANNEL = "sagaflow_timers"


async def write_states(
    conn: asyncpg.Connection, finals: dict[str, ExecutionState], now: datetime
) -> None:
    if not finals:
        return
    states = list(finals.values())
    await conn.execute(
        "UPDATE sagaflow_executions e SET state = t.s::jsonb, phase = t.p, revision = t.r, "
        "updated_at = $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
        "AS t(i, s, p, r) WHERE e.execution_id = t.i",
        [s.execution_id for s in states],
        [json.dumps(s.to_json()) for s in states],
        [s.phase.value for s in states],
        [s.revision for s in states],
        now,
    )


async def write_history(
    conn: asyncpg.Connection, rows: list[tuple[Any, ...]], now: datetime
) -> None:
    if not rows:
        return
    cols = list(zip(*rows, strict=True))
    await conn.execute(
        "INSERT INTO sagaflow_history (execution_id, at, kind, step, attempt, message, data) "
        "SELECT i, $7, k, s, a, m, d::jsonb FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::int[], $5::text[], $6::text[]) WITH ORDINALITY AS t(i, k, s, a, m, d, o) "
        "ORDER BY o",
        *[list(c) for c in cols],
        now,
    )


async def write_attempts(
    conn: asyncpg.Connection, rows: dict[tuple[str, str, bool, int], list[Any]]
) -> None:
    """Attempt rows keyed (execution, step, compensation, attempt), each as
    [execution, step, compensation, attempt, status, dispatched, finished, type, message]."""
    if not rows:
        return
    cols = list(zip(*rows.values(), strict=True))
    await conn.execute(
        "INSERT INTO sagaflow_step_attempts (execution_id, step, compensation, attempt, "
        "status, dispatched_at, finished_at, error_type, error_message) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::boolean[], $4::int[], $5::text[], "
        "$6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[]) "
        "ON CONFLICT (execution_id, step, compensation, attempt) DO UPDATE SET "
        "status = excluded.status, finished_at = excluded.finished_at, "
        "error_type = excluded.error_type, error_message = excluded.error_message",
        *[list(c) for c in cols],
    )


async def write_timers(
    conn: asyncpg.Connection, timers: dict[tuple[str, str], Timer | None]
) -> None:
    dropped = [k for k, t in timers.items() if t is None]
    kept = [(k[0], t) for k, t in timers.items() if t is not None]
    if dropped:
        await conn.execute(
            "DELETE FROM sagaflow_timers t USING unnest($1::text[], $2::text[]) AS d(i, k) "
            "WHERE t.execution_id = d.i AND t.key = d.k",
            [k[0] for k in dropped],
            [k[1] for k in dropped],
        )
    if kept:
        await conn.execute(
            "INSERT INTO sagaflow_timers (execution_id, key, kind, step, attempt, due_at) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
            "$5::int[], $6::timestamptz[]) ON CONFLICT (execution_id, key) "
            "DO UPDATE SET due_at = excluded.due_at",
            [e for e, _ in kept],
            [t.key for _, t in kept],
            [t.kind for _, t in kept],
            [t.step for _, t in kept],
            [t.attempt for _, t in kept],
            [t.due_at for _, t in kept],
        )
        await conn.execute("SELECT pg_notify($1, '')", TIMERS_CHANNEL)


async def write_outcomes(conn: asyncpg.Connection, outcomes: list[tuple[str, str]]) -> None:
    if outcomes:
        await conn.execute(
            "UPDATE sagaflow_inbox i SET outcome = t.o FROM unnest($1::text[], $2::text[]) "
            "AS t(m, o) WHERE i.message_id = t.m",
            [m for m, _ in outcomes],
            [o for _, o in outcomes],
        )


# History kinds that start or settle an attempt: (status, whether it is a compensation).
_ATTEMPT_STATUS = {
    "StepDispatched": ("Running", False),
    "StepSucceeded": ("Succeeded", False),
    "StepFailed": ("Failed", False),
    "StepRetrying": ("Failed", False),
    "StepCompensating": ("Running", True),
    "StepCompensated": ("Succeeded", True),
    "StepCompensationFailed": ("Failed", True),
    "StepCompensationRetrying": ("Failed", True),
    # forEach items, under their item keys (`<step>[<index>]`):
    "ItemDispatched": ("Running", False),
    "ItemSucceeded": ("Succeeded", False),
    "ItemFailed": ("Failed", False),
    "ItemRetrying": ("Failed", False),
    "ItemCompensating": ("Running", True),
    "ItemCompensated": ("Succeeded", True),
    "ItemCompensationFailed": ("Failed", True),
    "ItemCompensationRetrying": ("Failed", True),
}


def attempt_row(
    rows: dict[tuple[str, str, bool, int], list[Any]],
    eid: str,
    state: ExecutionState,
    kind: str,
    step: str | None,
    attempt: int | None,
    now: datetime,
) -> None:
    """Fold one history record into the attempt row it starts or settles, if any."""
    found = _ATTEMPT_STATUS.get(kind)
    if found is None or step is None or attempt is None:
        return
    status, undo = found
    key = (eid, step, undo, attempt)
    row = rows.setdefault(key, [eid, step, undo, attempt, status, now, None, None, None])
    row[4] = status
    if status != "Running":
        error = _attempt_error(state, step, undo)
        failed = error is not None and status == "Failed"
        row[6] = now
        row[7] = error.type if failed and error else None
        row[8] = error.message if failed and error else None


def _attempt_error(state: ExecutionState, step: str, undo: bool) -> Failure | None:
    """The error an attempt of `step` (a step name or an item key) settled with."""
    name, index = split_item_key(step)
    settled = state.steps[name]
    if index is not None and settled.items is not None:
        item = settled.items.entries[index]
        return item.undo_error if undo else item.error
    return settled.undo.error if undo and settled.undo else settled.error
