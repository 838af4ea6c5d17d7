"""SQL of the operator's bookkeeping for executions that belong to Kubernetes objects.

Owns `sagaflow_kube_executions` (one row per object-backed execution: its TTL and
how far its state and history have been written back to the object) and the
release of an execution's name when its object is deleted. Kept apart from the
transition store because none of it is on the transition path: the mirror locks
these rows, never the execution rows, so writing to Kubernetes cannot hold up a
transition.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.state import ExecutionState

_TERMINAL = [p.value for p in ExecutionPhase if p.is_terminal]


@dataclass(frozen=True, slots=True)
class Pending:
    """An execution whose object lags behind Postgres, locked for this mirror."""

    execution_id: str
    namespace: str
    name: str
    state: ExecutionState
    event_seq: int


@dataclass(frozen=True, slots=True)
class HistoryRow:
    seq: int
    at: datetime
    kind: str
    step: str | None
    attempt: int | None
    message: str


async def track(
    conn: asyncpg.Connection,
    execution_id: str,
    namespace: str,
    name: str,
    ttl_seconds: int | None,
) -> None:
    """Start mirroring an execution into its object (idempotent; the TTL may change)."""
    await conn.execute(
        "INSERT INTO sagaflow_kube_executions (execution_id, namespace, name, ttl_seconds) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (execution_id) "
        "DO UPDATE SET ttl_seconds = excluded.ttl_seconds",
        execution_id,
        namespace,
        name,
        ttl_seconds,
    )


async def lock_pending(conn: asyncpg.Connection, limit: int) -> list[Pending]:
    """Lock up to `limit` live executions whose state is newer than their object's.

    Call inside a transaction. Rows another mirror holds are skipped (several
    operator replicas mirror side by side without writing one object twice).
    """
    rows = await conn.fetch(
        "SELECT k.execution_id, k.namespace, k.name, k.event_seq, e.state "
        "FROM sagaflow_kube_executions k JOIN sagaflow_executions e USING (execution_id) "
        "WHERE k.released_at IS NULL AND e.revision > k.mirrored_revision "
        "ORDER BY e.updated_at LIMIT $1 FOR UPDATE OF k SKIP LOCKED",
        limit,
    )
    return [
        Pending(
            r["execution_id"],
            r["namespace"],
            r["name"],
            ExecutionState.from_json(json.loads(r["state"])),
            r["event_seq"],
        )
        for r in rows
    ]


async def history_after(
    conn: asyncpg.Connection, execution_id: str, seq: int, limit: int
) -> list[HistoryRow]:
    """History rows after `seq`, oldest first: the transitions not yet posted as Events.
    Transition rows are replay records (`core/replay.py`), never Events: left out here
    so they take no share of a pass."""
    rows = await conn.fetch(
        "SELECT seq, at, kind, step, attempt, message FROM sagaflow_history "
        "WHERE execution_id = $1 AND seq > $2 AND kind <> 'Transition' ORDER BY seq LIMIT $3",
        execution_id,
        seq,
        limit,
    )
    return [
        HistoryRow(r["seq"], r["at"], r["kind"], r["step"], r["attempt"], r["message"])
        for r in rows
    ]


async def advance(
    conn: asyncpg.Connection, execution_id: str, revision: int, event_seq: int
) -> None:
    """Record that the object shows `revision` and Events up to history row `event_seq`."""
    await conn.execute(
        "UPDATE sagaflow_kube_executions SET mirrored_revision = greatest(mirrored_revision, $2),"
        " event_seq = greatest(event_seq, $3) WHERE execution_id = $1",
        execution_id,
        revision,
        event_seq,
    )


async def release(conn: asyncpg.Connection, execution_id: str, now: datetime) -> None:
    """The object is gone: free the execution's name and stop mirroring. History stays."""
    await conn.execute(
        "UPDATE sagaflow_executions SET released_at = $2 "
        "WHERE execution_id = $1 AND released_at IS NULL",
        execution_id,
        now,
    )
    await conn.execute(
        "UPDATE sagaflow_kube_executions SET released_at = $2 "
        "WHERE execution_id = $1 AND released_at IS NULL",
        execution_id,
        now,
    )


async def live_holder(conn: asyncpg.Connection, namespace: str, name: str) -> str | None:
    """The id of the live execution holding a name, if any."""
    holder: str | None = await conn.fetchval(
        "SELECT execution_id FROM sagaflow_executions "
        "WHERE namespace = $1 AND name = $2 AND released_at IS NULL",
        namespace,
        name,
    )
    return holder


async def expired(conn: asyncpg.Connection, now: datetime, limit: int) -> Sequence[asyncpg.Record]:
    """Live object-backed executions finished more than their TTL ago."""
    return list(
        await conn.fetch(
            "SELECT k.execution_id, k.namespace, k.name "
            "FROM sagaflow_kube_executions k JOIN sagaflow_executions e USING (execution_id) "
            "WHERE k.released_at IS NULL AND k.ttl_seconds IS NOT NULL "
            "AND e.phase = ANY($3::text[]) "
            "AND (e.state->>'finishedAt')::timestamptz "
            "+ make_interval(secs => k.ttl_seconds) <= $1 "
            "ORDER BY k.execution_id LIMIT $2",
            now,
            limit,
            _TERMINAL,
        )
    )


async def workflow_ttl(
    conn: asyncpg.Connection, namespace: str, workflow: str, version: int
) -> int | None:
    """The `ttlSecondsAfterFinished` default of a stored workflow version."""
    value = await conn.fetchval(
        "SELECT (spec->>'ttlSecondsAfterFinished')::integer FROM sagaflow_workflow_versions "
        "WHERE namespace = $1 AND name = $2 AND version = $3",
        namespace,
        workflow,
        version,
    )
    return None if value is None else int(value)


@dataclass(frozen=True, slots=True)
class Child:
    """A child execution whose parent has an object, but which has none yet."""

    execution_id: str
    namespace: str
    name: str
    workflow: str
    input: dict[str, Any]
    parent_name: str


async def unmaterialized_children(conn: asyncpg.Connection, limit: int) -> list[Child]:
    """Children of object-backed, unreleased parents that have no object yet."""
    rows = await conn.fetch(
        "SELECT c.execution_id, e.namespace, e.name, e.workflow, e.state->'input' AS input, "
        "p.name AS parent_name FROM sagaflow_children c "
        "JOIN sagaflow_executions e USING (execution_id) "
        "JOIN sagaflow_kube_executions p ON p.execution_id = c.parent_id "
        "AND p.released_at IS NULL "
        "WHERE NOT c.materialized ORDER BY c.created_at LIMIT $1",
        limit,
    )
    return [
        Child(
            r["execution_id"],
            r["namespace"],
            r["name"],
            r["workflow"],
            json.loads(r["input"]),
            r["parent_name"],
        )
        for r in rows
    ]


async def materialized(conn: asyncpg.Connection, execution_id: str) -> None:
    await conn.execute(
        "UPDATE sagaflow_children SET materialized = true WHERE execution_id = $1", execution_id
    )
