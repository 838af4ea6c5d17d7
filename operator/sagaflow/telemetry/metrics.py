"""Every Prometheus metric Sagaflow exports, in one registry, and its exposition.

One place names them all, so the chart's dashboard and alerts can be checked
against what the code exports (`tests/integration/test_dashboard_names.py`). Names follow
Prometheus conventions: `sagaflow_` prefix, base units (seconds), `_total` on
counters. Labels are namespace, workflow, step and outcome, never an execution id:
a label per run would grow without bound.

The orchestrator, the API server and every runner host serve `REGISTRY` at
`/metrics`. Gauges that describe the database (outbox, timers, queues, phases) are
sampled by `sagaflow.runtime.gauges`, not computed on each scrape, so a scrape
costs no query.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "REGISTRY", "MetricsServer", "exposition"]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Seconds, from a fast step hop to a long-running saga.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0)

# -- counters ------------------------------------------------------------------------
EXECUTIONS_STARTED = Counter(
    "sagaflow_executions_started",
    "Executions started (dispatching began).",
    ["namespace", "workflow"],
    registry=REGISTRY,
)
EXECUTIONS_FINISHED = Counter(
    "sagaflow_executions_finished",
    "Executions that reached an end phase: Completed, Failed, Compensated, "
    "CompensationFailed or Cancelled.",
    ["namespace", "workflow", "phase"],
    registry=REGISTRY,
)
STEP_ATTEMPTS = Counter(
    "sagaflow_step_attempts",
    "Step attempts settled, by outcome: succeeded, failed, retried, timed_out, "
    "ignored_stale (a result for an attempt that no longer counts).",
    ["namespace", "workflow", "step", "outcome"],
    registry=REGISTRY,
)
COMPENSATIONS = Counter(
    "sagaflow_compensations",
    "Compensation attempts settled, by outcome: succeeded, failed, retried, skipped.",
    ["namespace", "workflow", "step", "outcome"],
    registry=REGISTRY,
)
SIGNALS = Counter(
    "sagaflow_signals",
    "Signals delivered, by outcome: accepted or refused.",
    ["namespace", "workflow", "signal", "outcome"],
    registry=REGISTRY,
)
SCHEDULE_TICKS = Counter(
    "sagaflow_schedule_ticks",
    "Schedule ticks, by outcome: started, skipped (concurrency policy), missed "
    "(older than the catch-up window) or failed (started nothing).",
    ["namespace", "schedule", "outcome"],
    registry=REGISTRY,
)
INBOX_DUPLICATES = Counter(
    "sagaflow_inbox_duplicates",
    "Consumed messages dropped by the inbox as already applied.",
    ["source"],  # events, signals, control
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "sagaflow_dead_letters",
    "Messages dead-lettered, by queue and reason.",
    ["queue", "reason"],
    registry=REGISTRY,
)

# -- histograms ----------------------------------------------------------------------
EXECUTION_DURATION = Histogram(
    "sagaflow_execution_duration_seconds",
    "From start to an end phase.",
    ["namespace", "workflow", "phase"],
    buckets=_SLOW,
    registry=REGISTRY,
)
STEP_DURATION = Histogram(
    "sagaflow_step_duration_seconds",
    "A step handler's run in the runner, by step type and outcome.",
    ["type", "outcome"],  # outcome: succeeded, failed, timed_out
    buckets=_SLOW,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "sagaflow_queue_wait_seconds",
    "Dispatch to start: from a command's enqueueing to a runner taking it.",
    ["queue"],
    buckets=_FAST,
    registry=REGISTRY,
)
ORCHESTRATOR_HOP = Histogram(
    "sagaflow_orchestrator_hop_seconds",
    "Result to next command: from a result event's enqueueing to the commit of the "
    "transaction that applied it.",
    buckets=_FAST,
    registry=REGISTRY,
)
TRANSACTION_DURATION = Histogram(
    "sagaflow_transaction_duration_seconds",
    "One orchestrator transaction, by what ran it: events, timers, start, control, admission.",
    ["loop"],
    buckets=_FAST,
    registry=REGISTRY,
)

# -- gauges (sampled) ----------------------------------------------------------------
EXECUTIONS = Gauge(
    "sagaflow_executions",
    "Executions by phase, as last sampled from the database.",
    ["namespace", "workflow", "phase"],
    registry=REGISTRY,
)
EXECUTIONS_WAITING = Gauge(
    "sagaflow_executions_waiting",
    "Running executions idle on purpose, not stuck, by what they wait for: a signal "
    "(a waitForSignal step), a timer (a sagaflow.wait step) or a retry's backoff; "
    "each run counted once, under the first of these that holds.",
    ["namespace", "workflow", "reason"],
    registry=REGISTRY,
)
OUTBOX_PENDING = Gauge(
    "sagaflow_outbox_pending", "Outbox rows not yet sent to the bus.", registry=REGISTRY
)
OUTBOX_OLDEST_AGE = Gauge(
    "sagaflow_outbox_oldest_age_seconds",
    "Age of the oldest unsent outbox row (0 when empty).",
    registry=REGISTRY,
)
TIMERS_DUE = Gauge(
    "sagaflow_timers_due", "Durable timers past their due time, not yet fired.", registry=REGISTRY
)
TIMERS_LAG = Gauge(
    "sagaflow_timers_lag_seconds",
    "How far past due the oldest unfired timer is (0 when none is due).",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "sagaflow_queue_depth",
    "Messages waiting on a bus queue (the Postgres bus; dead letters under "
    "`<queue>/$DeadLetterQueue`).",
    ["queue"],
    registry=REGISTRY,
)
MIRROR_BACKLOG = Gauge(
    "sagaflow_mirror_backlog",
    "Execution changes not yet mirrored to Kubernetes status.",
    registry=REGISTRY,
)
MIRROR_LAG = Gauge(
    "sagaflow_mirror_lag_seconds",
    "Age of the oldest change not yet mirrored to Kubernetes status.",
    registry=REGISTRY,
)
LEADER = Gauge(
    "sagaflow_leader",
    "1 while this operator replica holds the kopf peering lead, else 0.",
    registry=REGISTRY,
)
BUILD_INFO = Info("sagaflow_build", "The running Sagaflow build.", registry=REGISTRY)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sagaflow")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree only
        return "unknown"


BUILD_INFO.info({"version": _version(), "python": platform.python_version()})


def exposition() -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(REGISTRY)


class MetricsServer:
    """`/metrics` on a port of its own, for a process with no API (a runner host).

    prometheus-client's server runs in a daemon thread: a scrape never waits for the
    event loop, and a loop that is blocked is still scraped."""

    def __init__(self, port: int, host: str) -> None:
        self._server, self._thread = start_http_server(port, host, registry=REGISTRY)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
