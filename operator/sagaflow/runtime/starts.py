"""Starting executions: once per uid or name, many to a transaction.

A start inserts the execution row and applies `Start` in the same transaction, so
an execution never exists without its first dispatches. Starts are idempotent: by
the custom resource's uid in a cluster, by (namespace, name) elsewhere; a repeat
returns the execution that exists.

Two rules between executions apply here (the schema is `0006_coordination.sql`):
- `spec.concurrency.maxExecutions`: a start of a limited workflow takes its admission
  lock, and the new execution starts only if a slot is free and nobody waits before
  it; otherwise it is stored Pending, waiting (`admission.py`);
- `spec.correlationKey`: at most one unfinished execution of a workflow per namespace
  holds a key; a start with a key already held is refused (`CorrelationKeyInUseError`,
  naming the key and the holder), and a repeat of the holder's own start is not one.
  A unique index decides races between replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sagaflow.adapters.postgres import admission_sql
from sagaflow.adapters.postgres.store import new_execution_id
from sagaflow.core.definition import Definition
from sagaflow.core.state import ExecutionState, new_execution
from sagaflow.runtime.admission import Gate
from sagaflow.telemetry import tracing

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator


class NameInUseError(Exception):
    """Another live execution holds the name a new one was to start under."""


class CorrelationKeyInUseError(Exception):
    """An unfinished execution of the workflow holds the `spec.correlationKey` of a start.

    `reason` says it without naming the refused execution (callers prefix where it came
    from: a file and document, an object); `str()` names it too.
    """

    def __init__(self, request: StartRequest, holder: str, holder_phase: str | None) -> None:
        self.request, self.holder, self.holder_phase = request, holder, holder_phase
        held = f"execution {holder} ({holder_phase})" if holder_phase else f"execution {holder}"
        self.reason = (
            f"correlation key {request.correlation_key!r} is held by {held} of workflow "
            f"{request.workflow}, which has not finished; the key may be used again once "
            "it has"
        )
        where = f"execution {request.namespace}/{request.name}"
        super().__init__(f"{where}: spec.correlationKey: {self.reason}")


@dataclass(frozen=True, slots=True)
class StartRequest:
    namespace: str
    name: str
    workflow: str
    input: dict[str, Any]
    suspend: bool = False  # created suspended (spec.suspend)
    # Asked for in the manifest, applied once the run exists (spec.cancel, spec.skipCompensation).
    cancel: bool = False
    skip_compensation: tuple[str, ...] = ()
    correlation_key: str | None = None  # spec.correlationKey
    # The start path's idempotency key (`startpath.py`), recorded with the start.
    start_key: StartKey | None = None


@dataclass(frozen=True, slots=True)
class StartKey:
    key: str
    request_hash: str
    source_kind: str
    source_name: str = ""
    source_uid: str = ""


class _KeyTaken(Exception):
    """Raised inside a start's transaction to roll it back: the key went to another."""

    def __init__(self, execution_id: str, request_hash: str) -> None:
        self.execution_id, self.request_hash = execution_id, request_hash


async def start(
    o: Orchestrator, request: StartRequest, execution_id: str | None
) -> tuple[ExecutionState, bool]:
    """Start an execution once; a repeated start returns the existing one unchanged.

    Keyed by the request's idempotency key when it has one (a different request under
    the key: KeyUsedError), then by `execution_id` when given (a custom resource's
    uid), else by the name. NameInUseError when another live execution holds the name,
    CorrelationKeyInUseError when another unfinished one holds the correlation key.
    """
    try:
        return await _start(o, request, execution_id)
    except _KeyTaken as taken:  # lost a race for the key: the winner's run is the answer
        return await _keyed(o, request, taken.execution_id, taken.request_hash), False


class KeyUsedError(Exception):
    """A different request was started under the idempotency key (`holder` is its run)."""

    def __init__(self, request: StartRequest, holder: str) -> None:
        self.request, self.holder = request, holder
        super().__init__(holder)


