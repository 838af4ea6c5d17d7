"""Starting executions: once per uid or name, many to a transaction.

A start inserts the execution row and applies `Start` in the same transaction, so
an execution never exists without its first dispatches. Starts are idempotent: by
the custom resource's uid in a cluster, by (namespace, name) elsewhere; a repeat
returns the execution that exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagaflow.adapters.postgres.store import Applied, new_execution_id
from sagaflow.core.engine import decide
from sagaflow.core.facts import Start
from sagaflow.core.state import ExecutionState, new_execution

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator


class NameInUseError(Exception):
    """Another live execution holds the name a new one was to start under."""


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


async def start(
    o: Orchestrator, request: StartRequest, execution_id: str | None
) -> tuple[ExecutionState, bool]:
    """Start an execution once; a repeated start returns the existing one unchanged.

    Keyed by `execution_id` when given (a custom resource's uid), else by the
    name. NameInUseError when another live execution holds the name.
    """
    namespace, name, workflow = request.namespace, request.name, request.workflow
    now = o.clock()
    async with o._transaction() as tx:
        conn = tx.conn
        existing = await _find(o, conn, namespace, name, execution_id)
        if existing is not None:
            return existing, False
        version = await o.store.current_version(conn, namespace, workflow)
        if version is None:
            raise LookupError(f"workflow {namespace}/{workflow} does not exist")
        definition = await o.store.definition(conn, namespace, workflow, version)
        state = new_execution(
            execution_id=execution_id or new_execution_id(),
            namespace=namespace,
            name=name,
            workflow=workflow,
            version=version,
            input=request.input,
            step_names=definition.step_names,
        )
        if not await o.store.insert_execution(conn, state, now):
            found = await _find(o, conn, namespace, name, execution_id)
            if found is None:
                raise NameInUseError(f"execution {namespace}/{name} is held by another run")
            return found, False
        decision = decide(state, definition, Start(request.suspend), now)
        await o._commit(tx, [Applied(state.execution_id, decision)], now)
    return decision.state, True


async def start_many(o: Orchestrator, requests: Sequence[StartRequest]) -> list[ExecutionState]:
    """Start many executions by name in one transaction (idempotent like `start`):
    the state of each, started now or found. LookupError for an unknown workflow."""
    now = o.clock()
    async with o._transaction() as tx:
        conn = tx.conn
        found = await o.store.live_executions(conn, [(r.namespace, r.name) for r in requests])
        new: list[tuple[ExecutionState, Any, bool]] = []
        definitions: dict[tuple[str, str], Any] = {}
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
            state = new_execution(
                execution_id=new_execution_id(),
                namespace=r.namespace,
                name=r.name,
                workflow=r.workflow,
                version=definition.version,
                input=r.input,
                step_names=definition.step_names,
            )
            new.append((state, definition, r.suspend))
        inserted = await o.store.insert_executions(conn, [s for s, _, _ in new], now)
        decisions = [
            decide(state, definition, Start(suspend), now)
            for state, definition, suspend in new
            if state.execution_id in inserted
        ]
        await o._commit(tx, [Applied(d.state.execution_id, d) for d in decisions], now)
    started = {(d.state.namespace, d.state.name): d.state for d in decisions}
    if len(started) + len(found) < len(requests):
        async with o.pool.acquire() as conn:  # lost a race for a name: read the winner
            found |= await o.store.live_executions(conn, [(r.namespace, r.name) for r in requests])
    return [started.get((r.namespace, r.name)) or found[(r.namespace, r.name)] for r in requests]


async def _find(
    o: Orchestrator, conn: Any, namespace: str, name: str, execution_id: str | None
) -> ExecutionState | None:
    if execution_id is not None:
        return await o.store.get_execution_by_id(conn, execution_id)
    return await o.store.get_execution(conn, namespace, name)
