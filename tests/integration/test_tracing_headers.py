"""Trace headers: `tracing.inject`/`extract`, and message headers kept by every hop.

Headers (application properties) go in with a message and come out with it: through
the Postgres bus (and into its dead letters), the outbox, and the Service Bus adapter
over an in-memory fake of its client and over the real SDK against the test peer.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pg import FakeClock
from servicebus_contract import FakeServiceBus, fake_servicebus_bus
from test_servicebus_product import PLAIN
from tests.support.servicebus_peer import running_peer

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.adapters.servicebus import ServiceBusBus
from sagaflow.core.ports import Bus, OutgoingMessage
from sagaflow.telemetry import tracing

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HEADERS = {"traceparent": TRACEPARENT, "tracestate": "vendor=1", "x-note": "ünïcode"}
QUEUE = "steps.headers"


# -- inject / extract ------------------------------------------------------------------


def test_inject_writes_the_w3c_traceparent_of_a_span_and_extract_reads_it_back() -> None:
    span_context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    headers = tracing.inject(trace.set_span_in_context(NonRecordingSpan(span_context)))
    assert headers == {"traceparent": TRACEPARENT}
    back = trace.get_current_span(tracing.extract(headers)).get_span_context()
    assert (back.trace_id, back.span_id, back.is_remote) == (
        span_context.trace_id,
        span_context.span_id,
        True,
    )


def test_extract_takes_header_names_in_any_case_and_ignores_what_is_not_a_traceparent() -> None:
    found = trace.get_current_span(tracing.extract({"TraceParent": TRACEPARENT}))
    assert found.get_span_context().span_id == 0xB7AD6B7169203331
    for headers in (None, {}, {"traceparent": "00-nonsense"}, {"other": TRACEPARENT}):
        assert not trace.get_current_span(tracing.extract(headers)).get_span_context().is_valid


def test_inject_with_no_span_writes_nothing() -> None:
    assert tracing.inject() == {}


def test_incoming_makes_the_callers_trace_current_only_inside_the_block() -> None:
    with tracing.incoming({"traceparent": TRACEPARENT}):
        assert tracing.inject() == {"traceparent": TRACEPARENT}
    assert tracing.inject() == {}


# -- the Postgres bus and the outbox -------------------------------------------------------


def message(message_id: str, headers: dict[str, str] | None) -> OutgoingMessage:
    return OutgoingMessage(QUEUE, message_id, "s-1", b"{}", headers=headers)


async def round_trip(bus: Bus) -> dict[str, object]:
    await bus.send([message("with", HEADERS), message("without", None)])
    got = await bus.receive(QUEUE, max_messages=10, max_wait=10)
    while len(got) < 2:
        got += await bus.receive(QUEUE, max_messages=10, max_wait=10)
    await bus.complete(got)
    return {m.message_id: m.headers for m in got}


async def test_the_postgres_bus_keeps_headers_into_its_dead_letters(pg_pool: asyncpg.Pool) -> None:
    bus = PostgresBus(pg_pool, clock=FakeClock(), lock_duration=30)
    try:
        assert await round_trip(bus) == {"with": HEADERS, "without": None}
        await bus.send([message("doomed", HEADERS)])
        [doomed] = await bus.receive(QUEUE, max_wait=10)
        await bus.dead_letter(doomed, reason="Test", description="headers kept")
        [letter] = await bus.receive_dead_letters(QUEUE)
        assert letter.message.headers == HEADERS
    finally:
        await bus.close()


async def test_the_outbox_keeps_headers(pg_pool: asyncpg.Pool) -> None:
    store = PostgresStore(pg_pool)
    async with pg_pool.acquire() as conn, conn.transaction():
        await store.add_outbox(conn, [message("a", HEADERS), message("b", None)], datetime.now(UTC))
        _, taken = await store.take_outbox(conn, 10)
    assert [(m.message_id, m.headers) for m in taken] == [("a", HEADERS), ("b", None)]


# -- the Service Bus adapter ---------------------------------------------------------------


async def test_the_service_bus_adapter_keeps_headers_over_its_client() -> None:
    namespace = FakeServiceBus(FakeClock(), lock_duration=30)
    bus = fake_servicebus_bus(namespace)
    try:
        assert await round_trip(bus) == {"with": HEADERS, "without": None}
    finally:
        await bus.close()
    sent = {wire.message_id: wire.headers for _, wire in namespace.sent}
    assert sent == {"with": HEADERS, "without": None}


@pytest.mark.timeout(60)
async def test_headers_are_application_properties_through_the_sdk_and_the_peer() -> None:
    with running_peer({QUEUE: PLAIN}) as peer:
        bus = ServiceBusBus.from_connection_string(peer.connection_string, clock=peer.now)
        try:
            assert await round_trip(bus) == {"with": HEADERS, "without": None}
        finally:
            await bus.close()
