"""The metrics of a saga run over the Service Bus adapter (the real SDK, the test peer).

The saga of `test_tracing.py` (a retry, a final failure, a compensation), with the
commands going through the outbox and its relay: the counts must be the same as on
the Postgres bus, the runner's histograms filled from Service Bus deliveries, and the
outbox gauge must see the commands waiting for the relay. Counters are process-wide
and that saga runs in other tests too, so this reads the change across the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pg import FakeClock
from test_servicebus_product import PLAIN
from test_tracing import NS, assert_saga_tree, play_saga, running, span_exporter
from tests.support.servicebus_peer import running_peer

from sagaflow.adapters.servicebus import ServiceBusBus, topology_queues
from sagaflow.core.messages import commands_queue
from sagaflow.runtime.gauges import GaugeSampler
from sagaflow.telemetry.metrics import REGISTRY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SERIES = [
    ("sagaflow_executions_started_total", {"namespace": NS, "workflow": "saga"}),
    *(
        (
            "sagaflow_step_attempts_total",
            {"namespace": NS, "workflow": "saga", "step": step, "outcome": outcome},
        )
        for step, outcome in [
            ("reserve", "succeeded"),
            ("charge", "retried"),
            ("charge", "failed"),
            ("charge", "succeeded"),
        ]
    ),
    (
        "sagaflow_compensations_total",
        {"namespace": NS, "workflow": "saga", "step": "reserve", "outcome": "succeeded"},
    ),
    (
        "sagaflow_executions_finished_total",
        {"namespace": NS, "workflow": "saga", "phase": "Compensated"},
    ),
    ("sagaflow_orchestrator_hop_seconds_count", {}),
    ("sagaflow_queue_wait_seconds_count", {"queue": commands_queue("trace.x")}),
    ("sagaflow_step_duration_seconds_count", {"type": "trace.charge", "outcome": "failed"}),
    ("sagaflow_step_duration_seconds_count", {"type": "trace.reserve", "outcome": "succeeded"}),
    ("sagaflow_transaction_duration_seconds_count", {"loop": "start"}),
]


def readings() -> list[float]:
    return [REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in SERIES]


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = span_exporter()
    yield exporter
    exporter.shutdown()


async def test_a_saga_over_service_bus_counts_as_on_postgres(
    pg_pool: asyncpg.Pool, exported: InMemorySpanExporter
) -> None:
    before = readings()
    with running_peer(dict.fromkeys(topology_queues(["trace"]), PLAIN)) as peer:
        bus = ServiceBusBus.from_connection_string(peer.connection_string, clock=peer.now)
        runner_bus = ServiceBusBus.from_connection_string(peer.connection_string, clock=peer.now)
        try:
            async with running(pg_pool, bus, runner_bus, FakeClock()) as run:
                sampler = GaugeSampler(pg_pool, bus_in_database=False, clock=run.clock)
                relay = run.relay

                async def sampled_relay() -> int:
                    # Before each relay the commands wait in the outbox: the gauge sees them.
                    sample = await sampler.sample_once()
                    pending.append(sample.outbox_pending)
                    return await relay()

                pending: list[int] = []
                run.relay = sampled_relay
                await play_saga(run, "counted-sb")
        finally:
            await runner_bus.close()
            await bus.close()
    changes = [after - then for after, then in zip(readings(), before, strict=True)]
    named = {
        f"{name}{labels}": change for (name, labels), change in zip(SERIES, changes, strict=True)
    }
    assert named == {
        f"{name}{labels}": expected
        for (name, labels), expected in zip(
            SERIES, [1, 1, 1, 1, 0, 1, 1, 4, 4, 2, 1, 1], strict=True
        )
    }
    # Four relays found a command waiting in the outbox: reserve, charge, its retry, undo.
    assert pending[:1] == [1] and sum(pending) == 4
    assert REGISTRY.get_sample_value("sagaflow_outbox_pending") is not None
    assert_saga_tree(list(exported.get_finished_spans()), "counted-sb")
