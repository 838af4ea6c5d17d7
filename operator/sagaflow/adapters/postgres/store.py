"""Postgres state store: workflow versions, executions, history, inbox, outbox, timers.

Postgres is the authoritative state. This module owns the SQL; the transition
logic lives in `sagaflow.runtime.orchestrator`, which calls these methods inside
one transaction so a state change, the commands it causes and the consumed
messages commit together. Batches are written with array parameters (one
statement per table per batch), because the database's commit and round-trip
rates, not Python, bound the orchestrator's throughput.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from sagaflow.adapters.postgres import admission_sql, batch_writes
from sagaflow.adapters.postgres.batch_writes import TIMERS_CHANNEL as TIMERS_CHANNEL
from sagaflow.adapters.postgres.bus import decode_headers, encode_headers
from sagaflow.core.definition import Definition, compile_definition
from sagaflow.core.engine import Decision, Timer
from sagaflow.core.fact_codec import Transition
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.ports import OutgoingMessage
from sagaflow.core.replay import TRANSITION, transition_data
from sagaflow.core.state import ExecutionState

EXECUTIONS_CHANNEL = "sagaflow_executions"
OUTBOX_CHANNEL = "sagaflow_outbox"
_REMEMBERED_MAX = 100_000  # states kept for skipping decodes; cleared when exceeded


def spec_json(spec: WorkflowSpec) -> str:
    return json.dumps(
        spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        sort_keys=True,
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class DueTimer:
    execution_id: str
    key: str
    kind: str
    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Applied:
    """One fact applied (or ignored) to one execution within a batch."""

    execution_id: str
    decision: Decision
    message_id: str | None = None  # the consumed message, recorded in the inbox
    # What was applied and why (`message:<id>`, `timer:<key>`, `request:<id>`,
    # `signal:<id>`, `start`, `admission`, `parent:<execution>`): with them, a
    # Transition history row that lets `core.replay` rebuild the state at any instant.
    fact: Transition | None = None
    cause: str | None = None
    initial: ExecutionState | None = None  # on an execution's first transition


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._definitions: dict[tuple[str, str, int], Definition] = {}
        self._states: dict[str, ExecutionState] = {}

    # -- workflow versions ---------------------------------------------------------
    async def put_workflow(
        self,
        conn: asyncpg.Connection,
        namespace: str,
        name: str,
        spec: WorkflowSpec,
        now: datetime,
    ) -> tuple[int, bool]:
        """Store `spec` as a new version unless identical to a stored one; make it current.

        Returns (version, created). Serialised per workflow by a row lock, so two
        replicas applying the same change create one version.
        """
        body = spec_json(spec)
        digest = hashlib.sha256(body.encode()).hexdigest()
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO sagaflow_workflows (namespace, name, current_version, updated_at) "
                "VALUES ($1, $2, 0, $3) ON CONFLICT DO NOTHING",
                namespace,
                name,
                now,
            )
            await conn.execute(
                "SELECT 1 FROM sagaflow_workflows WHERE namespace=$1 AND name=$2 FOR UPDATE",
                namespace,
                name,
            )
            existing = await conn.fetchval(
                "SELECT version FROM sagaflow_workflow_versions "
                "WHERE namespace=$1 AND name=$2 AND spec_hash=$3",
                namespace,
                name,
                digest,
            )
            created = existing is None
            if created:
                existing = await conn.fetchval(
                    "INSERT INTO sagaflow_workflow_versions "
                    "(namespace, name, version, spec, spec_hash, created_at) "
                    "SELECT $1, $2, coalesce(max(version), 0) + 1, $3::jsonb, $4, $5 "
                    "FROM sagaflow_workflow_versions WHERE namespace=$1 AND name=$2 "
                    "RETURNING version",
                    namespace,
                    name,
                    body,
                    digest,
                    now,
                )
            await conn.execute(
                "UPDATE sagaflow_workflows SET current_version=$3, updated_at=$4 "
                "WHERE namespace=$1 AND name=$2",
                namespace,
                name,
                existing,
                now,
            )
        return int(existing), created

    async def retire_workflow(self, conn: asyncpg.Connection, namespace: str, name: str) -> None:
        """No version is current any more: new executions of it are refused. Its versions
        stay, for the executions pinned to them."""
        await conn.execute(
            "DELETE FROM sagaflow_workflows WHERE namespace=$1 AND name=$2", namespace, name
        )

    async def current_version(
        self, conn: asyncpg.Connection, namespace: str, name: str
    ) -> int | None:
        value = await conn.fetchval(
            "SELECT current_version FROM sagaflow_workflows WHERE namespace=$1 AND name=$2",
            namespace,
            name,
        )
        return None if value is None else int(value)

    async def definition(
        self, conn: asyncpg.Connection, namespace: str, name: str, version: int
    ) -> Definition:
        """A compiled version; versions are immutable, so the cache never goes stale."""
        key = (namespace, name, version)
        cached = self._definitions.get(key)
        if cached is None:
            raw = await conn.fetchval(
                "SELECT spec FROM sagaflow_workflow_versions "
                "WHERE namespace=$1 AND name=$2 AND version=$3",
                namespace,
                name,
                version,
            )
            if raw is None:
                raise LookupError(f"workflow {namespace}/{name} v{version} is not stored")
            spec = WorkflowSpec.model_validate(json.loads(raw))
            cached = compile_definition(spec, name=name, version=version)
            self._definitions[key] = cached
        return cached

    # -- executions ----------------------------------------------------------------
    async def insert_execution(
        self, conn: asyncpg.Connection, state: ExecutionState, now: datetime
    ) -> bool:
        """Insert a new execution row; False when its id or its live name already exists."""
        return state.execution_id in await self.insert_executions(conn, [state], now)

    async def insert_executions(
        self, conn: asyncpg.Connection, states: Sequence[ExecutionState], now: datetime
    ) -> set[str]:
        """Insert new execution rows in one statement; the ids actually inserted (a row
        whose id or live name exists already, or whose correlation key an unfinished
        execution of its workflow holds, is skipped)."""
        if not states:
            return set()
        rows = await conn.fetch(
            "INSERT INTO sagaflow_executions (execution_id, namespace, name, workflow, "
            "workflow_version, phase, revision, state, correlation_key, created_at, "
            "updated_at) SELECT i, ns, n, w, v, p, r, s::jsonb, c, $10, $10 FROM "
            "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], "
            "$7::bigint[], $8::text[], $9::text[]) AS t(i, ns, n, w, v, p, r, s, c) "
            "ON CONFLICT DO NOTHING RETURNING execution_id",
            [s.execution_id for s in states],
            [s.namespace for s in states],
            [s.name for s in states],
            [s.workflow for s in states],
            [s.version for s in states],
            [s.phase.value for s in states],
            [s.revision for s in states],
            [json.dumps(s.to_json()) for s in states],
            [s.correlation_key for s in states],
            now,
        )
        return {r["execution_id"] for r in rows}

    async def live_executions(
        self, conn: asyncpg.Connection, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], ExecutionState]:
        """The executions holding these (namespace, name) keys, by key."""
        rows = await conn.fetch(
            "SELECT e.state FROM unnest($1::text[], $2::text[]) AS k(ns, n) "
            "JOIN sagaflow_executions e ON e.namespace = k.ns AND e.name = k.n "
            "AND e.released_at IS NULL",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        states = [ExecutionState.from_json(json.loads(r["state"])) for r in rows]
        return {(s.namespace, s.name): s for s in states}

    async def lock_executions(
        self, conn: asyncpg.Connection, ids: Iterable[str], *, skip_locked: bool = False
    ) -> dict[str, ExecutionState]:
        """Lock rows in id order (a fixed order avoids deadlocks between replicas).

        The state document is sent only when its revision differs from the committed
        state this process remembers: decoding it is the costliest part of a transition.
        """
        wanted = sorted(set(ids))
        known = [self._states[i].revision if i in self._states else -1 for i in wanted]
        skip = " SKIP LOCKED" if skip_locked else ""
        rows = await conn.fetch(
            "SELECT e.execution_id, CASE WHEN e.revision = k.r THEN NULL ELSE e.state END AS s "
            "FROM sagaflow_executions e JOIN unnest($1::text[], $2::bigint[]) AS k(i, r) "
            f"ON e.execution_id = k.i ORDER BY e.execution_id FOR UPDATE OF e{skip}",
            wanted,
            known,
        )
        return {
            r["execution_id"]: self._states[r["execution_id"]]
            if r["s"] is None
            else ExecutionState.from_json(json.loads(r["s"]))
            for r in rows
        }

    def remember(self, states: Iterable[ExecutionState]) -> None:
        """Keep states the caller has just COMMITTED, so the next lock can skip decoding.

        Only committed states: a rolled-back revision could be reused by another replica.
        """
        if len(self._states) > _REMEMBERED_MAX:
            self._states.clear()
        for state in states:
            if state.phase.is_terminal:
                self._states.pop(state.execution_id, None)
            else:
                self._states[state.execution_id] = state

    async def get_execution(
        self, conn: asyncpg.Connection, namespace: str, name: str
    ) -> ExecutionState | None:
        """The execution holding this name (released executions hold none)."""
        raw = await conn.fetchval(
            "SELECT state FROM sagaflow_executions "
            "WHERE namespace=$1 AND name=$2 AND released_at IS NULL",
            namespace,
            name,
        )
        return None if raw is None else ExecutionState.from_json(json.loads(raw))

    async def execution_by_correlation_key(
        self, conn: asyncpg.Connection, namespace: str, workflow: str, key: str
    ) -> ExecutionState | None:
        """The unfinished execution of the workflow holding `spec.correlationKey` `key`."""
        found = await admission_sql.key_holders(conn, [(namespace, workflow, key)])
        return found.get((namespace, workflow, key))

    async def get_execution_by_id(
        self, conn: asyncpg.Connection, execution_id: str
    ) -> ExecutionState | None:
        raw = await conn.fetchval(
            "SELECT state FROM sagaflow_executions WHERE execution_id=$1", execution_id
        )
        return None if raw is None else ExecutionState.from_json(json.loads(raw))

    async def history(
        self, conn: asyncpg.Connection, execution_id: str, *, transitions: bool = False
    ) -> list[asyncpg.Record]:
        """The run's history lines; with `transitions`, its Transition rows too (what
        each transition applied, for `core.replay`)."""
        hide = "" if transitions else f" AND kind <> '{TRANSITION}'"
        return list(
            await conn.fetch(
                "SELECT at, kind, step, attempt, message, data FROM sagaflow_history "
                f"WHERE execution_id=$1{hide} ORDER BY seq",
                execution_id,
            )
        )

    # -- inbox ---------------------------------------------------------------------
    async def claim_inbox(
        self, conn: asyncpg.Connection, messages: Sequence[tuple[str, str]], now: datetime
    ) -> set[str]:
        """Record (message_id, execution_id) pairs; return the ids seen for the first time."""
        if not messages:
            return set()
        rows = await conn.fetch(
            "INSERT INTO sagaflow_inbox (message_id, execution_id, received_at, outcome) "
            "SELECT m, e, $3, 'applied' FROM unnest($1::text[], $2::text[]) AS t(m, e) "
            "ON CONFLICT DO NOTHING RETURNING message_id",
            [m for m, _ in messages],
            [e for _, e in messages],
            now,
        )
        return {r["message_id"] for r in rows}

    async def record_outcomes(
        self, conn: asyncpg.Connection, outcomes: Sequence[tuple[str, str]]
    ) -> None:
        """Say what became of inbox messages that no decision covers (message_id, outcome)."""
        await batch_writes.write_outcomes(conn, list(outcomes))

    # -- timers --------------------------------------------------------------------
    async def due_timer_executions(
        self, conn: asyncpg.Connection, now: datetime, limit: int
    ) -> list[str]:
        rows = await conn.fetch(
            "SELECT DISTINCT execution_id FROM (SELECT execution_id FROM sagaflow_timers "
            "WHERE due_at <= $1 ORDER BY due_at LIMIT $2) t",
            now,
            limit,
        )
        return [r["execution_id"] for r in rows]

    async def take_due_timers(
        self, conn: asyncpg.Connection, ids: Sequence[str], now: datetime
    ) -> list[DueTimer]:
        """Delete and return due timers of executions whose rows the caller has locked."""
        rows = await conn.fetch(
            "DELETE FROM sagaflow_timers WHERE execution_id = ANY($1::text[]) AND due_at <= $2 "
            "RETURNING execution_id, key, kind, step, attempt, due_at",
            list(ids),
            now,
        )
        ordered = sorted(rows, key=lambda r: (r["due_at"], r["key"]))
        return [
            DueTimer(r["execution_id"], r["key"], r["kind"], r["step"], r["attempt"])
            for r in ordered
        ]

    async def next_timer_due(self, conn: asyncpg.Connection) -> datetime | None:
        value: datetime | None = await conn.fetchval("SELECT min(due_at) FROM sagaflow_timers")
        return value

    # -- outbox --------------------------------------------------------------------
    async def add_outbox(
        self, conn: asyncpg.Connection, messages: Sequence[OutgoingMessage], now: datetime
    ) -> None:
        await conn.execute(
            "INSERT INTO sagaflow_outbox (queue, message_id, session_id, body, scheduled_at, "
            "created_at, headers) SELECT q, m, s, b, sch, $6, h::jsonb FROM unnest($1::text[], "
            "$2::text[], $3::text[], $4::bytea[], $5::timestamptz[], $7::text[]) "
            "AS t(q, m, s, b, sch, h)",
            [m.queue for m in messages],
            [m.message_id for m in messages],
            [m.session_id for m in messages],
            [m.body for m in messages],
            [m.scheduled_at for m in messages],
            now,
            [encode_headers(m.headers) for m in messages],
        )
        await conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)

    async def take_outbox(
        self, conn: asyncpg.Connection, limit: int
    ) -> tuple[list[int], list[OutgoingMessage]]:
        rows = await conn.fetch(
            "SELECT seq, queue, message_id, session_id, body, scheduled_at, headers "
            "FROM sagaflow_outbox ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
            limit,
        )
        return [r["seq"] for r in rows], [
            OutgoingMessage(
                r["queue"],
                r["message_id"],
                r["session_id"],
                bytes(r["body"]),
                r["scheduled_at"],
                decode_headers(r["headers"]),
            )
            for r in rows
        ]

    async def delete_outbox(self, conn: asyncpg.Connection, seqs: Sequence[int]) -> None:
        await conn.execute("DELETE FROM sagaflow_outbox WHERE seq = ANY($1::bigint[])", list(seqs))

    # -- the write side of a transition batch ----------------------------------------
    async def save(
        self, conn: asyncpg.Connection, applied: Sequence[Applied], now: datetime
    ) -> None:
        """Persist a batch of decisions: states, history, attempts, timers, inbox outcomes."""
        finals: dict[str, ExecutionState] = {}
        history: list[tuple[str, str, str | None, int | None, str, str | None]] = []
        attempts: dict[tuple[str, str, bool, int], list[Any]] = {}
        timers: dict[tuple[str, str], Timer | None] = {}
        outcomes: list[tuple[str, str]] = []
        for item in applied:
            d = item.decision
            eid = item.execution_id
            if item.fact is not None:
                history.append(_transition_row(item))
            if not d.applied:
                if item.message_id is not None:
                    outcomes.append((item.message_id, f"ignored: {d.ignored}"))
                history.append(
                    (
                        eid,
                        "MessageIgnored",
                        None,
                        None,
                        f"message {item.message_id} ignored: {d.ignored}",
                        None,
                    )
                )
                continue
            finals[eid] = d.state
            for key in d.cancel_timers:
                timers[(eid, key)] = None
            for t in d.timers:
                timers[(eid, t.key)] = t
            for r in d.records:
                history.append(
                    (
                        eid,
                        r.kind,
                        r.step,
                        r.attempt,
                        r.message,
                        json.dumps(r.data) if r.data else None,
                    )
                )
                batch_writes.attempt_row(attempts, eid, d.state, r.kind, r.step, r.attempt, now)
        await batch_writes.write_states(conn, finals, now)
        done = [i for i, s in finals.items() if s.correlation_key and s.phase.is_terminal]
        await admission_sql.release_keys(conn, done)  # a finished run frees its key
        await batch_writes.write_history(conn, history, now)
        await batch_writes.write_attempts(conn, attempts)
        await batch_writes.write_timers(conn, timers)
        await batch_writes.write_outcomes(conn, outcomes)
        if finals:
            await conn.execute("SELECT pg_notify($1, '')", EXECUTIONS_CHANNEL)


def _transition_row(item: Applied) -> tuple[str, str, None, None, str, str]:
    """The Transition row written before the lines of `item`'s decision."""
    assert item.fact is not None
    d, cause = item.decision, item.cause or "-"
    data = transition_data(
        item.fact, version=d.state.version, cause=cause, initial=item.initial, ignored=d.ignored
    )
    message = f"{type(item.fact).__name__} ({cause})"
    return (item.execution_id, TRANSITION, None, None, message, json.dumps(data))


def new_execution_id() -> str:
    return str(uuid.uuid4())
