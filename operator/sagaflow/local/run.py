"""`sagaflow run`: apply manifests from files and run them to the end on this machine.

Composition root of local mode: embedded Postgres in the state dir (or
SAGAFLOW_DATABASE_URL), the Postgres bus, the orchestrator loops and in-process
runners for the given modules (`drive.py` runs them). Executions are started
idempotently by (namespace, name), so running again with the same state dir resumes
unfinished executions instead of starting them anew, and never re-runs a completed
attempt.

It runs until every execution is at rest: terminal (Completed, Failed, Compensated,
Cancelled) or settled (CompensationFailed; Suspended with nothing in flight). A
control command (`sagaflow suspend|resume|cancel|redrive|skip-compensation`,
`local/control.py`) against the same state is picked up at once; running again after
a resume or a redrive carries the executions on.

Exit codes: 0 every execution Completed, 1 some did not, 2 invalid input (nothing
was started; a `spec.correlationKey` held by another unfinished execution of its
workflow, or by an earlier Execution of the files, is such input), 130 / 143
stopped by SIGINT / SIGTERM (the listing shows where each execution stands; running
again resumes them).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from sagaflow.adapters.postgres import reads
from sagaflow.core.definition import BUILTIN_TYPES
from sagaflow.core.manifests import Execution, ExecutionPhase, WorkflowSpec
from sagaflow.core.messages import EVENTS_QUEUE, commands_queue
from sagaflow.core.state import ExecutionState
from sagaflow.core.validation import Document, ManifestError
from sagaflow.local.drive import Interrupts, drive
from sagaflow.local.inputs import InvalidInputError, load_manifests
from sagaflow.local.output import write_listing
from sagaflow.runtime.orchestrator import Orchestrator, StartRequest
from sagaflow.runtime.starts import CorrelationKeyInUseError, correlation_conflicts
from sagaflow.settings import Settings
from sagaflow.wiring.database import GaveUpWaiting
from sagaflow.wiring.orchestrators import open_orchestrator
from sagaflow_runner import Registry, default_registry, load_module

log = logging.getLogger("sagaflow.local")

EXIT_OK, EXIT_NOT_COMPLETED, EXIT_INVALID = 0, 1, 2
_PAGE = 500  # executions per query of the final listing


def load_runners(specs: Sequence[str]) -> Registry:
    for spec in specs:
        try:
            load_module(spec)
        except (ImportError, ValueError, SyntaxError, TypeError) as exc:
            raise InvalidInputError([f"--runners {spec}: {exc}"]) from exc
    return default_registry


def start_request_of(e: Execution) -> StartRequest:
    """An Execution of a file as a start request (its control fields applied once)."""
    return StartRequest(
        e.metadata.namespace,
        e.metadata.name,
        e.spec.workflow_ref.name,
        e.spec.input,
        suspend=e.spec.suspend,
        cancel=e.spec.cancel,
        skip_compensation=e.spec.skip_compensation,
        correlation_key=e.spec.correlation_key,
    )


@contextlib.contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """One `sagaflow run` per state dir: a second one would fight over the same work."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "run.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InvalidInputError(
                [f"--state-dir {state_dir}: another sagaflow run is using it"]
            ) from exc
        yield


async def run_local(
    files: Sequence[Path],
    runner_specs: Sequence[str],
    state_dir: Path,
    fmt: str,
    settings: Settings,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    interrupts = Interrupts(err, settings.grace_period_seconds)
    interrupts.install()
    counts: dict[str, int] = {}
    origins: dict[tuple[str, str], Document] = {}
    try:
        registry = load_runners(runner_specs)
        manifests = load_manifests(
            files, lambda t: t in BUILTIN_TYPES or registry.handler(t) is not None
        )
        workflows = [
            (wf.metadata.namespace, wf.metadata.name, wf.spec) for _, wf in manifests.workflows
        ]
        requests = [start_request_of(e) for _, e in manifests.executions]
        # Where each keyed Execution came from, to name it if its key is refused.
        origins |= {
            (e.metadata.namespace, e.metadata.name): doc
            for doc, e in manifests.executions
            if e.spec.correlation_key is not None
        }
        del manifests  # thousands of parsed documents: only what starting needs is kept
        with exclusive(state_dir):
            try:
                async with open_orchestrator(settings, state_dir, give_up=interrupts.stop) as w:
                    for namespace, name, spec in workflows:
                        await w.orchestrator.apply_workflow(namespace, name, spec)
                    refused = await correlation_conflicts(w.orchestrator, requests)
                    if refused:
                        raise InvalidInputError([_where(origins, c) for c in refused])
                    await w.bus.prepare(send=command_queues(workflows), receive=[EVENTS_QUEUE])
                    ids = await drive(
                        w.orchestrator,
                        w.bus,
                        registry,
                        w.db.dsn,
                        requests,
                        settings,
                        w.claim_check,
                        interrupts,
                        err,
                    )
                    counts = await write_listing(out, fmt, lambda: _pages(w.orchestrator, ids))
            except GaveUpWaiting:
                pass  # signalled before the database answered: nothing was started
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        return EXIT_INVALID
    except CorrelationKeyInUseError as exc:  # taken by another process since the check
        print(f"error: {_where(origins, exc)}", file=err)
        return EXIT_INVALID
    finally:
        interrupts.uninstall()
    if interrupts.code is not None:
        left = len(requests) - sum(n for p, n in counts.items() if ExecutionPhase(p).at_rest)
        print(
            f"stopped before the end: {left} execution(s) not finished; "
            f"run again with --state-dir {state_dir} to resume them",
            file=err,
        )
        return interrupts.code
    return EXIT_OK if counts.get("Completed", 0) == len(requests) else EXIT_NOT_COMPLETED


def _where(origins: dict[tuple[str, str], Document], refused: CorrelationKeyInUseError) -> str:
    """A refused correlation key as a manifest problem: file, document, field, reason."""
    r = refused.request
    doc = origins[(r.namespace, r.name)]
    path = "spec.correlationKey"
    return str(ManifestError(doc.source, doc.index, "Execution", r.name, path, refused.reason))


def command_queues(workflows: Sequence[tuple[str, str, WorkflowSpec]]) -> list[str]:
    """The queues the files' step types (forward and compensating) are sent to."""
    steps = [s for _, _, spec in workflows for s in (*spec.steps, *spec.finally_steps)]
    types = {s.type for s in steps if s.type is not None}
    types |= {s.compensate.type for s in steps if s.compensate}
    return sorted({commands_queue(t) for t in types - BUILTIN_TYPES})


async def _pages(
    orchestrator: Orchestrator, ids: Sequence[str]
) -> AsyncIterator[list[ExecutionState]]:
    for first in range(0, len(ids), _PAGE):
        async with orchestrator.pool.acquire() as conn:
            yield await reads.executions_by_id(conn, ids[first : first + _PAGE])
