"""OpenTelemetry tracing: one trace per execution, carried by W3C `traceparent` headers.

What the trace of an execution looks like:
- `sagaflow.execution <workflow>`: made when the run starts, under the caller's trace
  when the start came with one (an HTTP `traceparent` header on a start request, a
  trigger's message or webhook request: `incoming`), else a new root;
- `sagaflow.step <step>`: one per attempt the orchestrator dispatches (retries and
  compensations included), a child of the execution's span; its context travels in
  the command's `traceparent` header;
- `sagaflow.handler <type>`: the runner host's span around the handler, a child of
  the attempt's span, current while the handler runs, so spans the handler opens with
  the plain OpenTelemetry API nest under it; the result event carries its context;
- `sagaflow.apply <step>`: the orchestrator applying that result, under the handler's
  span;
- `sagaflow.request <kind>`: a signal or a control request applied to the run, in
  the run's trace, linked to the caller's (a request belongs to the run it changes).

The execution's trace context is a field of `ExecutionState` (`traceparent`), not a
column: the state document is what every transition already reads and locks, so no
query changes and the trace outlives every process that worked on the run.

No span stays open across a transaction or a process: a span made inside an
orchestrator transaction (`deferred`) is ended when the transaction commits and
dropped, never exported, when it rolls back, so a retried transaction does not leave
spans nothing refers to. A span that covers a wait (an attempt, from dispatch to its
result) would need to stay open across processes; the attempt's span marks the
dispatch instead, and the handler's span how long the work took.

Only the OpenTelemetry API is used until `configure` installs the SDK with an OTLP
exporter (`SAGAFLOW_OTLP_ENDPOINT`); unconfigured, spans are the API's no-op, yet an
incoming trace context is still passed on unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagaflow.core.messages import ExecuteStep, StepResult
from sagaflow.core.state import ExecutionState

if TYPE_CHECKING:
    from sagaflow.settings import Settings

__all__ = [
    "TRACEPARENT",
    "applying",
    "configure",
    "deferred",
    "extract",
    "handler_span",
    "incoming",
    "inject",
    "record_result",
    "start_execution",
    "step_headers",
]

TRACEPARENT = "traceparent"
INSTRUMENTATION = "sagaflow"

_PROPAGATOR = TraceContextTextMapPropagator()
# Spans made in the current orchestrator transaction, ended once it commits (`deferred`).
_PENDING: ContextVar[list[Span] | None] = ContextVar("sagaflow_pending_spans", default=None)


def _tracer() -> trace.Tracer:
    # Looked up per use: the provider may be installed after this module is imported.
    return trace.get_tracer(INSTRUMENTATION)


# -- propagation ------------------------------------------------------------------------


def inject(ctx: Context | None = None) -> dict[str, str]:
    """The W3C trace headers (`traceparent`, and `tracestate` when there is one) of `ctx`
    (default: the current context); empty when it holds no valid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def extract(headers: Mapping[str, str] | None) -> Context:
    """The context `headers` carry (names in any case); an empty context when they carry
    no valid `traceparent`, so whatever starts under it is a new root."""
    if not headers:
        return Context()
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    return _PROPAGATOR.extract(lowered, context=Context())


def _parent(traceparent: str | None) -> Context:
    return extract({TRACEPARENT: traceparent} if traceparent else None)


def _traceparent(span: Span) -> str | None:
    return inject(trace.set_span_in_context(span)).get(TRACEPARENT)


