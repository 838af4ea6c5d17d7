"""A start over HTTP with a `traceparent` header joins the caller's trace.

The real API app over `DirectService` on real Postgres, called with aiohttp: the
execution span is a child of the caller's span, and the trace stored with the run is
the caller's, so every later step span lands in it. Without the header the run is a
trace of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import asyncpg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_orchestrator import harness_on
from test_tracing import CALLER_SPAN, CALLER_TRACE, SAGA, by_name, span_exporter

from sagaflow.api.app import make_app
from sagaflow.api.auth import LoopbackOnly
from sagaflow.api.server import serve
from sagaflow.api.service import DirectService
from sagaflow.core.manifests import WorkflowSpec

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = span_exporter()
    yield exporter
    exporter.shutdown()


async def test_the_start_route_takes_the_callers_traceparent(
    pg_pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    async with harness_on(pg_pool) as h:
        await h.orchestrator.apply_workflow("shop", "saga", SAGA)
        app = make_app(DirectService(h.orchestrator), LoopbackOnly())
        async with serve(app, "127.0.0.1", 0) as served, aiohttp.ClientSession() as http:
            url = f"{served.url}/v1/namespaces/shop/workflows/saga/executions"
            header = {"TraceParent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            for name, headers in (("joined", header), ("alone", {})):
                body = {"name": name, "input": {}}
                async with http.post(url, json=body, headers=headers) as answer:
                    assert answer.status == 201, await answer.text()
        async with pg_pool.acquire() as conn:
            joined = await h.store.get_execution(conn, "shop", "joined")
            alone = await h.store.get_execution(conn, "shop", "alone")
    assert joined is not None and alone is not None
    assert joined.traceparent is not None and CALLER_TRACE in joined.traceparent
    assert alone.traceparent is not None and CALLER_TRACE not in alone.traceparent
    executions = {
        s.attributes["sagaflow.execution"]: s  # type: ignore[index]
        for s in by_name(list(spans.get_finished_spans()), "sagaflow.execution ")
    }
    started = executions["shop/joined"]
    assert started.parent is not None
    assert format(started.parent.span_id, "016x") == CALLER_SPAN
    assert format(started.context.trace_id, "032x") == CALLER_TRACE  # type: ignore[union-attr]
    assert executions["shop/alone"].parent is None


async def test_signals_and_control_requests_are_spans_of_the_run_linked_to_the_caller(
    pg_pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    gate = WorkflowSpec.model_validate(
        {
            "signals": [{"name": "go"}],
            "steps": [
                {"name": "wait", "type": "sagaflow.waitForSignal", "input": {"signal": "go"}}
            ],
        }
    )
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    async with harness_on(pg_pool) as h:
        await h.orchestrator.apply_workflow("shop", "gate", gate)
        state, _ = await h.orchestrator.start("shop", "gated", "gate", {})  # a trace of its own
        app = make_app(DirectService(h.orchestrator), LoopbackOnly())
        async with serve(app, "127.0.0.1", 0) as served, aiohttp.ClientSession() as http:
            run = f"{served.url}/v1/namespaces/shop/executions/gated"
            async with http.post(f"{run}:suspend", headers=caller) as answer:
                assert answer.status == 200, await answer.text()
            async with http.post(f"{run}:resume") as answer:
                assert answer.status == 200, await answer.text()
            signal = {**caller, "Idempotency-Key": "go-1"}
            async with http.post(f"{run}/signals/go", json={}, headers=signal) as answer:
                assert answer.status == 200, await answer.text()
    assert state.traceparent is not None
    run_trace = state.traceparent.split("-")[1]
    requests = by_name(list(spans.get_finished_spans()), "sagaflow.request ")
    assert [s.name for s in requests] == [
        "sagaflow.request Suspend",
        "sagaflow.request Resume",
        "sagaflow.request SignalReceived",
    ]
    for span in requests:
        assert format(span.context.trace_id, "032x") == run_trace  # type: ignore[union-attr]
        assert span.attributes is not None
        assert span.attributes["sagaflow.execution"] == "shop/gated"
    suspend, resume, signalled = requests
    assert [format(link.context.span_id, "016x") for link in suspend.links] == [CALLER_SPAN]
    assert list(resume.links) == []  # no caller's trace, no link
    assert signalled.attributes["sagaflow.signal"] == "go"  # type: ignore[index]
    assert signalled.attributes["sagaflow.request_id"] == "signal/" + state.execution_id + "/go-1"  # type: ignore[index]
    assert [format(link.context.trace_id, "032x") for link in signalled.links] == [CALLER_TRACE]
