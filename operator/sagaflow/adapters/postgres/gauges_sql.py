"""The queries behind the sampled gauges: phases, outbox, timers, queues, the mirror.

Each is one aggregate over an indexed table or a bounded count, cheap enough to run
every few seconds beside the orchestrator's own work. Ended executions (Completed,
Failed, Cancelled, Compensated) are left out of the phase counts: they only grow,
and `sagaflow_executions_finished_total` already counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from sagaflow.core.definition import WAIT, WAIT_SIGNAL

_ENDED = ("Completed", "Failed", "Cancelled", "Compensated")


@dataclass(frozen=True, slots=True)
class Sample:
    phases: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # (namespace, workflow, reason: signal, timer or retry) -> Running runs idle on purpose
    waiting: dict[tuple[str, str, str], int] = field(default_factory=dict)
    outbox_pending: int = 0
    outbox_oldest: datetime | None = None
    timers_due: int = 0
    timers_oldest_due: datetime | None = None
    queues: dict[str, int] = field(default_factory=dict)
    mirror_backlog: int | None = None  # None: no execution is backed by an object
    mirror_oldest: datetime | None = None


async def sample(conn: asyncpg.Connection, now: datetime, *, bus: bool) -> Sample:
    """One reading; `bus`: the Postgres bus lives in this database, so count its queues."""
    phases = await conn.fetch(
        "SELECT namespace, workflow, phase, count(*) AS n FROM sagaflow_executions "
        "WHERE phase <> ALL($1::text[]) GROUP BY namespace, workflow, phase",
        list(_ENDED),
    )
    # What a Running run waits for, from its steps: a Running step whose type (in the
    # version the run pins) is waitForSignal or wait, or a step Retrying (in backoff).
    # Each run once, under the first reason that holds, so the counts can be subtracted.
    waiting = await conn.fetch(
        "SELECT namespace, workflow, reason, count(*) AS n FROM ("
        "  SELECT e.namespace, e.workflow, CASE"
        "    WHEN bool_or(s->>'phase' = 'Running' AND d->>'type' = $1) THEN 'signal'"
        "    WHEN bool_or(s->>'phase' = 'Running' AND d->>'type' = $2) THEN 'timer'"
        "    WHEN bool_or(s->>'phase' = 'Retrying') THEN 'retry' END AS reason"
        "  FROM sagaflow_executions e"
        "  JOIN sagaflow_workflow_versions v ON v.namespace = e.namespace"
        "   AND v.name = e.workflow AND v.version = e.workflow_version"
        "  CROSS JOIN LATERAL jsonb_array_elements(e.state->'steps') s"
        "  LEFT JOIN LATERAL jsonb_array_elements(v.spec->'steps') d"
        "   ON d->>'name' = s->>'name'"
        "  WHERE e.phase = 'Running'"
        "  GROUP BY e.execution_id, e.namespace, e.workflow"
        ") runs WHERE reason IS NOT NULL GROUP BY namespace, workflow, reason",
        WAIT_SIGNAL,
        WAIT,
    )
    outbox = await conn.fetchrow("SELECT count(*) AS n, min(created_at) AS o FROM sagaflow_outbox")
    timers = await conn.fetchrow(
        "SELECT count(*) AS n, min(due_at) AS o FROM sagaflow_timers WHERE due_at <= $1", now
    )
    queues: dict[str, int] = {}
    if bus:
        for r in await conn.fetch("SELECT queue, count(*) AS n FROM bus_messages GROUP BY queue"):
            queues[r["queue"]] = r["n"]
        for r in await conn.fetch(
            # Handled ones are kept for inspection; Service Bus removes them, so they
            # are not counted as waiting.
            "SELECT queue, count(*) AS n FROM bus_dead_letters "
            "WHERE handled_at IS NULL GROUP BY queue"
        ):
            queues[r["queue"] + "/$DeadLetterQueue"] = r["n"]
    mirror = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE e.revision > k.mirrored_revision) AS n, "
        "min(e.updated_at) FILTER (WHERE e.revision > k.mirrored_revision) AS o, "
        "count(*) AS objects "
        "FROM sagaflow_kube_executions k JOIN sagaflow_executions e USING (execution_id) "
        "WHERE k.released_at IS NULL"
    )
    assert outbox is not None
    assert timers is not None
    assert mirror is not None
    return Sample(
        phases={(r["namespace"], r["workflow"], r["phase"]): r["n"] for r in phases},
        waiting={(r["namespace"], r["workflow"], r["reason"]): r["n"] for r in waiting},
        outbox_pending=outbox["n"],
        outbox_oldest=outbox["o"],
        timers_due=timers["n"],
        timers_oldest_due=timers["o"],
        queues=queues,
        mirror_backlog=mirror["n"] if mirror["objects"] else None,
        mirror_oldest=mirror["o"],
    )