@contextlib.contextmanager
def incoming(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Make the trace `headers` carry current for the block (a start request, a trigger's
    message): an execution started in it joins that trace. Without a valid
    `traceparent`, the current context is left as it is."""
    ctx = extract(headers)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


# -- spans inside orchestrator transactions ----------------------------------------------


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Spans finished in the block end when it exits cleanly, and are dropped (never
    ended, so never exported) when it raises: wrap a transaction in it."""
    spans: list[Span] = []
    token = _PENDING.set(spans)
    try:
        yield
    finally:
        _PENDING.reset(token)
    for span in spans:  # not reached when the block raised
        span.end()


def _finish(span: Span) -> None:
    pending = _PENDING.get()
    if pending is None:
        span.end()
    else:
        pending.append(span)


def start_execution(state: ExecutionState, *, parent: str | None = None) -> str | None:
    """The trace context of a run that starts now: its `sagaflow.execution` span's, under
    `parent` (a traceparent) if given, else under the current context (`incoming`)."""
    ctx = _parent(parent) if parent else None
    span = _tracer().start_span(
        f"sagaflow.execution {state.workflow}",
        context=ctx,
        attributes={
            "sagaflow.execution_id": state.execution_id,
            "sagaflow.execution": state.key,
            "sagaflow.workflow": state.workflow,
            "sagaflow.workflow_version": state.version,
        },
    )
    _finish(span)
    return _traceparent(span)


def _attempt_attributes(cmd: ExecuteStep) -> dict[str, Any]:
    return {
        "sagaflow.execution_id": cmd.execution_id,
        "sagaflow.execution": cmd.execution,
        "sagaflow.step": cmd.step,
        "sagaflow.step_type": cmd.type,
        "sagaflow.attempt": cmd.attempt,
        "sagaflow.attempt_id": cmd.attempt_id,
        "sagaflow.compensation": cmd.compensation,
    }


def step_headers(state: ExecutionState, cmd: ExecuteStep) -> dict[str, str]:
    """The headers of a dispatched attempt's command: its `sagaflow.step` span (a child
    of the execution's), which this makes."""
    span = _tracer().start_span(
        f"sagaflow.step {cmd.step}",
        context=_parent(state.traceparent),
        kind=SpanKind.PRODUCER,
        attributes=_attempt_attributes(cmd),
    )
    _finish(span)
    return inject(trace.set_span_in_context(span))


@contextlib.contextmanager
def applying(
    state: ExecutionState, result: StepResult, headers: Mapping[str, str] | None
) -> Iterator[None]:
    """A `sagaflow.apply` span, current in the block, for applying `result`: a child of
    the handler span its event names, else of the execution's."""
    ctx = extract(headers)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        ctx = _parent(state.traceparent)
    span = _tracer().start_span(
        f"sagaflow.apply {result.step}",
        context=ctx,
        kind=SpanKind.CONSUMER,
        attributes={
            "sagaflow.execution_id": result.execution_id,
            "sagaflow.execution": state.key,
            "sagaflow.step": result.step,
            "sagaflow.attempt": result.attempt,
            "sagaflow.compensation": result.compensation,
            "sagaflow.result": result.kind,
        },
    )
    with trace.use_span(span, end_on_exit=False):
        yield
    _finish(span)


@contextlib.contextmanager
def requested(
    state: ExecutionState, kind: str, request_id: str, **attributes: Any
) -> Iterator[None]:
    """A `sagaflow.request <kind>` span for applying a signal or a control request to
    the run, in the run's trace; a caller's trace current here (an HTTP request's
    `traceparent`, a trigger's message) is linked, so both traces lead to the other."""
    caller = trace.get_current_span().get_span_context()
    links = [trace.Link(caller)] if caller.is_valid else None
    span = _tracer().start_span(
        f"sagaflow.request {kind}",
        context=_parent(state.traceparent),
        kind=SpanKind.CONSUMER,
        links=links,
        attributes={
            "sagaflow.execution_id": state.execution_id,
            "sagaflow.execution": state.key,
            "sagaflow.request_id": request_id,
            **{f"sagaflow.{k}": v for k, v in attributes.items()},
        },
    )
    with trace.use_span(span, end_on_exit=False):
        yield
    _finish(span)


# -- the runner host -------------------------------------------------------------------


@contextlib.contextmanager
def handler_span(cmd: ExecuteStep, headers: Mapping[str, str] | None) -> Iterator[Span]:
    """The `sagaflow.handler` span of running `cmd`, current in the block (spans the
    handler opens nest under it), a child of the attempt span its command names."""
    with _tracer().start_as_current_span(
        f"sagaflow.handler {cmd.type}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes=_attempt_attributes(cmd),
    ) as span:
        yield span


def record_result(span: Span, result: StepResult | None) -> dict[str, str]:
    """Note the attempt's outcome on its handler span; the result event's headers."""
    if result is None:
        span.set_attribute("sagaflow.result", "DeadlinePassed")
    else:
        span.set_attribute("sagaflow.result", result.kind)
        if result.kind == "StepFailed":
            description = f"{result.error_type}: {result.error_message}"
            span.set_status(Status(StatusCode.ERROR, description[:500]))
    return inject(trace.set_span_in_context(span))


# -- set-up ----------------------------------------------------------------------------


def configure(settings: Settings) -> bool:
    """Install the SDK with an OTLP/HTTP exporter when `otlp_endpoint` is set; whether it
    did. The SDK is imported only then: unconfigured, the API's no-op is all there is."""
    if not settings.otlp_endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otlp_service_name}))
    endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    # The provider flushes its batch on interpreter exit (shutdown_on_exit).
    trace.set_tracer_provider(provider)
    return True
