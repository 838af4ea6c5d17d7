"""Schedules at run time: the runner that fires each tick once, and their statuses.

`ScheduleRunner` keeps every Schedule as a row (`sagaflow_schedules`): `put` and
`remove` are fed by the operator's handlers or by `sagaflow server`'s files, and
every replica runs `run`, which needs no registry of its own: what is due is read
from the table. A pass over one schedule is one transaction holding its row
(`FOR UPDATE SKIP LOCKED`, so another replica passes it by): the core plans
(`core/schedules.py`), the runner cancels and starts through the `Launcher` with the
tick's idempotency key, and the new cursor and counts are stored before the commit.
Together the row lock and the key make a tick start at most one run, whichever
replica fires it and however often a pass is retried.

What a start can answer:
- a run (new, or already there from a pass that did not commit): counted started;
- a refusal (an unknown workflow, a used key or name, a held correlation key, an
  input that does not render): the tick is counted failed, reported `Failed` with
  the reason, and the schedule goes on with its next tick;
- anything else (the database or the API server not answering): the pass is rolled
  back and its ticks are tried again by the next pass, said once per stretch.

Each start, skip, wait, miss, cancel and failure is reported through `report`
(the operator posts Kubernetes Events; standalone, `api.hosting` logs them), after the
pass committed, so what is reported has happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sagaflow.adapters.postgres import schedules_sql as sql
from sagaflow.core import schedules as core
from sagaflow.core.ports import Clock, utc_now
from sagaflow.core.schedules import Plan, ScheduleRef, tick_time
from sagaflow.core.trigger_specs import ScheduleSpec, ScheduleStatus
from sagaflow.runtime.outages import describe
from sagaflow.runtime.startpath import IdempotencyConflictError, Launcher, Source, StartCall
from sagaflow.runtime.starts import CorrelationKeyInUseError, NameInUseError
from sagaflow.telemetry import metrics

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("sagaflow.schedules")

_SECOND = timedelta(seconds=1)

# (namespace, name, kind, message): kind is Started, Skipped, Buffered, Missed,
# Cancelled or Failed.
Report = Callable[[str, str, str, str], Awaitable[None] | None]

# A start that may not happen for this tick, however often it is tried (LookupError:
# the workflow does not exist).
_REFUSALS = (LookupError, IdempotencyConflictError, NameInUseError, CorrelationKeyInUseError)


class _Retry(Exception):
    """A pass could not finish: rolled back, its ticks go again with the next pass."""


@dataclass
class _Pass:
    """What one committed pass did, to count and to report."""

    ref: ScheduleRef
    plan: Plan
    window: str  # the spec's catchupWindow, for the report of missed ticks
    started: list[tuple[datetime, str, bool]] = field(default_factory=list)
    failed: list[tuple[datetime, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


class ScheduleRunner:
    """Fires the ticks of every stored Schedule once, through `launcher`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        launcher: Launcher,
        *,
        report: Report | None = None,
        clock: Clock = utc_now,
        poll_seconds: float = 1.0,
        batch_size: int = 100,
    ) -> None:
        self._pool, self._launcher, self._report, self.clock = pool, launcher, report, clock
        self._poll, self._batch = poll_seconds, batch_size
        self._failing: set[tuple[str, str]] = set()  # schedules whose passes fail, said once
        self.reported: Counter[str] = Counter()  # kind -> how many, since this runner began

    async def put(
        self,
        namespace: str,
        name: str,
        uid: str,
        spec: ScheduleSpec,
        *,
        created: datetime | None = None,
    ) -> None:
        """Add or change a Schedule. Its cursor stays whatever changed (no tick fires
        twice); a new uid starts it afresh, from `created` (default: now)."""
        now = self.clock()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await sql.load(conn, namespace, name)
            stored = None if row is None else core.Stored(row.ref.uid, row.spec, row.state)
            state = core.put_state(stored, uid, spec, now, created)
            next_time = None if spec.suspend else core.next_tick(spec, state.anchor, state.cursor)
            ref = ScheduleRef(namespace, name, uid)
            await sql.upsert(conn, ref, spec, state, next_time, now)

    async def remove(self, namespace: str, name: str) -> None:
        """The Schedule was deleted: no more ticks. Its runs go on."""
        await sql.delete(self._pool, namespace, name)
        self._failing.discard((namespace, name))

    async def status(self, namespace: str, name: str) -> ScheduleStatus | None:
        """The Schedule's status; None when it is not stored."""
        for row in await sql.rows(self._pool, namespace):
            if row.ref.name == name:
                return await self._status(row)
        return None

    async def list_objects(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The Schedules of `namespace` (every one when None) as objects with status."""
        return [
            core.schedule_object(row.ref, row.spec, await self._status(row))
            for row in await sql.rows(self._pool, namespace)
        ]

    async def _status(self, row: sql.ScheduleRow) -> ScheduleStatus:
        source = Source(core.SOURCE_KIND, row.ref.name, row.ref.uid)
        active = await self._launcher.active(row.ref.namespace, source)
        last, next_time = row.last_schedule_time, row.next_schedule_time
        return ScheduleStatus(
            last_schedule_time=None if last is None else tick_time(last),
            next_schedule_time=None if next_time is None else tick_time(next_time),
            active=tuple(active),
            started=row.started,
            skipped=row.skipped,
            missed=row.missed,
        )

    # ---------------------------------------------------------------- passes

    async def run_once(self) -> Counter[str]:
        """One pass over every schedule due now: what was reported, kind -> count.
        Database errors are raised; a schedule whose launcher fails waits for the next."""
        now = self.clock()
        done: Counter[str] = Counter()
        page = await sql.due(self._pool, now, self._batch)
        while page:
            for namespace, name in page:
                done += await self._schedule(namespace, name, now)
            page = await sql.due(self._pool, now, self._batch, page[-1])
        return done

    async def _schedule(self, namespace: str, name: str, now: datetime) -> Counter[str]:
        told: Counter[str] = Counter()
        more = True
        while more:  # a long outage: bounded passes until the schedule is current
            try:
                finished = await self._pass(namespace, name, now)
            except _Retry as retry:
                if (namespace, name) not in self._failing:
                    self._failing.add((namespace, name))
                    what = f"schedule {namespace}/{name}"
                    log.warning("%s: %s; its ticks are tried again", what, retry)
                break
            if finished is None:  # another replica holds it, or it is no longer due
                break
            self._failing.discard((namespace, name))
            told += await self._tell(finished)
            more = finished.plan.more
        return told

    async def _pass(self, namespace: str, name: str, now: datetime) -> _Pass | None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await sql.lock_due(conn, namespace, name, now)
            if row is None:
                return None
            try:
                done = await self._carry_out(row, now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # rolls the pass back: nothing of it is stored
                raise _Retry(describe(exc)) from exc
            added = {
                "started": len(done.started),
                "skipped": len(done.plan.skipped),
                "missed": len(done.plan.missed),
                "failed": len(done.failed),
            }
            last = max((tick for tick, _, _ in done.started), default=None)
            plan = done.plan
            idle = plan.state == row.state and plan.next_time == row.next_schedule_time
            if not idle or any(added.values()):  # a tick only waiting changes nothing
                await sql.advance(conn, row.ref, plan.state, plan.next_time, added, last, now)
        return done

    async def _carry_out(self, row: sql.ScheduleRow, now: datetime) -> _Pass:
        ref, spec = row.ref, row.spec
        source = Source(core.SOURCE_KIND, ref.name, ref.uid)
        active: list[str] = []
        if not spec.suspend:
            active = await self._launcher.active(ref.namespace, source)

        def run_name(tick: datetime) -> str | None:
            return self._call(ref, spec, tick, {}).run_name()

        plan = core.plan(spec, row.state, now, active, run_name)
        done = _Pass(ref, plan, spec.catchup_window)
        for victim in plan.cancel:
            latest = tick_time(plan.fire[-1])
            reason = f"Schedule {ref.name}: tick {latest} replaces it (overlap: CancelPrevious)"
            with contextlib.suppress(LookupError):  # it finished meanwhile
                await self._launcher.cancel(ref.namespace, victim, reason)
                done.cancelled.append(victim)
        for tick in plan.fire:
            try:
                data = core.tick_input(spec, ref, tick)
            except ValueError as exc:  # the input does not render, or cannot be stored
                done.failed.append((tick, str(exc)))
                continue
            try:
                run, created = await self._launcher.start(self._call(ref, spec, tick, data))
            except _REFUSALS as exc:
                done.failed.append((tick, _reason(exc)))
                continue
            done.started.append((tick, run, created))
        return done

    @staticmethod
    def _call(
        ref: ScheduleRef, spec: ScheduleSpec, tick: datetime, data: dict[str, Any]
    ) -> StartCall:
        return StartCall(
            ref.namespace,
            spec.workflow_ref.name,
            data,
            idempotency_key=core.tick_key(ref.uid, tick),
            source=Source(core.SOURCE_KIND, ref.name, ref.uid),
        )

    async def _tell(self, done: _Pass) -> Counter[str]:
        """Report what a committed pass did."""
        plan, told = done.plan, Counter[str]()
        ticks = metrics.SCHEDULE_TICKS
        ref = done.ref
        for outcome, count in (
            ("started", len(done.started)),
            ("skipped", len(plan.skipped)),
            ("missed", len(plan.missed)),
            ("failed", len(done.failed)),
        ):
            if count:
                ticks.labels(ref.namespace, ref.name, outcome).inc(count)
        events: list[tuple[str, str]] = []
        for victim in done.cancelled:
            events.append(
                ("Cancelled", f"asked execution {victim} to cancel: a new tick replaces it")
            )
        for tick, run, created in done.started:
            again = "" if created else " (started by an earlier pass)"
            events.append(("Started", f"tick {tick_time(tick)}: execution {run}{again}"))
        for tick, reason in done.failed:
            events.append(("Failed", f"tick {tick_time(tick)} started nothing: {reason}"))
        for skip in plan.skipped:
            events.append(("Skipped", f"tick {tick_time(skip.tick)} skipped: {skip.reason}"))
        if plan.buffered is not None:
            text = f"tick {tick_time(plan.buffered)} waits for the active run to finish"
            events.append(("Buffered", text + " (BufferOne)"))
        if plan.missed:
            first, last = tick_time(plan.missed[0]), tick_time(plan.missed[-1])
            span = (
                first if len(plan.missed) == 1 else f"{len(plan.missed)} ticks, {first} to {last}"
            )
            why = f"older than catchupWindow {done.window} when seen, not started"
            events.append(("Missed", f"{span}: {why}"))
        for kind, message in events:
            told[kind] += 1
            await self._say(done.ref, kind, message)
        self.reported += told
        return told

    async def _say(self, ref: ScheduleRef, kind: str, message: str) -> None:
        if self._report is None:
            level = logging.WARNING if kind in ("Missed", "Failed") else logging.INFO
            log.log(level, "schedule %s/%s: %s: %s", ref.namespace, ref.name, kind, message)
            return
        try:
            result = self._report(ref.namespace, ref.name, kind, message)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # what happened stands; only its report is lost
            log.warning(
                "schedule %s/%s: reporting %s: %s", ref.namespace, ref.name, kind, describe(exc)
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Pass over the due schedules until `stop` is set: at each next tick, and at
        least every `poll_seconds` (a buffered tick notices its run has finished)."""
        failing = False
        while not stop.is_set():
            wait = self._poll
            try:
                await self.run_once()
                upcoming = await sql.next_due(self._pool)
                # What is still due after a pass is held by another replica or failing:
                # it waits for the poll, like a waiting tick.
                until = None if upcoming is None else (upcoming - self.clock()) / _SECOND
                if until is not None and until > 0:
                    wait = min(self._poll, until)
                if failing:
                    log.info("schedules: passing again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per stretch of failures, not per retry
                    log.warning("schedules: %s; trying again", describe(exc))
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # CorrelationKeyInUseError says it best
    if isinstance(exc, CorrelationKeyInUseError) and isinstance(reason, str):
        return reason
    return str(exc) or type(exc).__name__
