"""Traces exported for real: the operator and a runner as processes, spans over OTLP/HTTP.

`SAGAFLOW_OTLP_ENDPOINT` points both processes at a collector in this test, which
decodes what the OpenTelemetry SDK's exporter sends. An Execution object carrying a
`sagaflow.io/traceparent` annotation (as the API and triggers write in a cluster)
runs the README sample's order: its spans arrive from both processes in the
caller's trace, the handler spans under the operator's step spans.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from operator_proc import running
from test_operator import Cluster, phase_is, sample_documents
from tests.support.kube import EXECUTIONS, WORKFLOWS, KubeClient, is_watch_of, running_api_server

from sagaflow.api.server import serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"


class Collector:
    """An OTLP/HTTP trace endpoint keeping (service, span) of every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.changed = asyncio.Event()

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            names = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                self.spans += [(names.get("service.name", ""), s) for s in scope.spans]
        self.changed.set()
        return web.Response(content_type="application/x-protobuf")

    async def wait_for(self, count: int, prefix: str, within: float) -> None:
        try:
            async with asyncio.timeout(within):
                while len(self.named(prefix)) < count:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            seen = sorted((svc, s.name) for svc, s in self.spans)  # type: ignore[attr-defined]
            raise AssertionError(f"{count} spans {prefix}*: not within {within}s; {seen}") from None

    def named(self, prefix: str) -> list[tuple[str, object]]:
        return [(svc, s) for svc, s in self.spans if s.name.startswith(prefix)]  # type: ignore[attr-defined]


@pytest.fixture
async def traced(pg_database: str, tmp_path: Path) -> AsyncIterator[tuple[Cluster, Collector]]:
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.traces)
    async with (
        serve(app, "127.0.0.1", 0) as sink,
        running_api_server() as api,
        KubeClient(api.url) as client,
    ):
        c = Cluster(api, client, pg_database, tmp_path)
        for proc, service in ((c.operator, "sagaflow-operator"), (c.runner, "orders")):
            proc.env = {  # a copy each: the two processes share one env dict
                **proc.env,
                "SAGAFLOW_OTLP_ENDPOINT": sink.url,
                "SAGAFLOW_OTLP_SERVICE_NAME": service,
                "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the 5 s default
            }
        async with running(c.operator, c.runner):
            await api.wait_for_request(is_watch_of(EXECUTIONS), within=30)
            yield c, collector


async def test_an_execution_object_with_a_traceparent_is_traced_in_that_trace(
    traced: tuple[Cluster, Collector],
) -> None:
    cluster, collector = traced
    docs = sample_documents()
    [wf] = [d for d in docs if d["kind"] == "Workflow"]
    [order, *_] = [d for d in docs if d["kind"] == "Execution"]
    order["metadata"]["annotations"] = {"sagaflow.io/traceparent": f"00-{TRACE}-{CALLER}-01"}
    await cluster.apply(WORKFLOWS, wf)
    await cluster.apply(EXECUTIONS, order)
    name = order["metadata"]["name"]
    done = await cluster.wait_status(EXECUTIONS, name, phase_is("Completed", "Failed"))
    assert done["status"]["phase"] == "Completed"

    # Four steps run by the runner, the flaky charge twice: five attempts, five handlers
    # (`confirm` is a sagaflow.pass step, settled by the orchestrator itself).
    await collector.wait_for(5, "sagaflow.handler ", within=30)
    await collector.wait_for(5, "sagaflow.step ", within=30)
    mine = [(svc, s) for svc, s in collector.spans if s.trace_id.hex() == TRACE]  # type: ignore[attr-defined]
    [(service, execution)] = [(v, s) for v, s in mine if s.name.startswith("sagaflow.execution")]
    assert service == "sagaflow-operator"
    assert execution.parent_span_id.hex() == CALLER  # type: ignore[attr-defined]
    steps = {s.span_id: s for v, s in mine if s.name.startswith("sagaflow.step ")}  # type: ignore[attr-defined]
    handlers = [(v, s) for v, s in mine if s.name.startswith("sagaflow.handler ")]
    assert len(steps) == 5 and len(handlers) == 5
    assert {v for v, _ in handlers} == {"orders"}  # from the runner process
    assert all(h.parent_span_id in steps for _, h in handlers)  # type: ignore[attr-defined]
    assert all(s.parent_span_id == execution.span_id for s in steps.values())  # type: ignore[attr-defined]
    applies = [(v, s) for v, s in mine if s.name.startswith("sagaflow.apply ")]
    assert {v for v, _ in applies} == {"sagaflow-operator"} and len(applies) == 5
