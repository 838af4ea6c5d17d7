"""The SQL of coordination between executions: concurrency limits and correlation keys.

Apart from `store.py` because it is about many executions of a workflow at once, not
one transition: the advisory lock that serialises admission per (namespace, workflow),
the count of executions holding a slot, the queue of waiting ones, and the lookups by
correlation key. The schema is `migrations/0006_coordination.sql`; the predicates
here repeat its partial indexes' literally, so the planner can use them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sagaflow.core.admission import FREE_PHASES
from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.state import ExecutionState

# Advisory locks of two int4 keys live apart from those of one bigint (the migrations'
# lock): (this class, hashtext('<namespace>/<workflow>')).
ADMISSION_LOCK_CLASS = 0x53664164  # "SfAd"


def _not_in(phases: Iterable[ExecutionPhase]) -> str:
    return "phase NOT IN (" + ", ".join(f"'{p.value}'" for p in phases) + ")"


# The migration spells its index predicates the same way (a test holds them together).
HOLDS_SLOT = _not_in(FREE_PHASES)
UNFINISHED = _not_in(p for p in ExecutionPhase if p.is_terminal)


@dataclass(frozen=True, slots=True)
class Queued:
    """A waiting execution taken off the queue: its state, and whether it starts suspended."""

    state: ExecutionState
    suspend: bool


async def lock_workflows(conn: asyncpg.Connection, keys: Iterable[tuple[str, str]]) -> None:
    """Take the admission locks of these (namespace, workflow) keys until the transaction
    ends, in key order: two transactions that need several never wait on each other in
    a circle."""
    wanted = sorted(set(keys))
    if not wanted:
        return
    # The subquery is sorted and never flattened (DISTINCT), so the locks go in order.
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, h) FROM (SELECT DISTINCT hashtext(ns || '/' || w) "
        "AS h FROM unnest($2::text[], $3::text[]) AS k(ns, w) ORDER BY h) AS o",
        ADMISSION_LOCK_CLASS,
        [k[0] for k in wanted],
        [k[1] for k in wanted],
    )


async def running_count(conn: asyncpg.Connection, namespace: str, workflow: str) -> int:
    """Executions of the workflow holding a slot (started, not finished)."""
    value = await conn.fetchval(
        f"SELECT count(*) FROM sagaflow_executions WHERE namespace=$1 AND workflow=$2 "
        f"AND {HOLDS_SLOT}",
        namespace,
        workflow,
    )
    return int(value)


async def phases(conn: asyncpg.Connection, execution_ids: Sequence[str]) -> dict[str, str]:
    """The phases these executions have in the database (before this transaction saves)."""
    rows = await conn.fetch(
        "SELECT execution_id, phase FROM sagaflow_executions WHERE execution_id = ANY($1::text[])",
        list(execution_ids),
    )
    return {r["execution_id"]: r["phase"] for r in rows}


async def enqueue(
    conn: asyncpg.Connection, rows: Sequence[tuple[str, str, str, bool]], now: datetime
) -> None:
    """Put (execution id, namespace, workflow, suspend) at the end of their queues, in order."""
    if not rows:
        return
    cols = list(zip(*rows, strict=True))
    await conn.execute(
        "INSERT INTO sagaflow_admission_queue (execution_id, namespace, workflow, suspend, "
        "queued_at) SELECT i, ns, w, s, $5 FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::boolean[]) WITH ORDINALITY AS t(i, ns, w, s, o) ORDER BY o",
        *[list(c) for c in cols],
        now,
    )


async def take_waiting(
    conn: asyncpg.Connection, namespace: str, workflow: str, limit: int
) -> list[Queued]:
    """Take the first `limit` rows off a workflow's queue, oldest first, and lock their
    executions. Executions locked by another transaction (a cancel in progress) are
    stepped over and stay queued; those no longer Pending (cancelled while waiting)
    come back too, for the caller to drop. Call holding the workflow's lock."""
    rows = await conn.fetch(
        "WITH head AS (SELECT q.seq, q.execution_id, q.suspend, e.state "
        "FROM sagaflow_admission_queue q JOIN sagaflow_executions e "
        "ON e.execution_id = q.execution_id WHERE q.namespace=$1 AND q.workflow=$2 "
        "ORDER BY q.seq LIMIT $3 FOR UPDATE OF e SKIP LOCKED), "
        "gone AS (DELETE FROM sagaflow_admission_queue q USING head h "
        "WHERE q.execution_id = h.execution_id) "
        "SELECT suspend, state FROM head ORDER BY seq",
        namespace,
        workflow,
        limit,
    )
    return [Queued(ExecutionState.from_json(json.loads(r["state"])), r["suspend"]) for r in rows]


async def queued_workflows(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """The (namespace, workflow) keys with executions waiting."""
    rows = await conn.fetch("SELECT DISTINCT namespace, workflow FROM sagaflow_admission_queue")
    return sorted((r["namespace"], r["workflow"]) for r in rows)


async def head_version(conn: asyncpg.Connection, namespace: str, workflow: str) -> int | None:
    """The workflow version the oldest waiting execution is pinned to."""
    value = await conn.fetchval(
        "SELECT e.workflow_version FROM sagaflow_admission_queue q JOIN sagaflow_executions e "
        "ON e.execution_id = q.execution_id WHERE q.namespace=$1 AND q.workflow=$2 "
        "ORDER BY q.seq LIMIT 1",
        namespace,
        workflow,
    )
    return None if value is None else int(value)


# -- correlation keys ------------------------------------------------------------------
async def key_holders(
    conn: asyncpg.Connection, keys: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str, str], ExecutionState]:
    """The unfinished executions holding these (namespace, workflow, key) keys, by key."""
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT e.state FROM unnest($1::text[], $2::text[], $3::text[]) AS k(ns, w, c) "
        "JOIN sagaflow_executions e ON e.namespace = k.ns AND e.workflow = k.w "
        f"AND e.correlation_key = k.c WHERE e.correlation_key IS NOT NULL AND e.{UNFINISHED}",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )
    states = [ExecutionState.from_json(json.loads(r["state"])) for r in rows]
    return {(s.namespace, s.workflow, s.correlation_key or ""): s for s in states}


async def release_keys(conn: asyncpg.Connection, execution_ids: Sequence[str]) -> None:
    """Finished executions give up their correlation keys (in the finishing transaction)."""
    if execution_ids:
        await conn.execute(
            "UPDATE sagaflow_executions SET correlation_key = NULL "
            "WHERE execution_id = ANY($1::text[]) AND correlation_key IS NOT NULL",
            list(execution_ids),
        )
