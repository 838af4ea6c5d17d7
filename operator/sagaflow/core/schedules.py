"""When a Schedule's ticks fall, and what a pass over a schedule does with them.

Pure: the spec, what is stored about the schedule (`ScheduleState`), the time and the
names of its unfinished runs go in; a `Plan` comes out, which the runtime
(`sagaflow.runtime.schedules`) carries out under the schedule's row lock. Every rule
about time and overlap sits here so it is tested without a clock or a database.

Ticks
- `cron` is read as wall time in `timezone`. Wall-clock candidates come from croniter
  on naive datetimes (no DST arithmetic of its own) and are mapped to instants here:
  a wall time that does not exist (spring forward) becomes the first instant after
  it, the transition itself, and a repeated one (fall back) its first occurrence.
  Several candidates inside one gap become the same instant, which fires once.
- `interval` ticks are every interval from the schedule's anchor (its creation,
  to the second), in UTC.
- Ticks are taken from the half-open range (cursor, now]; the cursor is the last
  nominal tick handled, so each tick is handled by exactly one pass.

A pass (`plan`), for the ticks that fell due since the cursor, in order:
- A tick older than `catchupWindow` at `now` (the runner was down) is *missed*:
  counted and reported, never fired late. Younger ones are judged by `overlap`, each
  as if it had come alone, with a run started by an earlier tick of the same pass
  counted as still running (a catch-up has no way to know it would have finished):
  `Skip` fires the first and skips the rest while a run is active; `Allow` fires
  all; `BufferOne` fires when nothing runs, else keeps one tick waiting (the oldest;
  later ones are skipped) and fires it in a later pass once no run is active, however
  old it has grown, since it was on time when it was buffered; `CancelPrevious`
  cancels the active runs and fires only the latest tick, the earlier ones of the
  pass being skipped as superseded (each would be cancelled at once by the next).
- A tick whose own run is already active (a pass that started it and then failed
  before storing its cursor) fires again: the start path's key makes that a repeat.
- `suspend`: nothing fires, a waiting tick is dropped (skipped), and the cursor moves
  to `now`, so the ticks passed while suspended never fire after a resume.
- At most `MAX_TICKS` ticks per pass, so a long outage is worked off in bounded
  steps (`Plan.more`); nothing is lost, each step moves the cursor on.

A tick's idempotency key is `schedule/<uid>/<tick in UTC, ISO 8601>`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter

from sagaflow.core.durations import parse_duration
from sagaflow.core.expressions import render
from sagaflow.core.jsonsafe import unstorable
from sagaflow.core.manifests import API_VERSION
from sagaflow.core.trigger_specs import Overlap, ScheduleSpec, ScheduleStatus

SOURCE_KIND = "schedule"
# Ticks handled by one pass at most: bounds the work (and the transaction) of a pass
# after a long outage of a frequent schedule.
MAX_TICKS = 1000
_SECOND = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class ScheduleRef:
    """Which Schedule: its namespace, name and uid (the uid scopes its keys)."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What is kept about a schedule between passes."""

    anchor: datetime  # its creation: interval ticks count from here
    cursor: datetime  # the last nominal tick handled (or when handling began)
    buffered: datetime | None = None  # BufferOne: the tick waiting for a run to end


