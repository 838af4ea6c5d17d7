"""The trace of a saga run through the orchestrator and a real runner host, on Postgres.

A saga with a retry and a compensation runs on the Postgres bus: the runner host
(`RunnerWorker`) serves the commands in the background, the orchestrator is driven one
pass at a time on a fake clock (so the retry's timer fires when the test says). The
SDK's in-memory exporter collects every span, and the test asserts the tree: one trace
for the whole run, under the traceparent the start came with; a step span per attempt
(the retry and the undo included) with the attempt's ids; each handler span a child of
its attempt's; a span the handler opens with the plain OpenTelemetry API a child of the
handler's; each applying of a result under the handler span that sent it.
`test_tracing_servicebus.py` runs the same saga over the Service Bus adapter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pg import FakeClock

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import attempt_id
from sagaflow.core.ports import Bus
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.startpath import Source, StartCall, start_call
from sagaflow.runtime.worker import RunnerWorker
from sagaflow.telemetry import tracing
from sagaflow_runner import PermanentError, Registry, RetryableError, StepContext

pytestmark = pytest.mark.timeout(90)

NS = "default"
SAGA = WorkflowSpec.model_validate(
    {
        "retry": {"maxAttempts": 2, "initialInterval": "1s"},
        "steps": [
            {"name": "reserve", "type": "trace.reserve", "compensate": {"type": "trace.release"}},
            {"name": "charge", "type": "trace.charge", "dependsOn": ["reserve"]},
        ],
    }
)
# The caller's trace: a start with this traceparent joins it.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}


def span_exporter() -> InMemorySpanExporter:
    """A fresh exporter on the process's SDK provider (installed on first use: the
    global provider can be set once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = span_exporter()
    yield exporter
    exporter.shutdown()  # its processor stays, exporting nothing more


