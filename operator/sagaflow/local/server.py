"""`sagaflow server`: a long-running orchestrator that serves the API, until stopped.

Like `sagaflow run` it works on the embedded defaults (Postgres in the state dir,
the Postgres bus, local payloads) or on what the settings configure, but it does
not end when the runs of its files do. It keeps going, and starts runs from every
trigger through the one start path:

- the HTTP API (`SAGAFLOW_API_PORT`, `api/`), which the CLI verbs reach with
  `--server`; with no tokens file (`SAGAFLOW_API_TOKENS_FILE`) it listens on
  loopback only and says so;
- the Schedules of the files (`runtime/schedules.py`);
- the Triggers of the files: bus queues (`runtime/triggers.py`) and HTTP webhooks
  (served by the API, their secrets from `kind: Secret` documents of the files);
- the Executions of the files, started once by name as `sagaflow run` starts them.

Manifests are checked before anything starts, as `sagaflow run` checks them. A
stop (SIGINT / SIGTERM) gives running handlers the grace period; everything
unfinished carries on when the server starts again on the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sagaflow.api.auth import TokensFileError
from sagaflow.api.hosting import Hosted, host
from sagaflow.api.server import ServeError
from sagaflow.core.definition import BUILTIN_TYPES
from sagaflow.core.messages import EVENTS_QUEUE
from sagaflow.core.trigger_specs import Schedule, Trigger
from sagaflow.core.validation import Document, parse_documents, validate_documents
from sagaflow.local.drive import Interrupts, runner_worker
from sagaflow.local.run import (
    EXIT_INVALID,
    command_queues,
    exclusive,
    load_runners,
    start_request_of,
)
from sagaflow.runtime import admission
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.startpath import DirectLauncher
from sagaflow.runtime.starts import CorrelationKeyInUseError, StartRequest
from sagaflow.runtime.worker import RunnerWorker
from sagaflow.settings import Settings
from sagaflow.wiring.database import GaveUpWaiting
from sagaflow.wiring.orchestrators import open_orchestrator
from sagaflow.wiring.problems import InvalidInputError

log = logging.getLogger("sagaflow.server")


@dataclass
class Manifests:
    """What a server's files hold, checked."""

    workflows: list[tuple[str, str, Any]] = field(default_factory=list)
    executions: list[StartRequest] = field(default_factory=list)
    schedules: list[Schedule] = field(default_factory=list)
    triggers: list[Trigger] = field(default_factory=list)
    secrets: list[dict[str, Any]] = field(default_factory=list)


def load_server_manifests(paths: Sequence[Path], registry: Any) -> Manifests:
    """Every document of `paths`, checked; InvalidInputError naming every problem.
    `kind: Secret` documents (apiVersion v1) hold webhook secrets; the rest are ours."""
    from sagaflow.local.inputs import _expand

    documents: list[Document] = []
    secrets: list[dict[str, Any]] = []
    problems: list[str] = []
    for path in _expand(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
            continue
        docs, errors = parse_documents(text, str(path))
        problems += [str(e) for e in errors]
        for doc in docs:
            if doc.body.get("kind") == "Secret" and doc.body.get("apiVersion") == "v1":
                secrets.append(doc.body)
            else:
                documents.append(doc)
    result = validate_documents(
        documents, lambda t: t in BUILTIN_TYPES or registry.handler(t) is not None
    )
    problems += [str(e) for e in result.errors]
    if problems:
        raise InvalidInputError(problems)
    return Manifests(
        workflows=[(w.metadata.namespace, w.metadata.name, w.spec) for _, w in result.workflows],
        executions=[start_request_of(e) for _, e in result.executions],
        schedules=[s for _, s in result.schedules],
        triggers=[t for _, t in result.triggers],
        secrets=secrets,
    )


async def run_server(
    files: Sequence[Path],
    runner_specs: Sequence[str],
    state_dir: Path,
    settings: Settings,
    err: TextIO = sys.stderr,
) -> int:
    interrupts = Interrupts(err, settings.grace_period_seconds)
    interrupts.install()
    try:
        registry = load_runners(runner_specs)
        manifests = load_server_manifests(files, registry)
        with exclusive(state_dir):
            try:
                async with open_orchestrator(settings, state_dir, give_up=interrupts.stop) as w:
                    o = w.orchestrator
                    for namespace, name, spec in manifests.workflows:
                        await o.apply_workflow(namespace, name, spec)
                    await w.bus.prepare(
                        send=command_queues(manifests.workflows), receive=[EVENTS_QUEUE]
                    )
                    if manifests.executions:
                        await o.start_many(manifests.executions)
                    worker = runner_worker(o, w.bus, registry, w.claim_check, settings)
                    await _serve(o, w.db.dsn, worker, manifests, settings, interrupts, err)
            except GaveUpWaiting:
                pass
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        return EXIT_INVALID
    except (CorrelationKeyInUseError, ServeError, TokensFileError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    finally:
        interrupts.uninstall()
    with contextlib.suppress(Exception):
        err.flush()
    return 0 if interrupts.code is None else interrupts.code


async def _serve(
    o: Orchestrator,
    dsn: str,
    worker: RunnerWorker | None,
    manifests: Manifests,
    settings: Settings,
    interrupts: Interrupts,
    err: TextIO,
) -> None:
    """The orchestrator loops, the runners, admission, and what `host` serves, until a
    stop; then the runners first (their grace period), the loops last."""
    loops_stop, worker_stop, sweeps_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(o.run(loops_stop, dsn), name="orchestrator")]
    if worker is not None:
        tasks.append(asyncio.create_task(worker.run(worker_stop), name="runner"))
    tasks.append(asyncio.create_task(admission.sweep_every(o, sweeps_stop), name="admission"))
    hosted = Hosted(
        schedules=manifests.schedules,
        triggers=manifests.triggers,
        secrets=manifests.secrets,
        from_files=True,
    )
    try:
        async with host(o, DirectLauncher(o), hosted, settings) as serving:
            print(f"sagaflow server: {serving.describe()}; Ctrl-C stops it", file=err)
            err.flush()
            stopped = asyncio.create_task(interrupts.stop.wait())
            await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            for task in tasks:  # a loop that died of a bug ends the server, said once
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("%s stopped: %s", task.get_name(), task.exception())
    finally:
        worker_stop.set()
        sweeps_stop.set()
        if worker is not None and interrupts.now.is_set():
            worker.hurry()
        for task in tasks[1:]:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        loops_stop.set()
        await asyncio.gather(tasks[0], return_exceptions=True)


__all__ = ["Manifests", "load_server_manifests", "run_server"]