async def _keyed(
    o: Orchestrator, request: StartRequest, execution_id: str, request_hash: str
) -> ExecutionState:
    async with o.pool.acquire() as conn:
        state = await o.store.get_execution_by_id(conn, execution_id)
    assert state is not None  # the key's row cascades with its execution
    if request.start_key is None or request_hash != request.start_key.request_hash:
        raise KeyUsedError(request, state.name)
    return state


async def _start(
    o: Orchestrator, request: StartRequest, execution_id: str | None
) -> tuple[ExecutionState, bool]:
    namespace, name, workflow = request.namespace, request.name, request.workflow
    now = o.clock()
    async with o._transaction("start") as tx:
        conn = tx.conn
        if request.start_key is not None:
            held = await _key_row(conn, namespace, request.start_key.key)
            if held is not None:
                raise _KeyTaken(*held)
        existing = await _find(o, conn, namespace, name, execution_id)
        if existing is not None:
            return existing, False
        version = await o.store.current_version(conn, namespace, workflow)
        if version is None:
            raise LookupError(f"workflow {namespace}/{workflow} does not exist")
        definition = await o.store.definition(conn, namespace, workflow, version)
        gate = Gate(o, conn, now)
        await gate.lock(_limits([(request, definition)]))
        await _refuse_held_keys(conn, [request])
        state = _new_state(request, definition, execution_id)
        if not await o.store.insert_execution(conn, state, now):
            found = await _find(o, conn, namespace, name, execution_id)
            if found is None:
                await _refuse_held_keys(conn, [request])  # lost a race for the key
                raise NameInUseError(f"execution {namespace}/{name} is held by another run")
            return found, False
        if request.start_key is not None:
            await _record_key(conn, state.execution_id, namespace, request.start_key, now)
        admitted = await gate.admit_waiting(o.batch_size)
        placed = gate.place(state, definition, request.suspend)
        await gate.enqueue()
        await o._commit(tx, [*admitted, placed], now)
    return placed.decision.state, True


async def start_many(o: Orchestrator, requests: Sequence[StartRequest]) -> list[ExecutionState]:
    """Start many executions by name in one transaction (idempotent like `start`):
    the state of each, started now or found. LookupError for an unknown workflow,
    CorrelationKeyInUseError (nothing started) for a correlation key already held."""
    now = o.clock()
    async with o._transaction("start") as tx:
        conn = tx.conn
        found = await o.store.live_executions(conn, [(r.namespace, r.name) for r in requests])
        new: list[tuple[ExecutionState, Definition, StartRequest]] = []
        definitions: dict[tuple[str, str], Definition] = {}
        for r in requests:
            if (r.namespace, r.name) in found:
                continue
            definition = definitions.get((r.namespace, r.workflow))
            if definition is None:
                version = await o.store.current_version(conn, r.namespace, r.workflow)
                if version is None:
                    raise LookupError(f"workflow {r.namespace}/{r.workflow} does not exist")
                definition = await o.store.definition(conn, r.namespace, r.workflow, version)
                definitions[(r.namespace, r.workflow)] = definition
            new.append((_new_state(r, definition, None), definition, r))
        gate = Gate(o, conn, now)
        await gate.lock(_limits((r, d) for _, d, r in new))
        await _refuse_held_keys(conn, [r for _, _, r in new])
        inserted = await o.store.insert_executions(conn, [s for s, _, _ in new], now)
        await _refuse_held_keys(conn, [r for s, _, r in new if s.execution_id not in inserted])
        admitted = await gate.admit_waiting(o.batch_size)
        applied = [
            gate.place(state, definition, r.suspend)
            for state, definition, r in new
            if state.execution_id in inserted
        ]
        await gate.enqueue()
        await o._commit(tx, [*admitted, *applied], now)
    states = [a.decision.state for a in applied]
    started = {(s.namespace, s.name): s for s in states}
    if len(started) + len(found) < len(requests):
        async with o.pool.acquire() as conn:  # lost a race for a name: read the winner
            found |= await o.store.live_executions(conn, [(r.namespace, r.name) for r in requests])
    return [started.get((r.namespace, r.name)) or found[(r.namespace, r.name)] for r in requests]