def registry() -> Registry:
    reg = Registry()
    charges: list[int] = []

    async def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        # Plain OpenTelemetry in the handler: no sagaflow code, yet it nests.
        with trace.get_tracer("inventory").start_as_current_span("inventory.lookup"):
            return {"reservation": "r-1"}

    async def charge(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        charges.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RetryableError("card network busy")
        raise PermanentError("card declined", type="Declined")

    async def release(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    reg.register("trace.reserve", reserve)
    reg.register("trace.charge", charge)
    reg.register("trace.release", release)
    return reg


class Run:
    """The orchestrator, passed by hand, and a runner host serving in the background."""

    def __init__(
        self, o: Orchestrator, clock: FakeClock, relay: Callable[[], Awaitable[int]]
    ) -> None:
        self.o, self.clock, self.relay = o, clock, relay

    async def events(self) -> None:
        """Apply the next result event (the runner sends one at a time here)."""
        while await self.o.consume_once(max_wait=10) == 0:
            pass
        await self.relay()

    async def phase(self, name: str) -> str:
        async with self.o.pool.acquire() as conn:
            state = await self.o.store.get_execution(conn, NS, name)
        assert state is not None
        return str(state.phase.value)


@asynccontextmanager
async def running(
    pool: asyncpg.Pool, bus: Bus, runner_bus: Bus, clock: FakeClock, *, runner_clock: Any = None
) -> AsyncIterator[Run]:
    o = Orchestrator(PostgresStore(pool), bus, clock=clock)

    async def relay() -> int:
        return 0 if o.transactional else await o.relay_once()

    await o.apply_workflow(NS, "saga", SAGA)
    stop = asyncio.Event()
    options = {} if runner_clock is None else {"clock": runner_clock}
    host = RunnerWorker(runner_bus, registry(), concurrency=2, **options)
    task = asyncio.create_task(host.run(stop))
    try:
        yield Run(o, clock, relay)
    finally:
        stop.set()
        await task


async def play_saga(run: Run, name: str) -> None:
    """Start the saga under the caller's trace and see it through its compensation."""
    with tracing.incoming(CALLER):
        state, created = await start_call(
            run.o, StartCall(NS, "saga", {"order": 7}, name=name, source=Source("api"))
        )
    assert created and state.traceparent is not None
    await run.relay()
    await run.events()  # reserve completed: charge dispatched
    await run.events()  # charge attempt 1 failed: a retry timer
    run.clock.advance(1.5)
    assert await run.o.fire_timers_once() == 1
    await run.relay()
    await run.events()  # charge attempt 2 failed for good: reserve is undone
    await run.events()  # release completed
    assert await run.phase(name) == "Compensated"


def by_name(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def assert_saga_tree(finished: list[ReadableSpan], name: str) -> None:
    """The tree one run of `play_saga` leaves."""
    spans = [s for s in finished if s.context is not None]
    assert {format(s.context.trace_id, "032x") for s in spans} == {CALLER_TRACE}
    ids = {s.context.span_id: s for s in spans}

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, span.name
        return ids[span.parent.span_id]

    [execution] = by_name(spans, "sagaflow.execution ")
    assert execution.name == "sagaflow.execution saga"
    assert execution.parent is not None
    assert format(execution.parent.span_id, "016x") == CALLER_SPAN
    assert execution.attributes is not None
    assert execution.attributes["sagaflow.execution"] == f"{NS}/{name}"
    execution_id = execution.attributes["sagaflow.execution_id"]

    steps = by_name(spans, "sagaflow.step ")
    attempts = sorted(
        (
            s.attributes["sagaflow.step"],
            s.attributes["sagaflow.attempt"],
            s.attributes["sagaflow.compensation"],
        )  # type: ignore[index]
        for s in steps
    )
    assert attempts == [
        ("charge", 1, False),
        ("charge", 2, False),
        ("reserve", 1, False),
        ("reserve", 1, True),
    ]
    for step in steps:
        assert parent(step) is execution
        attrs = step.attributes
        assert attrs is not None
        assert step.name == f"sagaflow.step {attrs['sagaflow.step']}"
        assert attrs["sagaflow.execution_id"] == execution_id
        assert attrs["sagaflow.execution"] == f"{NS}/{name}"
        expected = attempt_id(
            str(execution_id),
            str(attrs["sagaflow.step"]),
            int(attrs["sagaflow.attempt"]),  # type: ignore[arg-type]
            bool(attrs["sagaflow.compensation"]),
        )
        assert attrs["sagaflow.attempt_id"] == expected

    handlers = by_name(spans, "sagaflow.handler ")
    assert len(handlers) == len(steps)
    for handler in handlers:
        step = parent(handler)
        assert step in steps
        assert handler.attributes is not None and step.attributes is not None
        assert handler.attributes["sagaflow.attempt_id"] == step.attributes["sagaflow.attempt_id"]
        assert handler.name == f"sagaflow.handler {step.attributes['sagaflow.step_type']}"
    failed = sorted(
        h.attributes["sagaflow.attempt"]  # type: ignore[index]
        for h in handlers
        if h.status.status_code is StatusCode.ERROR
    )
    assert failed == [1, 2]  # the two charges

    [inner] = by_name(spans, "inventory.lookup")
    assert parent(inner).name == "sagaflow.handler trace.reserve"

    applies = by_name(spans, "sagaflow.apply ")
    assert len(applies) == len(handlers)  # every result applied once, under its handler
    assert {parent(a).context.span_id for a in applies} == {h.context.span_id for h in handlers}


async def test_a_saga_is_one_trace_from_its_caller_to_every_handler(
    pg_pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    clock = FakeClock()
    bus = PostgresBus(pg_pool, clock=clock, lock_duration=30)
    try:
        async with running(pg_pool, bus, bus, clock, runner_clock=clock) as run:
            await play_saga(run, "traced")
    finally:
        await bus.close()
    assert_saga_tree(list(spans.get_finished_spans()), "traced")


async def test_the_trace_is_kept_with_the_execution_across_orchestrators(
    pg_pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    # A start without a caller's trace is a root; an orchestrator made afterwards (a
    # restart) dispatches under the trace stored with the execution.
    clock = FakeClock()
    bus = PostgresBus(pg_pool, clock=clock, lock_duration=30)
    try:
        first = Orchestrator(PostgresStore(pg_pool), bus, clock=clock)
        await first.apply_workflow(NS, "saga", SAGA)
        state, _ = await first.start(NS, "rooted", "saga", {})
        assert state.traceparent is not None
        async with running(pg_pool, bus, bus, clock, runner_clock=clock) as run:
            await run.events()  # a new orchestrator applies reserve's result
    finally:
        await bus.close()
    finished = list(spans.get_finished_spans())
    [execution] = by_name(finished, "sagaflow.execution ")
    assert execution.parent is None
    trace_ids = {s.context.trace_id for s in finished if s.context is not None}
    assert trace_ids == {execution.context.trace_id}  # type: ignore[union-attr]
    assert [s.name for s in by_name(finished, "sagaflow.step ")] == [
        "sagaflow.step reserve",
        "sagaflow.step charge",
    ]


async def test_an_http_start_with_a_traceparent_joins_the_callers_trace() -> None:
    # The API's start route makes the request's headers current (any case) for the start.
    headers = {"TraceParent": CALLER["traceparent"]}
    with tracing.incoming(headers):
        carried = tracing.inject()
    assert carried["traceparent"] == CALLER["traceparent"]
    with tracing.incoming({"traceparent": "not-a-traceparent"}):
        assert tracing.inject() == {}
