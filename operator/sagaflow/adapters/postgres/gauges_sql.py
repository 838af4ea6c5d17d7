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

from sagaflow.core.definition import WAIT_SIGNAL

_ENDED = ("Completed", "Failed", "Cancelled", "Compensated")


@dataclass(frozen=True, slots=True)
class Sample:
    phases: dict[tuple[str, str, str], int] = field(default_factory=dict)
    awaiting_signal: dict[tuple[str, str], int] = field(default_factory=dict)
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
    # A step waits for a signal when it is Running and its type, in the version the run
    # pins, is sagaflow.waitForSignal.
    awaiting = await conn.fetch(
        "SELECT e.namespace, e.workflow, count(*) AS n FROM sagaflow_executions e "
        "JOIN sagaflow_workflow_versions v ON v.namespace = e.namespace "
        "AND v.name = e.workflow AND v.version = e.workflow_version "
        "WHERE e.phase = 'Running' AND EXISTS ("
        "  SELECT 1 FROM jsonb_array_elements(e.state->'steps') s "
        "  JOIN jsonb_array_elements(v.spec->'steps') d ON d->>'name' = s->>'name' "
        "  WHERE s->>'phase' = 'Running' AND d->>'type' = $1"
        ") GROUP BY e.namespace, e.workflow",
        WAIT_SIGNAL,
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
        awaiting_signal={(r["namespace"], r["workflow"]): r["n"] for r in awaiting},
        outbox_pending=outbox["n"],
        outbox_oldest=outbox["o"],
        timers_due=timers["n"],
        timers_oldest_due=timers["o"],
        queues=queues,
        mirror_backlog=mirror["n"] if mirror["objects"] else None,
        mirror_oldest=mirror["o"],
    )
