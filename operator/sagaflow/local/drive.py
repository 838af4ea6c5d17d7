"""Driving one `sagaflow run` to its end: loops, in-process runners, starts, progress, stop.

- The orchestrator's loops and the runners start first; executions are then started
  in batches (one transaction each) beside them, so the first steps run at once
  however many executions the files hold.
- Progress looks at the database at most a few times a second, woken by commits, and
  costs what it shows, not what the run holds (`output.py`).
- SIGINT and SIGTERM (`Interrupts`): the first stops taking new work and gives
  running handlers `grace_period_seconds` to finish; a second stops them now. The
  caller then prints the listing and exits 130 or 143; the state dir resumes the rest.
- The database going away pauses progress like everything else (`OutageWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO, TypeVar

from sagaflow.adapters.postgres.notify import Notifications
from sagaflow.adapters.postgres.reads import RunView
from sagaflow.adapters.postgres.store import EXECUTIONS_CHANNEL
from sagaflow.core.facts import Cancel, Control, SkipCompensation
from sagaflow.core.ports import Bus
from sagaflow.core.state import ExecutionState
from sagaflow.local.output import SHOWN_RUNNING, SMALL_RUN, Progress, Snapshot
from sagaflow.runtime import admission
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow.runtime.orchestrator import Orchestrator, StartRequest
from sagaflow.runtime.worker import RunnerWorker
from sagaflow.settings import Settings
from sagaflow.wiring.checks import attempt_check
from sagaflow_runner import Registry

log = logging.getLogger("sagaflow.local")
T = TypeVar("T")

# Progress looks at most this often, however many commits wake it: a terminal is
# redrawn briskly, a log gets a line per finished execution a little later.
_MIN_GAP = {True: 0.2, False: 1.0}
# How often starting looks again while the run is at its limit of unfinished executions.
_ADMIT_EVERY = 0.05
# Finished executions are looked for this far behind the last look: a transaction's
# rows carry the time it began, and it may commit a little after a later one.
_LOOKBACK = timedelta(seconds=2)


class Interrupts:
    """SIGINT / SIGTERM for a command that stops gracefully: the first asks to stop,
    a second to stop now. `code` is the exit code to end with (128 + signal)."""

    def __init__(self, err: TextIO = sys.stderr, grace: float = 10.0) -> None:
        self.stop = asyncio.Event()
        self.now = asyncio.Event()
        self.signal: int | None = None
        self._err = err
        self._grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self._received, sig)

    def uninstall(self) -> None:
        if self._loop is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.remove_signal_handler(sig)

    @property
    def code(self) -> int | None:
        return None if self.signal is None else 128 + self.signal

    def _received(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.signal is None:
            self.signal = sig
            self.stop.set()
            self._err.write(
                f"\n{name}: stopping; running steps get {self._grace:g}s to finish "
                f"({name} again stops them now)\n"
            )
        else:
            self.now.set()
            self._err.write(f"\n{name}: stopping now\n")
        self._err.flush()


def runner_worker(
    o: Orchestrator, bus: Bus, registry: Registry, claim_check: ClaimCheck, settings: Settings
) -> RunnerWorker | None:
    """The in-process runners of `registry` (None without handlers), checking each
    command against the state of `o` before running it."""
    if not len(registry):
        return None
    return RunnerWorker(
        bus,
        registry,
        concurrency=settings.runner_concurrency,
        claim_check=claim_check,
        check_attempts=attempt_check(o.pool),
        outages=o.outages,
        grace_period=settings.grace_period_seconds,
        loop_block_seconds=settings.loop_block_seconds,
        suspect_alone_seconds=settings.suspect_alone_seconds,
    )


async def drive(
    orchestrator: Orchestrator,
    bus: Bus,
    registry: Registry,
    dsn: str,
    requests: Sequence[StartRequest],
    settings: Settings,
    claim_check: ClaimCheck,
    interrupts: Interrupts,
    err: TextIO,
) -> list[str]:
    """Run until every execution is at rest (terminal, CompensationFailed, or suspended
    with nothing in flight) or a signal stops the run; the ids started."""
    loops_stop, worker_stop = asyncio.Event(), asyncio.Event()
    loops = asyncio.create_task(orchestrator.run(loops_stop, dsn), name="orchestrator")
    tasks = [loops]
    worker = runner_worker(orchestrator, bus, registry, claim_check, settings)
    if worker is not None:
        tasks.append(asyncio.create_task(worker.run(worker_stop), name="runner"))
    view = RunView(dsn)
    starter = asyncio.create_task(
        _start_all(
            orchestrator, requests, view, settings.batch_size, settings.max_running_executions
        )
    )
    tasks.append(starter)
    # Start-up and periodic admission pass (concurrency limits; finishes admit at once).
    sweeps_stop = asyncio.Event()
    sweeper = asyncio.create_task(admission.sweep_every(orchestrator, sweeps_stop))
    notes = Notifications(dsn, (EXECUTIONS_CHANNEL,))
    await notes.start()
    progress = Progress(err)
    try:
        await _watch(orchestrator, requests, view, tasks, starter, notes, progress, interrupts)
    finally:
        progress.clear()
        await notes.close()
        await view.close()
        starter.cancel()
        sweeps_stop.set()
        await asyncio.gather(sweeper, return_exceptions=True)
        await _stop(worker, worker_stop, tasks, interrupts)
        loops_stop.set()
        await asyncio.gather(loops, return_exceptions=True)
    return view.ids


async def _watch(
    orchestrator: Orchestrator,
    requests: Sequence[StartRequest],
    view: RunView,
    tasks: list[asyncio.Task[None]],
    starter: asyncio.Task[None],
    notes: Notifications,
    progress: Progress,
    interrupts: Interrupts,
) -> None:
    since: datetime | None = None
    loop = asyncio.get_running_loop()
    while not interrupts.stop.is_set():
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a loop died of a bug
        looked = loop.time()
        try:
            now = datetime.now(UTC)
            snapshot = await _snapshot(view, len(requests), progress.live, since)
            since = now - _LOOKBACK
        except Exception as exc:
            if not orchestrator.outages.failed(exc):
                raise
            await _unless_stopped(interrupts, orchestrator.outages.available())
            continue
        progress.update(snapshot)
        if starter.done() and snapshot.done == len(requests):
            return
        await asyncio.sleep(max(0.0, _MIN_GAP[progress.live] - (loop.time() - looked)))
        # Redraw at least every half second on a terminal, so durations tick on.
        wait = notes.wait(EXECUTIONS_CHANNEL, 0.5 if progress.live else 5.0)
        await _unless_stopped(interrupts, wait)


async def _unless_stopped(interrupts: Interrupts, awaitable: Awaitable[None]) -> None:
    """Await `awaitable`, or cancel it when a signal comes first."""
    task = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(interrupts.stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _snapshot(view: RunView, requested: int, live: bool, since: datetime | None) -> Snapshot:
    started = len(view.ids)
    counts = await view.phase_counts()
    if requested <= SMALL_RUN:
        rows = await view.in_order()  # a small run is shown whole
    else:
        rows = await view.unfinished(SHOWN_RUNNING)
    finished = [] if live else await view.finished_since(since)
    done = await view.finished_count()
    return Snapshot(requested, started, counts, rows, done, finished)


async def _start_all(
    orchestrator: Orchestrator,
    requests: Sequence[StartRequest],
    view: RunView,
    batch: int,
    most: int,
) -> None:
    """Start the executions a batch at a time, keeping at most `most` unfinished."""
    finished = 0
    for first in range(0, len(requests), batch):
        chunk = requests[first : first + batch]
        while len(view.ids) - finished + len(chunk) > most and finished < len(view.ids):
            await asyncio.sleep(_ADMIT_EVERY)
            finished = await _retrying(orchestrator, view.finished_count)
        states = await _retrying(orchestrator, functools.partial(orchestrator.start_many, chunk))
        for request, state in zip(chunk, states, strict=True):
            await _asked_in_manifest(orchestrator, request, state)
        await view.add([s.execution_id for s in states])


async def _asked_in_manifest(
    orchestrator: Orchestrator, request: StartRequest, state: ExecutionState
) -> None:
    """spec.cancel and spec.skipCompensation of a file, as the cluster applies them: once
    per execution (the request ids are the execution's), so running again adds nothing."""
    eid = state.execution_id
    asked: list[tuple[Control, str]] = []
    if request.skip_compensation:
        asked.append((SkipCompensation(request.skip_compensation), f"{eid}/spec.skipCompensation"))
    if request.cancel:
        asked.append((Cancel("spec.cancel set"), f"{eid}/spec.cancel"))
    for fact, request_id in asked:
        call = functools.partial(
            orchestrator.control, state.namespace, state.name, fact, request_id, execution_id=eid
        )
        await _retrying(orchestrator, call)


async def _retrying(orchestrator: Orchestrator, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again after each outage of the database."""
    while True:
        try:
            return await call()
        except Exception as exc:
            if not await orchestrator.outages.retry(exc):
                raise


async def _stop(
    worker: RunnerWorker | None,
    worker_stop: asyncio.Event,
    tasks: list[asyncio.Task[None]],
    interrupts: Interrupts,
) -> None:
    """Stop the runners (gracefully unless told twice), then wait for every task."""
    worker_stop.set()
    hurry = None
    if worker is not None:
        if interrupts.now.is_set():
            worker.hurry()
        hurry = asyncio.create_task(hurry_on(interrupts, worker))
    for task in tasks[1:]:
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception:
                log.exception("%s stopped with an error", task.get_name())
    if hurry is not None:
        hurry.cancel()


async def hurry_on(interrupts: Interrupts, worker: RunnerWorker) -> None:
    """Cancel the worker's handlers when told to stop a second time."""
    await interrupts.now.wait()
    worker.hurry()
