"""`DirectService`: the `Sagaflow` interface over an orchestrator and its database.

What the API server calls for every route, and what the CLI calls when it is
given a state (`--state-dir`, SAGAFLOW_DATABASE_URL) rather than a server. It turns
the runtime's outcomes and exceptions into the contract's documents and
`ApiError`s, so both ways of reaching Sagaflow answer alike.

Starts go through the one start path (`runtime.startpath`) unless the service is
given another `starter` — in a cluster, the operator's API creates Execution
objects instead (`kube.launcher`), and the operator starts them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from sagaflow.adapters.postgres import api_reads
from sagaflow.api.contract import (
    CONTROL_VERBS,
    ApiError,
    Outcome,
    Page,
    Started,
    bad_request,
    conflict,
    not_found,
)
from sagaflow.core import replay
from sagaflow.core.facts import Cancel, Control, Redrive, Resume, SkipCompensation, Suspend
from sagaflow.core.manifests import API_VERSION, NAME_PATTERN, ExecutionPhase
from sagaflow.core.messages import SignalMessage
from sagaflow.core.status import execution_object
from sagaflow.runtime import control
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.signals import new_signal_id
from sagaflow.runtime.startpath import IdempotencyConflictError, StartCall, start_call
from sagaflow.runtime.starts import CorrelationKeyInUseError, NameInUseError

_NAME = re.compile(NAME_PATTERN)
_PHASES = {p.value for p in ExecutionPhase}
# Lists the schedules a namespace has (the schedule runner knows them); none without.
ScheduleLister = Callable[[str], Awaitable[list[dict[str, Any]]]]
# In a cluster: creates the Execution object and answers with it (`kube.launcher`).
Starter = Callable[[StartCall], Awaitable[Started]]


def control_fact(
    verb: str,
    *,
    latest: bool = False,
    steps: Sequence[str] = (),
    reason: str = "cancelled on request",
) -> Control:
    """The control request a verb names (`reason`: a cancel's, in the history)."""
    if verb == "suspend":
        return Suspend()
    if verb == "resume":
        return Resume()
    if verb == "cancel":
        return Cancel(reason)
    if verb == "redrive":
        return Redrive(to_latest=latest)
    if verb == "skip-compensation":
        return SkipCompensation(tuple(steps))
    verbs = ", ".join((*CONTROL_VERBS, "skip-compensation"))
    raise bad_request(f"unknown control verb {verb!r}: use one of {verbs}", "verb")


class DirectService:
    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        schedules: ScheduleLister | None = None,
        starter: Starter | None = None,
    ) -> None:
        self.o = orchestrator
        self._schedules = schedules
        self._starter = starter

    async def start(self, call: StartCall) -> Started:
        if call.name is not None and not (_NAME.match(call.name) and len(call.name) <= 253):
            raise bad_request(
                f"name {call.name!r}: a lower-case DNS name (a-z, 0-9, '-'), at most 253", "name"
            )
        if self._starter is not None:
            return await self._starter(call)
        try:
            state, created = await start_call(self.o, call)
        except LookupError as exc:
            raise not_found(str(exc)) from None
        except IdempotencyConflictError as exc:
            raise conflict(str(exc), "Idempotency-Key") from None
        except CorrelationKeyInUseError as exc:
            raise conflict(exc.reason, "correlationKey") from None
        except NameInUseError as exc:
            raise conflict(str(exc), "name") from None
        return Started(execution_object(state), created)

    async def get_execution(self, namespace: str, name: str) -> dict[str, Any]:
        async with self.o.pool.acquire() as conn:
            state = await self.o.store.get_execution(conn, namespace, name)
        if state is None:
            raise not_found(f"execution {namespace}/{name} does not exist")
        return execution_object(state)

    async def history(self, namespace: str, name: str) -> list[dict[str, Any]]:
        async with self.o.pool.acquire() as conn:
            state = await self.o.store.get_execution(conn, namespace, name)
            if state is None:
                raise not_found(f"execution {namespace}/{name} does not exist")
            rows = await self.o.store.history(conn, state.execution_id, transitions=True)
        return [
            {
                "at": r["at"].isoformat(),
                "kind": r["kind"],
                "step": r["step"],
                "attempt": r["attempt"],
                "message": r["message"],
                "data": _json(r["data"]),
            }
            for r in rows
        ]

    async def state_at(self, namespace: str, name: str, at: datetime) -> dict[str, Any]:
        """Rebuilt by replaying the run's Transition rows (`core.replay`)."""
        async with self.o.pool.acquire() as conn:
            state = await self.o.store.get_execution(conn, namespace, name)
            if state is None:
                raise not_found(f"execution {namespace}/{name} does not exist")
            rows = await self.o.store.history(conn, state.execution_id, transitions=True)
            definitions = {
                v: await self.o.store.definition(conn, namespace, state.workflow, v)
                for v in replay.versions(rows)
            }
        try:
            replayed = replay.replay(rows, definitions.__getitem__, at)
        except replay.BeforeStartError as exc:
            raise bad_request(f"execution {namespace}/{name}: {exc}", "at") from None
        except replay.ReplayError as exc:
            raise conflict(f"execution {namespace}/{name} cannot be replayed: {exc}") from None
        return replay.state_at_json(replayed, at)

    async def list_executions(
        self,
        namespace: str,
        *,
        workflow: str | None = None,
        phase: str | None = None,
        limit: int = 100,
        continue_token: str | None = None,
    ) -> Page:
        if phase is not None and phase not in _PHASES:
            raise bad_request(f"phase {phase!r}: one of {', '.join(sorted(_PHASES))}", "phase")
        if not 1 <= limit <= 1000:
            raise bad_request(f"limit {limit}: from 1 to 1000", "limit")
        try:
            after = api_reads.decode_position(continue_token) if continue_token else None
        except api_reads.BadContinueTokenError as exc:
            raise bad_request(str(exc), "continue") from None
        async with self.o.pool.acquire() as conn:
            states, token = await api_reads.execution_page(
                conn, namespace, workflow=workflow, phase=phase, limit=limit, after=after
            )
        return Page([execution_object(s) for s in states], token)

    async def list_workflows(self, namespace: str) -> list[dict[str, Any]]:
        async with self.o.pool.acquire() as conn:
            rows = await api_reads.workflows(conn, namespace)
        return [
            {
                "apiVersion": API_VERSION,
                "kind": "Workflow",
                "metadata": {"name": r["name"], "namespace": namespace},
                "spec": r["spec"],
                "status": {
                    "version": r["version"],
                    "updatedAt": r["updatedAt"].isoformat(),
                    "executions": r["executions"],
                },
            }
            for r in rows
        ]

    async def get_workflow_version(self, namespace: str, name: str, version: int) -> dict[str, Any]:
        async with self.o.pool.acquire() as conn:
            found = await api_reads.workflow_version(conn, namespace, name, version)
        if found is None:
            raise not_found(f"workflow {namespace}/{name} has no version {version}")
        return {
            "apiVersion": API_VERSION,
            "kind": "Workflow",
            "metadata": {"name": name, "namespace": namespace},
            "spec": found["spec"],
            "status": {"version": version, "createdAt": found["createdAt"].isoformat()},
        }

    async def list_schedules(self, namespace: str) -> list[dict[str, Any]]:
        return [] if self._schedules is None else await self._schedules(namespace)

    async def signal(
        self, namespace: str, name: str, signal: str, data: Any, signal_id: str | None = None
    ) -> Outcome:
        message = SignalMessage(namespace=namespace, signal=signal, data=data, execution=name)
        outcome = await self.o.signal(message, signal_id or new_signal_id())
        if outcome.result == "unknown" or outcome.state is None:
            raise not_found(outcome.message)
        result = "accepted" if outcome.result == "applied" else outcome.result
        return Outcome(result, outcome.message, execution_object(outcome.state))

    async def control(
        self,
        namespace: str,
        name: str,
        verb: str,
        *,
        latest: bool = False,
        steps: Sequence[str] = (),
    ) -> Outcome:
        fact = control_fact(verb, latest=latest, steps=steps)
        if isinstance(fact, SkipCompensation):
            await self._known_steps(namespace, name, fact.steps)
        outcome = await self.o.control(namespace, name, fact, control.request_id())
        if outcome is None:
            raise not_found(f"execution {namespace}/{name} does not exist")
        result = "accepted" if outcome.result == "applied" else outcome.result
        return Outcome(result, outcome.message or "done", execution_object(outcome.state))

    async def _known_steps(self, namespace: str, name: str, steps: Sequence[str]) -> None:
        if not steps:
            raise bad_request("name at least one step", "steps")
        async with self.o.pool.acquire() as conn:
            state = await self.o.store.get_execution(conn, namespace, name)
        if state is None:
            raise not_found(f"execution {namespace}/{name} does not exist")
        unknown = [s for s in steps if s not in state.steps]
        if unknown:
            known = ", ".join(state.steps)
            raise bad_request(f"no step {unknown[0]!r} in execution {name} ({known})", "steps")

    async def close(self) -> None:
        """The orchestrator belongs to whoever built the service."""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


__all__ = ["ApiError", "DirectService", "control_fact"]
