"""The one start path: every trigger (HTTP, schedule, queue, webhook, CLI) ends here.

A `StartCall` names the workflow, namespace, input, an idempotency key, and optionally
the run's name and correlation key, and where it came from (`Source`). The same key
always yields the same execution: a repeat with the same request returns the run
that exists (`created` false), a different request under a used key is refused
(`IdempotencyConflictError`). The key's row (`sagaflow_start_keys`, migration 0008)
commits in the start's own transaction, so a start and its key never part.

`Launcher` is how schedules and triggers start runs without knowing where they run:
`DirectLauncher` starts in Postgres; in a cluster `sagaflow.kube.launcher` creates
Execution objects instead (the operator then starts them here, with their key).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sagaflow.core.facts import Cancel
from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.state import ExecutionState
from sagaflow.runtime import control, starts
from sagaflow.runtime.starts import StartKey, StartRequest

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator


class IdempotencyConflictError(Exception):
    """A different request was sent under an idempotency key already used."""

    def __init__(self, namespace: str, key: str, holder: str) -> None:
        self.namespace, self.key, self.holder = namespace, key, holder
        super().__init__(
            f"idempotency key {key!r} was used by a different request, which started "
            f"execution {namespace}/{holder}; send the same request again, or use a new key"
        )


@dataclass(frozen=True, slots=True)
class Source:
    """What started a run: `api`, `cli`, `schedule` or `trigger`, and which one."""

    kind: str
    name: str = ""
    uid: str = ""


@dataclass(frozen=True, slots=True)
class StartCall:
    namespace: str
    workflow: str
    input: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    name: str | None = None
    correlation_key: str | None = None
    source: Source = Source("api")
    suspend: bool = False

    def request_hash(self) -> str:
        """What makes two calls the same request (the source and key do not)."""
        body = {
            "workflow": self.workflow,
            "input": self.input,
            "name": self.name,
            "correlationKey": self.correlation_key,
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def run_name(self) -> str | None:
        """The name asked for, else one derived from the key (so every replica and every
        repeat picks the same), else None: the start path makes a fresh one."""
        if self.name:
            return self.name
        if self.idempotency_key is None:
            return None
        digest = hashlib.sha256(f"{self.namespace}/{self.idempotency_key}".encode()).hexdigest()
        return f"{self.workflow[:52]}-{digest[:10]}"


class Launcher(Protocol):
    """Starts runs for schedules and triggers, and answers what they need to know."""

    async def start(self, call: StartCall) -> tuple[str, bool]:
        """Start once per key: the run's name, and whether this call created it.
        LookupError for an unknown workflow, IdempotencyConflictError, and
        CorrelationKeyInUseError (runtime.starts) as the start path says."""
        ...

    async def active(self, namespace: str, source: Source) -> list[str]:
        """Names of the runs `source` started that have not finished, oldest first."""
        ...

    async def cancel(self, namespace: str, name: str, reason: str) -> None:
        """Ask for a run to be cancelled (what it did is undone)."""
        ...


def start_request(call: StartCall) -> StartRequest:
    """The runtime's start request for `call` (with its key, if it has one)."""
    key = None
    if call.idempotency_key is not None:
        source = call.source
        key = StartKey(
            call.idempotency_key, call.request_hash(), source.kind, source.name, source.uid
        )
    name = call.run_name() or f"{call.workflow[:52]}-{uuid.uuid4().hex[:10]}"
    return StartRequest(
        call.namespace,
        name,
        call.workflow,
        call.input,
        suspend=call.suspend,
        correlation_key=call.correlation_key,
        start_key=key,
    )


async def start_call(o: Orchestrator, call: StartCall) -> tuple[ExecutionState, bool]:
    """Start `call` once: the execution, and whether this call created it.

    LookupError for an unknown workflow; IdempotencyConflictError, NameInUseError and
    CorrelationKeyInUseError (`starts.py`) for a start that may not happen."""
    try:
        return await starts.start(o, start_request(call), None)
    except starts.KeyUsedError as exc:
        raise IdempotencyConflictError(
            call.namespace, call.idempotency_key or "", exc.holder
        ) from None


class DirectLauncher:
    """Starts runs in Postgres, through the start path (`sagaflow server`, `sagaflow run`)."""

    def __init__(self, o: Orchestrator) -> None:
        self._o = o

    async def start(self, call: StartCall) -> tuple[str, bool]:
        state, created = await start_call(self._o, call)
        return state.name, created

    async def active(self, namespace: str, source: Source) -> list[str]:
        by, value = ("source_uid", source.uid) if source.uid else ("source_name", source.name)
        async with self._o.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT e.name FROM sagaflow_start_keys k JOIN sagaflow_executions e "
                "ON e.execution_id = k.execution_id WHERE k.namespace = $1 "
                f"AND k.source_kind = $2 AND k.{by} = $3 AND NOT (e.phase = ANY($4::text[])) "
                "ORDER BY e.created_at, e.execution_id",
                namespace,
                source.kind,
                value,
                _FINISHED,
            )
        return [r["name"] for r in rows]

    async def cancel(self, namespace: str, name: str, reason: str) -> None:
        await self._o.control(namespace, name, Cancel(reason), control.request_id())


# A run of a schedule is over once nothing more happens by itself (settled counts:
# a CompensationFailed run waits for a person, not for the next tick).
_FINISHED = [p.value for p in ExecutionPhase if p.at_rest and p is not ExecutionPhase.SUSPENDED]
