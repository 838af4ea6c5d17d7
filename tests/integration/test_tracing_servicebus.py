"""The saga of `test_tracing.py` over the Service Bus adapter: the same trace tree.

The real azure-servicebus SDK against the AMQP test peer (plain queues, as sagaflow
makes them), state in Postgres: commands go through the outbox and its relay, so the
trace context travels in outbox rows and then as the messages' application
properties, both ways.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pg import FakeClock
from test_servicebus_product import PLAIN
from test_tracing import assert_saga_tree, play_saga, running, span_exporter
from tests.support.servicebus_peer import running_peer

from sagaflow.adapters.servicebus import ServiceBusBus, topology_queues

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def sb_spans() -> Iterator[InMemorySpanExporter]:
    exporter = span_exporter()
    yield exporter
    exporter.shutdown()


async def test_a_saga_over_service_bus_is_one_trace(
    pg_pool: asyncpg.Pool, sb_spans: InMemorySpanExporter
) -> None:
    with running_peer(dict.fromkeys(topology_queues(["trace"]), PLAIN)) as peer:
        bus = ServiceBusBus.from_connection_string(peer.connection_string, clock=peer.now)
        runner_bus = ServiceBusBus.from_connection_string(peer.connection_string, clock=peer.now)
        try:
            async with running(pg_pool, bus, runner_bus, FakeClock()) as run:
                assert not run.o.transactional  # through the outbox
                await play_saga(run, "traced-sb")
        finally:
            await runner_bus.close()
            await bus.close()
    assert_saga_tree(list(sb_spans.get_finished_spans()), "traced-sb")
