"""kopf handlers: Workflow objects become stored versions, Execution objects runs.

- Workflow (created, changed, or found at start-up): validated by the same
  validator as local mode. A valid spec is stored as an immutable version (an
  unchanged spec reuses its version) and `Ready=True`; an invalid one sets
  `Ready=False` naming every bad field and leaves the last good version serving.
  `status.observedGeneration` says which generation the verdict is about. A stored
  spec also runs an admission pass for the workflow (a raised concurrency limit lets
  waiting runs start); a pass over every workflow runs every few seconds besides.
- Workflow deleted (finalizer): no version is current any more, so new Executions
  of it wait; running ones finish on the version they pinned.
- Execution (created, or found at start-up): started in Postgres keyed by the
  object's uid, so a repeat is a no-op; the workflow version current at that
  moment is pinned. If the Workflow has no valid version yet, the status says so
  and the start is retried. From then on the status mirror owns the status. A new
  run starts suspended if `spec.suspend` says so, then takes `spec.skipCompensation`
  and `spec.cancel` as requests; `spec.redrive` is the baseline. A `spec.correlationKey`
  an unfinished run of the workflow holds is refused: `Ready=False` reason
  `CorrelationKeyInUse` and a Warning Event, not retried until the spec changes.
- Execution changed: changes of the control fields (`suspend`, `cancel`, `redrive`,
  `redriveToLatest`, `skipCompensation`) become control requests, once per change
  (`sagaflow.kube.control`); a new `ttlSecondsAfterFinished` applies; input and
  workflowRef stay as the run began, and a Warning Event says so. What is wrong
  with a change (a lowered `redrive`, an unknown step name) is a Warning Event and
  the `SpecAccepted` condition; a request the engine refuses is a Warning Event
  from the history. An object whose run never started (its spec was invalid) is
  started by the change.
- Execution objects of child executions (`kube/children.py`, annotated with the
  execution id) are not started: their run began with the parent's step; changes
  and deletion act on that run.
- Execution deleted (finalizer): the run is cancelled if it still goes forward
  (compensating per its workflow, without waiting for that), its name is released,
  its history stays in Postgres.

Handlers raise only for what a retry can fix (database or API trouble); bad specs
are reported in the status and Events, never retried. While the database is down a
handler fails with kopf's TemporaryError (one line, no traceback) and kopf retries it
a second later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import kopf

from sagaflow.adapters.postgres import mirror_rows
from sagaflow.core.manifests import API_GROUP, ExecutionPhase, ExecutionSpec
from sagaflow.core.ports import Clock, utc_now
from sagaflow.core.state import ExecutionState
from sagaflow.core.status import clip, condition, keep_transition_times
from sagaflow.core.validation import Document, validate_documents
from sagaflow.kube.api import (
    EXECUTION_ID,
    EXECUTIONS,
    VERSION,
    WORKFLOWS,
    execution_id_of,
)
from sagaflow.kube.control import (
    REDRIVE_SEEN,
    Plan,
    carry_out,
    parse_spec,
    plan_change,
    plan_start,
    redrive_seen,
    spec_condition,
)
from sagaflow.kube.launcher import TRACEPARENT, start_key_of
from sagaflow.runtime import admission, starts
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.outages import describe
from sagaflow.runtime.starts import CorrelationKeyInUseError, StartRequest
from sagaflow.telemetry import tracing

T = TypeVar("T")

# Only the fields a manifest carries: status and server-set metadata are not the spec.
_MANIFEST_KEYS = ("apiVersion", "kind", "metadata", "spec")


@dataclass(frozen=True)
class HandlerContext:
    orchestrator: Orchestrator
    pool: asyncpg.Pool
    workflow_wait_seconds: float = 5.0
    clock: Clock = utc_now


async def _unless_down(ctx: HandlerContext, call: Awaitable[T]) -> T:
    """`call`, with a database outage turned into a quiet retry by kopf."""
    try:
        return await call
    except Exception as exc:
        if not ctx.orchestrator.outages.failed(exc):
            raise
        message = f"the database is unavailable ({describe(exc)}); retrying"
        raise kopf.TemporaryError(message, delay=1.0) from None


def ready_condition(ctx: HandlerContext, status: str, reason: str, message: str) -> dict[str, Any]:
    return condition("Ready", status, reason, message, ctx.clock())


def _conditions(new: dict[str, Any], old_status: Any) -> list[dict[str, Any]]:
    old = old_status.get("conditions") if isinstance(old_status, dict) else None
    return keep_transition_times([new], old if isinstance(old, list) else None)


async def reconcile_workflow(
    ctx: HandlerContext,
    body: kopf.Body,
    patch: kopf.Patch,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    manifest = {key: body[key] for key in _MANIFEST_KEYS if key in body}
    result = validate_documents([Document(f"Workflow {namespace}/{name}", 1, manifest)])
    status = body.get("status") or {}
    patch.status["observedGeneration"] = meta.get("generation")
    if not result.ok:
        problems = "; ".join(f"{e.path}: {e.reason}" if e.path else e.reason for e in result.errors)
        kept = status.get("version")
        serving = f"; version {kept} keeps serving" if kept else ""
        logger.warning(f"invalid spec, not stored{serving}: {problems}")
        kopf.warn(body, reason="InvalidSpec", message=clip(f"not stored{serving}: {problems}"))
        condition = ready_condition(ctx, "False", "InvalidSpec", problems)
        patch.status["conditions"] = _conditions(condition, status)
        return
    workflow = result.workflows[0][1]
    version, created = await ctx.orchestrator.apply_workflow(namespace, name, workflow.spec)
    if created:
        logger.info(f"stored as version {version}")
    # A raised or removed concurrency limit lets waiting runs start now (and at start-up).
    await admission.sweep(ctx.orchestrator, [(namespace, name)])
    message = f"version {version} serves new executions"
    patch.status["version"] = version
    patch.status["conditions"] = _conditions(
        ready_condition(ctx, "True", "Accepted", message), status
    )


async def start_execution(
    ctx: HandlerContext,
    body: kopf.Body,
    patch: kopf.Patch,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    retry: int = 0,
    *,
    creating: bool = True,
) -> None:
    """Start the run (once); with `creating`, or when this call started it, make the
    requests the spec was created with. A resume after a restart makes none: they
    were made at creation, and every change since by `change_execution`."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    if EXECUTION_ID in (meta.get("annotations") or {}):
        return  # a child execution's object: the run started with its parent's step
    status = body.get("status") or {}
    spec = parse_spec(body.get("spec"))
    if isinstance(spec, list):
        problems = "; ".join(spec)
        logger.warning(f"invalid spec, not started: {problems}")
        kopf.warn(body, reason="InvalidSpec", message=clip(f"not started: {problems}"))
        patch.status["phase"] = "Pending"
        patch.status["conditions"] = _conditions(
            ready_condition(ctx, "False", "InvalidSpec", problems), status
        )
        return
    await _release_stale(ctx, namespace, name, uid)
    workflow = spec.workflow_ref.name
    request = StartRequest(
        namespace,
        name,
        workflow,
        dict(spec.input),
        suspend=spec.suspend,
        correlation_key=spec.correlation_key,
        start_key=start_key_of(body),
    )
    carried = {tracing.TRACEPARENT: (meta.get("annotations") or {}).get(TRACEPARENT, "")}
    try:
        with tracing.incoming(carried):
            state, created = await starts.start(ctx.orchestrator, request, uid)
    except starts.KeyUsedError as exc:
        # Another run holds the object's idempotency key (a different request): refused.
        reason = f"idempotency key {exc.request.start_key.key!r} started execution {exc.holder}"  # type: ignore[union-attr]
        logger.warning(f"not started: {reason}")
        kopf.warn(body, reason="IdempotencyKeyInUse", message=clip(reason))
        patch.status["phase"] = "Pending"
        patch.status["conditions"] = _conditions(
            ready_condition(ctx, "False", "IdempotencyKeyInUse", reason), status
        )
        return
    except CorrelationKeyInUseError as exc:
        # Refused, not retried: a change of the spec (or a new object) starts it again.
        logger.warning(f"not started: spec.correlationKey: {exc.reason}")
        kopf.warn(body, reason="CorrelationKeyInUse", message=clip(exc.reason))
        patch.status["phase"] = "Pending"
        patch.status["conditions"] = _conditions(
            ready_condition(ctx, "False", "CorrelationKeyInUse", exc.reason), status
        )
        return
    except LookupError:
        message = f"workflow {namespace}/{workflow} has no valid version yet"
        if retry == 0:  # one Event, not one per retry
            kopf.warn(body, reason="WorkflowNotReady", message=message)
        patch.status["phase"] = "Pending"
        patch.status["conditions"] = _conditions(
            ready_condition(ctx, "False", "WorkflowNotReady", message), status
        )
        raise kopf.TemporaryError(message, delay=ctx.workflow_wait_seconds) from None
    await _track(ctx, meta, spec, state)
    if created or creating:
        plan = plan_start(spec, state)
        await carry_out(ctx.orchestrator, meta, plan.asks, logger)
        _report(ctx, body, patch, plan, logger)


