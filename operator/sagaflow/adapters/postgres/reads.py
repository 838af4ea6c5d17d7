"""Read-only queries for people and for the runner host: progress, listings, attempts.

Kept apart from the transition store (`store.py`) because none of it takes a lock or
changes state, and because `sagaflow run` polls it while thousands of executions
run: every query here is bounded by what it returns (counts, one page, the running
few), never by decoding every execution of a run on every pass.

`RunView` is one run's executions as the database sees them: their ids live in a
temporary table on a connection of its own, so a look at a run of 10,000 sends no
list of 10,000 ids. A lost connection (a restart) is re-made on the next look.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.messages import COMMANDS_QUEUE_PREFIX, commands_queue, parse_attempt_id
from sagaflow.core.state import ExecutionState

# At rest: nothing happens until someone acts (`ExecutionState.at_rest`). A suspended
# execution is at rest once no step or compensation of it is in flight; a finished one
# once its `finally` steps are done.
_AT_REST = (
    "((e.phase = ANY($1::text[]) AND coalesce(e.state->>'finalizing', '') <> 'running') "
    "OR (e.phase = 'Suspended' "
    """AND NOT e.state->'steps' @> '[{"phase": "Running"}]' """
    """AND NOT e.state->'steps' @> '[{"undo": {"status": "running"}}]'))"""
)
_RESTING = [p.value for p in ExecutionPhase if p.at_rest and p is not ExecutionPhase.SUSPENDED]


@dataclass(frozen=True, slots=True)
class Finished:
    execution_id: str
    key: str  # namespace/name
    phase: str


class RunView:
    """The executions of one run, by the ids `add`ed to it (see the module's notes)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._using = asyncio.Lock()  # one query at a time on the connection
        self.ids: list[str] = []

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._using:
            conn = await self._connection()
            return list(await conn.fetch(query, *args))

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.execute("CREATE TEMP TABLE run_executions (execution_id text PRIMARY KEY)")
            for first in range(0, len(self.ids), 5000):
                await _insert_ids(conn, self.ids[first : first + 5000])
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def add(self, ids: Sequence[str]) -> None:
        """Count `ids` in; never raises: without the database, the next look re-makes
        the table from every id added so far."""
        self.ids.extend(ids)
        async with self._using:
            if self._conn is not None and not self._conn.is_closed():
                try:
                    await _insert_ids(self._conn, ids)
                except Exception:
                    conn, self._conn = self._conn, None
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def in_order(self) -> list[ExecutionState]:
        """Every execution, in the order added (for small runs)."""
        async with self._using:
            return await executions_by_id(await self._connection(), self.ids)

    async def phase_counts(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT e.phase, count(*) AS n FROM run_executions r "
            "JOIN sagaflow_executions e USING (execution_id) GROUP BY e.phase"
        )
        return {r["phase"]: r["n"] for r in rows}

    async def finished_count(self) -> int:
        """Executions at rest: terminal, CompensationFailed, or Suspended with nothing in
        flight. A run is over when all of its executions are."""
        rows = await self._fetch(
            "SELECT count(*) AS n FROM run_executions r JOIN sagaflow_executions e "
            f"USING (execution_id) WHERE {_AT_REST}",
            _RESTING,
        )
        return int(rows[0]["n"])

    async def unfinished(self, limit: int) -> list[ExecutionState]:
        """Up to `limit` executions not at rest, those created first first."""
        rows = await self._fetch(
            "SELECT e.state FROM run_executions r JOIN sagaflow_executions e "
            f"USING (execution_id) WHERE NOT {_AT_REST} "
            "ORDER BY e.created_at, e.execution_id LIMIT $2",
            _RESTING,
            limit,
        )
        return [ExecutionState.from_json(json.loads(r["state"])) for r in rows]

    async def finished_since(self, since: datetime | None) -> list[Finished]:
        """Executions at rest that last changed at or after `since`."""
        rows = await self._fetch(
            "SELECT e.execution_id, e.namespace || '/' || e.name AS key, e.phase "
            "FROM run_executions r JOIN sagaflow_executions e USING (execution_id) "
            f"WHERE {_AT_REST} AND ($2::timestamptz IS NULL OR e.updated_at >= $2) "
            "ORDER BY e.updated_at",
            _RESTING,
            since,
        )
        return [Finished(r["execution_id"], r["key"], r["phase"]) for r in rows]

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()


async def _insert_ids(conn: asyncpg.Connection, ids: Sequence[str]) -> None:
    await conn.execute(
        "INSERT INTO run_executions SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", list(ids)
    )


async def executions_by_id(conn: asyncpg.Connection, ids: Sequence[str]) -> list[ExecutionState]:
    """The executions of `ids`, in that order (one page: callers chunk long lists)."""
    rows = await conn.fetch(
        "SELECT e.state FROM unnest($1::text[]) WITH ORDINALITY AS k(i, o) "
        "JOIN sagaflow_executions e ON e.execution_id = k.i ORDER BY k.o",
        list(ids),
    )
    return [ExecutionState.from_json(json.loads(r["state"])) for r in rows]


async def attempt_statuses(conn: asyncpg.Connection, attempt_ids: Sequence[str]) -> dict[str, str]:
    """attempt id (`<execution>/<step>[/compensate]/<attempt>`) -> status, for the attempts
    the state has dispatched; ids it does not know are missing from the result."""
    parts = []
    for text in attempt_ids:
        found = parse_attempt_id(text)
        if found is not None:
            parts.append((text, found.execution_id, found.step, found.compensation, found.attempt))
    if not parts:
        return {}
    rows = await conn.fetch(
        "SELECT k.id, a.status FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], "
        "$5::int[]) AS k(id, e, s, c, n) JOIN sagaflow_step_attempts a "
        "ON a.execution_id = k.e AND a.step = k.s AND a.compensation = k.c AND a.attempt = k.n",
        *[list(column) for column in zip(*parts, strict=True)],
    )
    return {r["id"]: r["status"] for r in rows}


async def command_queues(conn: asyncpg.Connection) -> list[str]:
    """Every command queue a stored workflow version dispatches to."""
    rows = await conn.fetch(
        "SELECT DISTINCT s->>'type' AS type FROM sagaflow_workflow_versions v, "
        "jsonb_array_elements(v.spec->'steps') AS s"
    )
    queues = {commands_queue(r["type"]) for r in rows if r["type"]}
    return sorted(q for q in queues if q != COMMANDS_QUEUE_PREFIX + "sagaflow")
