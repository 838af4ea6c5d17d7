"""Retention SQL: find finished executions past a cut-off and delete all their rows.

Owns the statements `sagaflow prune` runs, kept apart from the transition store
(`store.py`) because they are maintenance: they run rarely, touch many rows, and
must never slow the hot path (they take row locks with SKIP LOCKED, so a replica
applying a late result to one of these executions is never waited on).

An execution is finished when its phase is Completed, Failed or Cancelled; its
finish time is `finishedAt` in the state document (the row's `updated_at` moves
when a late result is still recorded on a finished execution). Its rows are the
execution itself and, by execution id, history, step attempts, inbox records,
timers and the operator's mirror cursor. Messages still on the bus are the bus's:
the orchestrator ignores events of executions it does not know, so they need no
clean-up here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sagaflow.core.manifests import ExecutionPhase

FINISHED_PHASES = tuple(p.value for p in ExecutionPhase if p.is_terminal)


@dataclass(frozen=True, slots=True)
class Deleted:
    """Rows deleted, per table."""

    executions: int = 0
    history: int = 0
    attempts: int = 0
    inbox: int = 0
    timers: int = 0

    def __add__(self, other: Deleted) -> Deleted:
        return Deleted(
            self.executions + other.executions,
            self.history + other.history,
            self.attempts + other.attempts,
            self.inbox + other.inbox,
            self.timers + other.timers,
        )


async def lock_finished(conn: asyncpg.Connection, before: datetime, limit: int) -> list[str]:
    """Lock and return up to `limit` ids of executions that finished before `before`.

    Call inside a transaction; rows another transaction holds are skipped, not
    waited for (a later prune takes them).
    """
    rows = await conn.fetch(
        "SELECT execution_id FROM sagaflow_executions "
        "WHERE phase = ANY($1::text[]) "
        "AND coalesce((state->>'finishedAt')::timestamptz, updated_at) < $2 "
        "ORDER BY execution_id LIMIT $3 FOR UPDATE SKIP LOCKED",
        list(FINISHED_PHASES),
        before,
        limit,
    )
    return [r["execution_id"] for r in rows]


async def delete_executions(conn: asyncpg.Connection, ids: Sequence[str]) -> Deleted:
    """Delete the executions `ids` and every row that belongs to them.

    Call inside the transaction that locked them. The inbox has no index on the
    execution id, so its delete scans the table once per call: callers batch ids.
    """
    if not ids:
        return Deleted()
    wanted = list(ids)
    counts = []
    for table in (
        "sagaflow_history",
        "sagaflow_step_attempts",
        "sagaflow_inbox",
        "sagaflow_timers",
        "sagaflow_kube_executions",
        "sagaflow_executions",
    ):
        status = await conn.execute(
            f"DELETE FROM {table} WHERE execution_id = ANY($1::text[])", wanted
        )
        counts.append(_count(status))
    history, attempts, inbox, timers, _mirror, executions = counts
    return Deleted(executions, history, attempts, inbox, timers)


def _count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "DELETE 42".
    return int(status.rsplit(" ", 1)[-1])
