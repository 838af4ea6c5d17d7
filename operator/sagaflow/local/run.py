"""`sagaflow run`: apply manifests from files and run them to the end on this machine.

Composition root of local mode: embedded Postgres in the state dir (or
SAGAFLOW_DATABASE_URL), the Postgres bus, the orchestrator loops and in-process
runners for the given modules. Executions are started idempotently by
(namespace, name), so running again with the same state dir resumes unfinished
executions instead of starting them anew, and never re-runs a completed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.notify import Notifications
from sagaflow.adapters.postgres.store import EXECUTIONS_CHANNEL, PostgresStore
from sagaflow.core.definition import BUILTIN_TYPES
from sagaflow.core.ports import Bus
from sagaflow.core.state import ExecutionState
from sagaflow.core.validation import ValidationResult
from sagaflow.local.buses import make_bus
from sagaflow.local.database import open_database
from sagaflow.local.inputs import InvalidInputError, load_manifests
from sagaflow.local.output import Progress, render
from sagaflow.local.payloads import make_claim_check
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.worker import RunnerWorker
from sagaflow.settings import Settings
from sagaflow_runner import Registry, default_registry, load_module

log = logging.getLogger("sagaflow.local")

EXIT_OK, EXIT_NOT_COMPLETED, EXIT_INVALID = 0, 1, 2


def load_runners(specs: Sequence[str]) -> Registry:
    for spec in specs:
        try:
            load_module(spec)
        except (ImportError, ValueError, SyntaxError) as exc:
            raise InvalidInputError([f"--runners {spec}: {exc}"]) from exc
    return default_registry


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
    try:
        registry = load_runners(runner_specs)
        manifests = load_manifests(
            files, lambda t: t in BUILTIN_TYPES or registry.handler(t) is not None
        )
        with exclusive(state_dir):
            claim_check = make_claim_check(settings, state_dir)
            try:
                return await _run(
                    manifests, registry, state_dir, fmt, settings, claim_check, out, err
                )
            finally:
                await claim_check.close()
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        return EXIT_INVALID


async def _run(
    manifests: ValidationResult,
    registry: Registry,
    state_dir: Path,
    fmt: str,
    settings: Settings,
    claim_check: ClaimCheck,
    out: TextIO,
    err: TextIO,
) -> int:
    async with open_database(settings, state_dir) as db:
        bus = make_bus(settings, db.pool)
        if db.embedded and isinstance(bus, PostgresBus):
            # This process owns the state dir (see `exclusive`): locks left in the bus
            # belong to a previous run that died, so hand their messages out again now
            # rather than after the lock duration.
            await bus.release_all_locks()
        orchestrator = Orchestrator(
            PostgresStore(db.pool), bus, batch_size=settings.batch_size, claim_check=claim_check
        )
        try:
            for _doc, wf in manifests.workflows:
                await orchestrator.apply_workflow(wf.metadata.namespace, wf.metadata.name, wf.spec)
            keys = []
            for _doc, ex in manifests.executions:
                meta = ex.metadata
                await orchestrator.start(
                    meta.namespace, meta.name, ex.spec.workflow_ref.name, ex.spec.input
                )
                keys.append((meta.namespace, meta.name))
            states = await _drive(
                orchestrator, bus, registry, db.dsn, keys, settings, claim_check, err
            )
        finally:
            await bus.close()
    print(render(states, fmt), file=out)
    done = all(s.phase.value == "Completed" for s in states)
    return EXIT_OK if done else EXIT_NOT_COMPLETED


async def _drive(
    orchestrator: Orchestrator,
    bus: Bus,
    registry: Registry,
    dsn: str,
    keys: list[tuple[str, str]],
    settings: Settings,
    claim_check: ClaimCheck,
    err: TextIO,
) -> list[ExecutionState]:
    """Run the loops and in-process runners until every execution is terminal."""
    stop = asyncio.Event()
    notes = Notifications(dsn, (EXECUTIONS_CHANNEL,))
    await notes.start()
    tasks = [asyncio.create_task(orchestrator.run(stop, dsn))]
    if len(registry):
        worker = RunnerWorker(
            bus, registry, concurrency=settings.runner_concurrency, claim_check=claim_check
        )
        tasks.append(asyncio.create_task(worker.run(stop)))
    progress = Progress(err)
    try:
        while True:
            async with orchestrator.pool.acquire() as conn:
                states = await orchestrator.store.list_executions(conn, keys)
            progress.update(states)
            if all(s.phase.is_terminal for s in states):
                return states
            for t in tasks:
                if t.done():
                    t.result()  # a loop that died takes the run down with its error
            # Redraw at least every half second on a terminal, so durations tick on.
            await notes.wait(EXECUTIONS_CHANNEL, 0.5 if progress.live else 5.0)
    finally:
        progress.clear()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await notes.close()