@dataclass(frozen=True, slots=True)
class Skipped:
    tick: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What one pass does: cancel, then fire in order, and store `state`."""

    state: ScheduleState
    fire: tuple[datetime, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    missed: tuple[datetime, ...] = ()
    cancel: tuple[str, ...] = ()  # run names (CancelPrevious)
    buffered: datetime | None = None  # a tick newly set waiting by this pass
    next_time: datetime | None = None  # the first tick after the new cursor
    more: bool = False  # MAX_TICKS were handled; more are due already


# ------------------------------------------------------------------ ticks


def ticks(
    spec: ScheduleSpec, anchor: datetime, after: datetime, until: datetime, limit: int
) -> list[datetime]:
    """The nominal ticks in (after, until], oldest first, at most `limit`; aware UTC."""
    found: list[datetime] = []
    for tick in _ticks(spec, anchor, after):
        if tick > until or len(found) >= limit:
            break
        found.append(tick)
    return found


def next_tick(spec: ScheduleSpec, anchor: datetime, after: datetime) -> datetime | None:
    """The first nominal tick after `after`; None when the spec has none (`0 0 30 2 *`)."""
    return next(_ticks(spec, anchor, after), None)


def _ticks(spec: ScheduleSpec, anchor: datetime, after: datetime) -> Iterator[datetime]:
    if spec.interval is not None:
        return _interval_ticks(parse_duration(spec.interval), anchor, after)
    assert spec.cron is not None  # the model asks for one of the two
    return _cron_ticks(spec.cron, ZoneInfo(spec.timezone), after)


def _interval_ticks(seconds: float, anchor: datetime, after: datetime) -> Iterator[datetime]:
    # Whole microseconds, multiplied rather than added up, so ticks never drift.
    step = timedelta(microseconds=round(seconds * 1_000_000))
    n = max(1, (after - anchor) // step + 1)
    while True:
        yield (anchor + n * step).astimezone(UTC)
        n += 1


def _cron_ticks(expr: str, zone: ZoneInfo, after: datetime) -> Iterator[datetime]:
    candidates = croniter(expr, after.astimezone(zone).replace(tzinfo=None))
    last = after
    while True:
        try:
            wall = candidates.get_next(datetime)
        except CroniterError:  # a date that never comes (30 February)
            return
        at = _instant(wall, zone)
        # The mapping never goes back in time, but several walls of a gap share one
        # instant, and after a fall back the first pass of the hour lies before `after`.
        if at > last:
            last = at
            yield at


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant of a wall time in `zone`: its first occurrence, or, when the clock
    skipped it, the first instant after it."""
    at = wall.replace(tzinfo=zone).astimezone(UTC)  # fold=0: the first occurrence
    if at.astimezone(zone).replace(tzinfo=None) == wall:
        return at
    # In a gap, fold=1 reads the wall with the offset after the jump and lands before
    # the transition, fold=0 with the one before and lands after it. Bisect between
    # them for the first instant whose wall time is not before `wall` (transitions
    # fall on whole seconds).
    lo = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    hi = at
    while hi - lo > _SECOND:
        mid = lo + ((hi - lo) // 2 // _SECOND) * _SECOND
        if mid.astimezone(zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return hi


def tick_time(tick: datetime) -> str:
    """A tick in UTC, ISO 8601 with `Z`: `2026-03-29T01:00:00Z`."""
    at = tick.astimezone(UTC)
    text = at.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{at.microsecond:06d}Z" if at.microsecond else f"{text}Z"


def tick_key(uid: str, tick: datetime) -> str:
    """The start path's idempotency key of a tick: one run per tick, ever."""
    return f"{SOURCE_KIND}/{uid}/{tick_time(tick)}"


def tick_input(spec: ScheduleSpec, ref: ScheduleRef, tick: datetime) -> dict[str, Any]:
    """The run's input for `tick`; ValueError (ExpressionError) naming the field."""
    context = {"schedule": {"time": tick_time(tick), "name": ref.name, "namespace": ref.namespace}}
    value = render(spec.input, context, "spec.input")
    problem = unstorable(value, "spec.input")
    if problem is not None:
        raise ValueError(f"{problem} cannot be stored")
    return dict(value)


# ------------------------------------------------------------------ state and passes


@dataclass(frozen=True, slots=True)
class Stored:
    """A schedule as it is stored, before a put."""

    uid: str
    spec: ScheduleSpec
    state: ScheduleState


def put_state(
    stored: Stored | None,
    uid: str,
    spec: ScheduleSpec,
    now: datetime,
    created: datetime | None = None,
) -> ScheduleState:
    """The state after the Schedule is put (created, changed, or seen again).

    The same uid keeps the anchor, the cursor and a waiting tick, whatever changed in
    the spec, so no tick fires twice and an outage's ticks are still caught up; a
    resume moves the cursor to `now`. A new uid (created, or deleted and created again)
    starts afresh: ticks since `created`, inside the catch-up window, still fire."""
    if stored is not None and stored.uid == uid:
        if stored.spec.suspend and not spec.suspend:
            state = stored.state
            return ScheduleState(state.anchor, max(state.cursor, now), state.buffered)
        return stored.state
    born = created or now
    window = timedelta(seconds=parse_duration(spec.catchup_window))
    return ScheduleState(born.replace(microsecond=0), min(now, max(born, now - window)))


def plan(
    spec: ScheduleSpec,
    state: ScheduleState,
    now: datetime,
    active: Collection[str] = (),
    run_name: Callable[[datetime], str | None] | None = None,
) -> Plan:
    """What a pass at `now` does. `active` names the schedule's unfinished runs;
    `run_name` the run a tick starts (to tell its own runs from earlier ones)."""
    if spec.suspend:
        dropped = () if state.buffered is None else (Skipped(state.buffered, "suspended"),)
        moved = ScheduleState(state.anchor, max(state.cursor, now))
        return Plan(moved, skipped=dropped)
    due = ticks(spec, state.anchor, state.cursor, now, MAX_TICKS + 1)
    more = len(due) > MAX_TICKS
    due = due[:MAX_TICKS]
    horizon = now - timedelta(seconds=parse_duration(spec.catchup_window))
    missed = tuple(t for t in due if t < horizon)
    candidates = [t for t in due if t >= horizon]
    if state.buffered is not None:
        candidates.insert(0, state.buffered)
    own = {run_name(t): t for t in candidates} if run_name is not None else {}
    begun = {own[n] for n in active if n in own}
    previous = tuple(n for n in active if n not in own)
    judged = _Overlap(spec.overlap, previous, begun)
    judged.judge(candidates)
    cursor = due[-1] if due else state.cursor
    after = ScheduleState(state.anchor, cursor, judged.waiting)
    newly = judged.waiting if judged.waiting != state.buffered else None
    return Plan(
        after,
        tuple(judged.fire),
        tuple(judged.skipped),
        missed,
        judged.cancel,
        newly,
        next_tick(spec, state.anchor, cursor),
        more,
    )


class _Overlap:
    """The overlap policy applied to one pass's ticks, in order."""

    def __init__(self, policy: Overlap, previous: tuple[str, ...], begun: set[datetime]) -> None:
        self.policy, self.previous, self.begun = policy, previous, begun
        self.running = bool(previous)
        self.fire: list[datetime] = []
        self.skipped: list[Skipped] = []
        self.cancel: tuple[str, ...] = ()
        self.waiting: datetime | None = None

    def judge(self, candidates: list[datetime]) -> None:
        fresh = []
        for tick in candidates:
            if tick in self.begun:
                self.fire.append(tick)
                self.running = True
            else:
                fresh.append(tick)
        if self.policy is Overlap.CANCEL_PREVIOUS:
            self._replace(fresh)
            return
        for tick in fresh:
            self._one(tick)
        self.fire.sort()

    def _one(self, tick: datetime) -> None:
        waiting = self.waiting
        if self.policy is Overlap.ALLOW or not self.running:
            self.fire.append(tick)
            self.running = True
        elif self.policy is not Overlap.BUFFER_ONE:
            self.skipped.append(Skipped(tick, f"{self._who()} has not finished (Skip)"))
        elif waiting is None:
            self.waiting = tick
        else:
            reason = f"tick {tick_time(waiting)} is already waiting (BufferOne)"
            self.skipped.append(Skipped(tick, reason))

    def _replace(self, fresh: list[datetime]) -> None:
        if not fresh:
            return
        latest = fresh[-1]
        for tick in fresh[:-1]:
            reason = f"superseded by tick {tick_time(latest)} (CancelPrevious)"
            self.skipped.append(Skipped(tick, reason))
        self.fire = sorted([*self.fire, latest])
        self.cancel = self.previous

    def _who(self) -> str:
        if not self.previous:
            return "the run of an earlier tick of this catch-up"
        shown = ", ".join(self.previous[:3]) + (", ..." if len(self.previous) > 3 else "")
        return f"execution {shown}" if len(self.previous) == 1 else f"executions {shown}"


def schedule_object(ref: ScheduleRef, spec: ScheduleSpec, status: ScheduleStatus) -> dict[str, Any]:
    """A Schedule as the API and `sagaflow get schedules` show it, with its status."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Schedule",
        "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "status": status.model_dump(mode="json", by_alias=True),
    }