async def correlation_conflicts(
    o: Orchestrator, requests: Sequence[StartRequest]
) -> list[CorrelationKeyInUseError]:
    """Every request that would be refused for its correlation key, before starting any:
    held by an unfinished execution other than itself, or by an earlier request."""
    keyed = [r for r in requests if r.correlation_key is not None]
    async with o.pool.acquire() as conn:
        holders = await admission_sql.key_holders(conn, [_key(r) for r in keyed])
    return _conflicts(keyed, holders)


def _conflicts(
    requests: Sequence[StartRequest], holders: dict[tuple[str, str, str], ExecutionState]
) -> list[CorrelationKeyInUseError]:
    conflicts: list[CorrelationKeyInUseError] = []
    first: dict[tuple[str, str, str], StartRequest] = {}
    for r in requests:
        key = _key(r)
        holder = holders.get(key)
        if holder is not None and (holder.namespace, holder.name) != (r.namespace, r.name):
            held_by = f"{holder.namespace}/{holder.name}"
            conflicts.append(CorrelationKeyInUseError(r, held_by, holder.phase.value))
        elif key in first and holder is None:
            earlier = first[key]
            conflicts.append(
                CorrelationKeyInUseError(r, f"{earlier.namespace}/{earlier.name}", "starting")
            )
        first.setdefault(key, r)
    return conflicts


async def _refuse_held_keys(conn: Any, requests: Sequence[StartRequest]) -> None:
    keyed = [r for r in requests if r.correlation_key is not None]
    if not keyed:
        return
    conflicts = _conflicts(keyed, await admission_sql.key_holders(conn, [_key(r) for r in keyed]))
    if conflicts:
        raise conflicts[0]


async def _key_row(conn: Any, namespace: str, key: str) -> tuple[str, str] | None:
    row = await conn.fetchrow(
        "SELECT execution_id, request_hash FROM sagaflow_start_keys "
        "WHERE namespace = $1 AND key = $2",
        namespace,
        key,
    )
    return None if row is None else (row["execution_id"], row["request_hash"])


async def _record_key(
    conn: Any, execution_id: str, namespace: str, key: StartKey, now: Any
) -> None:
    """The key's row, in the start's transaction. A concurrent start under the same key
    waits here for the other to commit, then finds the row taken: `_KeyTaken` rolls
    this start back, and the caller answers with the winner's run."""
    inserted = await conn.fetchval(
        "INSERT INTO sagaflow_start_keys (namespace, key, request_hash, execution_id, "
        "source_kind, source_name, source_uid, created_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING key",
        namespace,
        key.key,
        key.request_hash,
        execution_id,
        key.source_kind,
        key.source_name,
        key.source_uid,
        now,
    )
    if inserted is None:
        held = await _key_row(conn, namespace, key.key)
        assert held is not None  # keys are deleted only with their execution
        raise _KeyTaken(*held)


def _key(request: StartRequest) -> tuple[str, str, str]:
    return (request.namespace, request.workflow, request.correlation_key or "")


def _limits(
    items: Iterable[tuple[StartRequest, Definition]],
) -> dict[tuple[str, str], int | None]:
    """The limited workflows among these starts, with their limits."""
    return {
        (r.namespace, r.workflow): d.max_executions
        for r, d in items
        if d.max_executions is not None
    }


def _new_state(
    request: StartRequest, definition: Definition, execution_id: str | None
) -> ExecutionState:
    state = new_execution(
        execution_id=execution_id or new_execution_id(),
        namespace=request.namespace,
        name=request.name,
        workflow=request.workflow,
        version=definition.version,
        input=request.input,
        step_names=definition.step_names,
    )
    # Under the caller's trace when it came with one (`tracing.incoming`).
    trace = tracing.start_execution(state)
    return replace(state, correlation_key=request.correlation_key, traceparent=trace)


async def _find(
    o: Orchestrator, conn: Any, namespace: str, name: str, execution_id: str | None
) -> ExecutionState | None:
    if execution_id is not None:
        return await o.store.get_execution_by_id(conn, execution_id)
    return await o.store.get_execution(conn, namespace, name)
