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
