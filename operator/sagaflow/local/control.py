"""`sagaflow suspend|resume|cancel|redrive|skip-compensation NAME`, `sagaflow signal`.

They act on the same state as `sagaflow run` (the embedded Postgres of `--state-dir`,
or SAGAFLOW_DATABASE_URL) and may run beside it: the request commits with its effect
(the commands it dispatches, the timers it sets), so a `sagaflow run` that is
running picks it up at once, and a later one carries the execution on. Each
invocation is one request: a request whose effect already holds is a no-op.

`redrive --latest` moves the run onto the workflow's current version; with `-f` the
Workflows of those files are validated and stored first, so a fixed Workflow and
its redrive are one command.

Exit codes: 0 the request took effect or already held, 1 it was refused (the reason
is printed, and recorded in the run's history), 2 invalid input (an unknown
execution or step, a bad file).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from sagaflow.api.service import control_fact
from sagaflow.core.facts import Control, SkipCompensation
from sagaflow.core.jsonsafe import unstorable
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import SignalMessage
from sagaflow.core.validation import Document, parse_documents, validate_documents
from sagaflow.runtime import control
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.signals import describe_target, new_signal_id
from sagaflow.settings import Settings
from sagaflow.wiring.orchestrators import open_orchestrator
from sagaflow.wiring.problems import InvalidInputError

EXIT_OK, EXIT_REFUSED, EXIT_INVALID = 0, 1, 2
_POLL = 0.25  # seconds between looks for a run `sagaflow signal --wait` waits for
VERBS = ("suspend", "resume", "cancel", "redrive", "skip-compensation")


def request_of(verb: str, *, latest: bool = False, steps: Sequence[str] = ()) -> Control:
    reason = "cancelled with sagaflow cancel"
    return control_fact(verb, latest=latest, steps=steps, reason=reason)


async def run_control(
    verb: str,
    name: str,
    namespace: str,
    state_dir: Path,
    settings: Settings,
    *,
    latest: bool = False,
    steps: Sequence[str] = (),
    files: Sequence[Path] = (),
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    fact = request_of(verb, latest=latest, steps=steps)
    try:
        workflows = _workflows(files)
        if not settings.database_url and not (state_dir / "postgres").exists():
            raise InvalidInputError([f"--state-dir {state_dir}: no state here (nothing has run)"])
        async with open_orchestrator(settings, state_dir, pool_size=2) as wired:
            orchestrator = wired.orchestrator
            for wf_namespace, wf_name, spec in workflows:
                version, created = await orchestrator.apply_workflow(wf_namespace, wf_name, spec)
                if created:
                    print(f"workflow {wf_namespace}/{wf_name}: v{version} stored", file=out)
            outcome = await _apply(orchestrator, namespace, name, fact)
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        return EXIT_INVALID
    key = f"{namespace}/{name}"
    if outcome.result == "refused":
        print(f"error: {verb} {key} refused: {outcome.message}", file=err)
        return EXIT_REFUSED
    said = outcome.message or "done"
    what = "nothing to do" if outcome.result == "noop" else "accepted"
    print(f"{verb} {key}: {what}: {said}; the execution is {outcome.state.phase.value}", file=out)
    return EXIT_OK


async def _apply(o: Orchestrator, namespace: str, name: str, fact: Control) -> control.Outcome:
    if isinstance(fact, SkipCompensation):
        async with o.pool.acquire() as conn:
            state = await o.store.get_execution(conn, namespace, name)
        if state is not None:
            unknown = [s for s in fact.steps if s not in state.steps]
            if unknown:
                known = ", ".join(state.steps)
                raise InvalidInputError(
                    [
                        f"--step {s}: execution {namespace}/{name} has no such step ({known})"
                        for s in unknown
                    ]
                )
    outcome = await o.control(namespace, name, fact, control.request_id())
    if outcome is None:
        raise InvalidInputError([f"no execution {namespace}/{name} in this state"])
    return outcome


async def run_signal(
    target: Sequence[str],
    namespace: str,
    state_dir: Path,
    settings: Settings,
    *,
    data: str | None,
    signal_id: str | None,
    correlation_key: str | None,
    workflow: str | None,
    wait: float = 0.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """`sagaflow signal NAME SIGNAL --data JSON [--id ID]`, or with `--correlation-key
    KEY --workflow WF` instead of NAME. Exit codes as for the control verbs.

    `wait` (seconds): until then, a run that does not exist yet is waited for (a run
    started in the background a moment ago); the signal keeps one id throughout."""
    deadline = time.monotonic() + wait
    try:
        signal = _signal_of(target, namespace, data, signal_id, correlation_key, workflow)
        the_id = signal.id or new_signal_id()
        while not settings.database_url and not (state_dir / "postgres").exists():
            if time.monotonic() >= deadline:
                reason = f"--state-dir {state_dir}: no state here (nothing has run)"
                raise InvalidInputError([reason])
            await asyncio.sleep(_POLL)
        async with open_orchestrator(settings, state_dir, pool_size=2) as wired:
            outcome = await wired.orchestrator.signal(signal, the_id)
            while outcome.result == "unknown" and time.monotonic() < deadline:
                await asyncio.sleep(_POLL)
                outcome = await wired.orchestrator.signal(signal, the_id)
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        return EXIT_INVALID
    where = describe_target(signal)
    if outcome.result == "unknown":
        print(f"error: {outcome.message}", file=err)
        return EXIT_INVALID
    if outcome.result == "refused":
        print(f"error: {where}: {outcome.message}", file=err)
        return EXIT_REFUSED
    phase = f"; the execution is {outcome.state.phase.value}" if outcome.state else ""
    what = "nothing to do: " if outcome.result == "noop" else ""
    print(f"signal {where}: {what}{outcome.message}{phase}", file=out)
    return EXIT_OK


def _signal_of(
    target: Sequence[str],
    namespace: str,
    data: str | None,
    signal_id: str | None,
    correlation_key: str | None,
    workflow: str | None,
) -> SignalMessage:
    if (correlation_key is None) != (workflow is None):
        raise InvalidInputError(["--correlation-key and --workflow go together"])
    wanted = 1 if correlation_key is not None else 2
    if len(target) != wanted:
        usage = "SIGNAL with --correlation-key" if wanted == 1 else "NAME SIGNAL"
        raise InvalidInputError([f"expected {usage}, got {' '.join(target) or 'nothing'}"])
    try:
        value = None if data is None else json.loads(data)
    except json.JSONDecodeError as exc:
        raise InvalidInputError([f"--data: not JSON: {exc}"]) from exc
    if (problem := unstorable(value, "--data")) is not None:
        raise InvalidInputError([problem])
    return SignalMessage(
        namespace=namespace,
        signal=target[-1],
        data=value,
        id=signal_id,
        execution=target[0] if wanted == 2 else None,
        workflow=workflow,
        correlation_key=correlation_key,
    )


def _workflows(files: Sequence[Path]) -> list[tuple[str, str, WorkflowSpec]]:
    """The Workflows of `files`, validated (InvalidInputError naming every problem)."""
    if not files:
        return []
    documents: list[Document] = []
    problems: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
            continue
        docs, errors = parse_documents(text, str(path))
        documents += [d for d in docs if d.body.get("kind") == "Workflow"]
        problems += [str(e) for e in errors]
    result = validate_documents(documents)
    problems += [str(e) for e in result.errors]
    if not problems and not result.workflows:
        problems.append(f"-f {', '.join(map(str, files))}: no Workflow found")
    if problems:
        raise InvalidInputError(problems)
    return [(w.metadata.namespace, w.metadata.name, w.spec) for _, w in result.workflows]