async def change_execution(
    ctx: HandlerContext,
    body: kopf.Body,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    patch: kopf.Patch,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    retry: int = 0,
) -> None:
    """A spec change: control requests, a new TTL, Warnings for what cannot be."""
    meta = body["metadata"]
    async with ctx.pool.acquire() as conn:
        state = await ctx.orchestrator.store.get_execution_by_id(conn, execution_id_of(meta))
    if state is None:  # never started: its spec was invalid, the new one may not be
        await start_execution(ctx, body, patch, logger, retry, creating=True)
        return
    old, new = old or {}, new or {}
    spec = parse_spec(new)
    plan = plan_change(old, new, spec, state, redrive_seen(meta))
    ttl = "ttlSecondsAfterFinished"
    if not isinstance(spec, list) and old.get(ttl) != new.get(ttl):
        await _track(ctx, meta, spec, state)
    await carry_out(ctx.orchestrator, meta, plan.asks, logger)
    _report(ctx, body, patch, plan, logger)


def _report(
    ctx: HandlerContext,
    body: kopf.Body,
    patch: kopf.Patch,
    plan: Plan,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """Warnings for the problems and ignored changes, and the `SpecAccepted` condition.
    Posted after the requests: a retry after a failed request does not post them twice."""
    for problem in plan.problems:
        logger.warning(f"invalid spec: {problem}")
        kopf.warn(body, reason="InvalidSpec", message=clip(problem))
    for ignored in plan.ignored:
        logger.info(ignored)
        kopf.warn(body, reason="SpecChangeIgnored", message=clip(ignored))
    meta = body["metadata"]
    if plan.redrive_seen > redrive_seen(meta):
        patch.metadata.annotations[REDRIVE_SEEN] = str(plan.redrive_seen)
    patch.fns.append(spec_condition(plan.problems, meta.get("generation"), ctx.clock()))


async def _track(
    ctx: HandlerContext, meta: Mapping[str, Any], spec: ExecutionSpec, state: ExecutionState
) -> None:
    """Mirror the run into its object, with the TTL the spec or else the workflow says."""
    async with ctx.pool.acquire() as conn:
        ttl = spec.ttl_seconds_after_finished
        if ttl is None:
            ttl = await mirror_rows.workflow_ttl(
                conn, state.namespace, state.workflow, state.version
            )
        await mirror_rows.track(conn, state.execution_id, meta["namespace"], meta["name"], ttl)


async def _release_stale(ctx: HandlerContext, namespace: str, name: str, uid: str) -> None:
    """Free the name from a run whose object is gone without its delete handler.

    Kubernetes names are unique, so a live run of this name with another uid
    belongs to an object deleted while its finalizer was removed by hand.
    """
    async with ctx.pool.acquire() as conn:
        holder = await mirror_rows.live_holder(conn, namespace, name)
    if holder is None or holder == uid:
        return
    await stop_execution(ctx, namespace, name, holder, "its object was replaced")


async def stop_execution(
    ctx: HandlerContext, namespace: str, name: str, uid: str, why: str
) -> None:
    """Cancel the run if it still goes forward (compensating per its workflow, without
    waiting for that), then release its name. History stays. A run already undoing, or
    whose compensation failed, is left as it is: a cancel would change nothing."""
    async with ctx.pool.acquire() as conn:
        state = await ctx.orchestrator.store.get_execution_by_id(conn, uid)
    going = (ExecutionPhase.PENDING, ExecutionPhase.RUNNING)
    if state is not None and state.underlying_phase in going:
        await ctx.orchestrator.cancel(namespace, name, why, execution_id=uid)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await mirror_rows.release(conn, uid, ctx.clock())


def build_registry(ctx: HandlerContext) -> kopf.OperatorRegistry:
    """A registry with the operator's handlers."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod the service account; elsewhere $KUBECONFIG or ~/.kube/config.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    sweeps: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    @kopf.on.startup(registry=registry)
    async def start_admission_passes(**_: Any) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(admission.sweep_every(ctx.orchestrator, stop))
        sweeps.append((stop, task))

    @kopf.on.cleanup(registry=registry)
    async def stop_admission_passes(**_: Any) -> None:
        while sweeps:
            stop, task = sweeps.pop()
            stop.set()
            await asyncio.gather(task, return_exceptions=True)

    @kopf.on.resume(API_GROUP, VERSION, WORKFLOWS, registry=registry)
    @kopf.on.create(API_GROUP, VERSION, WORKFLOWS, registry=registry)
    @kopf.on.update(API_GROUP, VERSION, WORKFLOWS, registry=registry, field="spec")
    async def workflow(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
        await _unless_down(ctx, reconcile_workflow(ctx, body, patch, logger))

    @kopf.on.delete(API_GROUP, VERSION, WORKFLOWS, registry=registry)
    async def workflow_deleted(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        await _unless_down(ctx, ctx.orchestrator.retire_workflow(meta["namespace"], meta["name"]))

    @kopf.on.resume(API_GROUP, VERSION, EXECUTIONS, registry=registry)
    @kopf.on.create(API_GROUP, VERSION, EXECUTIONS, registry=registry)
    async def execution(
        body: kopf.Body,
        patch: kopf.Patch,
        logger: Any,
        retry: int,
        reason: str,
        **_: Any,
    ) -> None:
        creating = reason == kopf.Reason.CREATE
        await _unless_down(ctx, start_execution(ctx, body, patch, logger, retry, creating=creating))

    @kopf.on.update(API_GROUP, VERSION, EXECUTIONS, registry=registry, field="spec")
    async def execution_spec_changed(
        body: kopf.Body,
        old: Any,
        new: Any,
        patch: kopf.Patch,
        logger: Any,
        retry: int,
        **_: Any,
    ) -> None:
        await _unless_down(ctx, change_execution(ctx, body, old, new, patch, logger, retry))

    @kopf.on.delete(API_GROUP, VERSION, EXECUTIONS, registry=registry)
    async def execution_deleted(body: kopf.Body, logger: Any, **_: Any) -> None:
        meta = body["metadata"]
        why = "Execution object deleted"
        await _unless_down(
            ctx, stop_execution(ctx, meta["namespace"], meta["name"], execution_id_of(meta), why)
        )
        logger.info("cancelled if running; name released, history kept")

    return registry
