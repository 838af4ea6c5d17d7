"""When a Schedule's ticks fall and what a pass does with them: cron in a time zone
across both DST transitions, intervals, catch-up, every overlap policy, suspension."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sagaflow.core.expressions import ExpressionError
from sagaflow.core.schedules import (
    MAX_TICKS,
    Plan,
    ScheduleRef,
    ScheduleState,
    Skipped,
    Stored,
    next_tick,
    plan,
    put_state,
    schedule_object,
    tick_input,
    tick_key,
    tick_time,
    ticks,
)
from sagaflow.core.trigger_specs import ScheduleSpec, ScheduleStatus

REF = ScheduleRef("ops", "nightly", "uid-1")
ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)


def spec(**fields: Any) -> ScheduleSpec:
    if "interval" not in fields:
        fields.setdefault("cron", "0 * * * *")
    return ScheduleSpec.model_validate({"workflowRef": {"name": "report"}, **fields})


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def iso(found: list[datetime]) -> list[str]:
    return [tick_time(t) for t in found]


# ------------------------------------------------------------------ ticks


def test_cron_ticks_are_the_half_open_range_after_until() -> None:
    daily = spec(cron="0 2 * * *")
    found = ticks(daily, ANCHOR, utc("2026-01-01T02:00:00Z"), utc("2026-01-03T02:00:00Z"), 10)
    assert iso(found) == ["2026-01-02T02:00:00Z", "2026-01-03T02:00:00Z"]
    assert ticks(daily, ANCHOR, utc("2026-01-01T02:00:00Z"), utc("2026-01-02T01:59:59Z"), 9) == []
    assert len(ticks(spec(cron="* * * * *"), ANCHOR, ANCHOR, utc("2026-01-02T00:00:00Z"), 5)) == 5


def test_cron_is_wall_time_in_the_time_zone() -> None:
    # 02:00 in Amsterdam is 01:00 UTC in winter and 00:00 UTC in summer.
    amsterdam = spec(cron="0 2 * * *", timezone="Europe/Amsterdam")
    winter = ticks(amsterdam, ANCHOR, utc("2026-01-10T12:00:00Z"), utc("2026-01-11T12:00:00Z"), 9)
    summer = ticks(amsterdam, ANCHOR, utc("2026-07-10T12:00:00Z"), utc("2026-07-11T12:00:00Z"), 9)
    assert iso(winter) == ["2026-01-11T01:00:00Z"]
    assert iso(summer) == ["2026-07-11T00:00:00Z"]


# Each DST transition of 2026 in both zones: a wall time the clock skips fires once, at
# the first valid instant after it; a wall time it repeats fires once, the first time.
DST = [
    # Europe/Amsterdam, 29 March: 02:00 CET -> 03:00 CEST (01:00 UTC).
    (
        "Europe/Amsterdam",
        "30 2 * * *",
        "2026-03-28T12:00Z",
        "2026-03-29T12:00Z",
        ["2026-03-29T01:00:00Z"],
    ),
    (
        "Europe/Amsterdam",
        "0 2 * * *",
        "2026-03-28T12:00Z",
        "2026-03-29T12:00Z",
        ["2026-03-29T01:00:00Z"],
    ),
    # Every candidate in the gap (02:00, 02:30) and 03:00 itself are one instant.
    (
        "Europe/Amsterdam",
        "*/30 * * * *",
        "2026-03-29T00:00Z",
        "2026-03-29T01:30Z",
        ["2026-03-29T00:30:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"],
    ),
    # Europe/Amsterdam, 25 October: 03:00 CEST -> 02:00 CET (01:00 UTC); 02:30 happens twice.
    (
        "Europe/Amsterdam",
        "30 2 * * *",
        "2026-10-24T12:00Z",
        "2026-10-25T12:00Z",
        ["2026-10-25T00:30:00Z"],
    ),
    (
        "Europe/Amsterdam",
        "0 * * * *",
        "2026-10-24T23:30Z",
        "2026-10-25T03:00Z",
        ["2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z", "2026-10-25T03:00:00Z"],
    ),
    # America/New_York, 8 March: 02:00 EST -> 03:00 EDT (07:00 UTC).
    (
        "America/New_York",
        "30 2 * * *",
        "2026-03-07T12:00Z",
        "2026-03-08T12:00Z",
        ["2026-03-08T07:00:00Z"],
    ),
    (
        "America/New_York",
        "15 2,3 * * *",
        "2026-03-08T00:00Z",
        "2026-03-08T12:00Z",
        ["2026-03-08T07:00:00Z", "2026-03-08T07:15:00Z"],
    ),
    # America/New_York, 1 November: 02:00 EDT -> 01:00 EST (06:00 UTC); 01:30 twice.
    (
        "America/New_York",
        "30 1 * * *",
        "2026-10-31T12:00Z",
        "2026-11-01T12:00Z",
        ["2026-11-01T05:30:00Z"],
    ),
    (
        "America/New_York",
        "*/30 1,2 * * *",
        "2026-11-01T05:00Z",
        "2026-11-01T08:00Z",
        ["2026-11-01T05:30:00Z", "2026-11-01T07:00:00Z", "2026-11-01T07:30:00Z"],
    ),
]


@pytest.mark.parametrize(("zone", "cron", "after", "until", "expected"), DST)
def test_dst_transitions_fire_each_tick_once(
    zone: str, cron: str, after: str, until: str, expected: list[str]
) -> None:
    found = ticks(spec(cron=cron, timezone=zone), ANCHOR, utc(after), utc(until), 50)
    assert iso(found) == expected


def test_a_cursor_in_the_repeated_hour_does_not_go_back_to_its_first_pass() -> None:
    # 06:10 UTC is 01:10 EST, the second 01:10 of the night; the quarters of that hour
    # fired during its first pass (EDT), so the next tick is 02:00 EST.
    quarters = spec(cron="*/15 * * * *", timezone="America/New_York")
    assert tick_time(next_tick(quarters, ANCHOR, utc("2026-11-01T06:10:00Z"))) == (  # type: ignore[arg-type]
        "2026-11-01T07:00:00Z"
    )


def test_interval_ticks_count_from_the_anchor_in_utc() -> None:
    every = spec(interval="15m")
    anchor = utc("2026-03-29T00:50:00Z")  # no DST in UTC: steps straight through 01:00
    found = ticks(every, anchor, anchor - timedelta(hours=1), utc("2026-03-29T01:35:00Z"), 9)
    assert iso(found) == ["2026-03-29T01:05:00Z", "2026-03-29T01:20:00Z", "2026-03-29T01:35:00Z"]
    later = ticks(every, anchor, utc("2026-03-29T01:21:00Z"), utc("2026-03-29T02:00:00Z"), 9)
    assert iso(later) == ["2026-03-29T01:35:00Z", "2026-03-29T01:50:00Z"]
    odd = spec(interval="1.5s")
    assert iso(ticks(odd, anchor, anchor, anchor + timedelta(seconds=3), 9)) == [
        "2026-03-29T00:50:01.500000Z",
        "2026-03-29T00:50:03Z",
    ]


def test_a_cron_with_no_date_has_no_next_tick() -> None:
    assert next_tick(spec(cron="0 0 30 2 *"), ANCHOR, ANCHOR) is None


def test_a_tick_key_is_the_uid_and_the_tick_in_utc() -> None:
    tick = datetime(2026, 3, 29, 3, 0, tzinfo=ZoneInfo("Europe/Amsterdam"))
    assert tick_key("uid-1", tick) == "schedule/uid-1/2026-03-29T01:00:00Z"


def test_the_input_renders_over_the_tick() -> None:
    s = spec(input={"day": "${{ schedule.time }}", "who": "${{ schedule.name }}", "n": 1})
    tick = utc("2026-03-29T01:00:00Z")
    assert tick_input(s, REF, tick) == {"day": "2026-03-29T01:00:00Z", "who": "nightly", "n": 1}
    with pytest.raises(ExpressionError, match=r"spec\.input\.x"):
        tick_input(spec(input={"x": "${{ length(schedule.missing) }}"}), REF, tick)


# ------------------------------------------------------------------ passes

NOW = utc("2026-05-10T12:00:30Z")
HOURLY = spec()  # "0 * * * *", catchupWindow 1h, overlap Skip


def state(cursor: str, buffered: str | None = None) -> ScheduleState:
    return ScheduleState(ANCHOR, utc(cursor), None if buffered is None else utc(buffered))


def names(tick: datetime) -> str:
    return f"run-{tick.hour}"


def summary(p: Plan) -> dict[str, Any]:
    return {
        "fire": iso(list(p.fire)),
        "skipped": iso([s.tick for s in p.skipped]),
        "missed": iso(list(p.missed)),
        "cancel": list(p.cancel),
        "waiting": None if p.state.buffered is None else tick_time(p.state.buffered),
    }


def test_a_due_tick_fires_and_moves_the_cursor_to_it() -> None:
    p = plan(HOURLY, state("2026-05-10T11:00:00Z"), NOW)
    assert summary(p)["fire"] == ["2026-05-10T12:00:00Z"]
    assert p.state.cursor == utc("2026-05-10T12:00:00Z")
    assert p.next_time == utc("2026-05-10T13:00:00Z") and not p.more
    # Nothing new until the next tick: the same pass again does nothing.
    again = plan(HOURLY, p.state, NOW + timedelta(minutes=59))
    assert summary(again)["fire"] == [] and again.state == p.state


def test_after_an_outage_ticks_inside_the_window_fire_and_older_ones_are_missed() -> None:
    every = spec(cron="*/20 * * * *", overlap="Allow")
    p = plan(every, state("2026-05-10T09:00:00Z"), NOW)
    assert summary(p) == {
        # 11:00:30 is the horizon: 11:20, 11:40 and 12:00 are inside the window.
        "fire": ["2026-05-10T11:20:00Z", "2026-05-10T11:40:00Z", "2026-05-10T12:00:00Z"],
        "skipped": [],
        "missed": ["2026-05-10T09:20:00Z", "2026-05-10T09:40:00Z", "2026-05-10T10:00:00Z",
                   "2026-05-10T10:20:00Z", "2026-05-10T10:40:00Z", "2026-05-10T11:00:00Z"],
        "cancel": [],
        "waiting": None,
    }  # fmt: skip
    # A tick exactly catchupWindow old still fires.
    edge = plan(every, state("2026-05-10T10:50:00Z"), utc("2026-05-10T12:00:00Z"))
    assert summary(edge)["fire"][0] == "2026-05-10T11:00:00Z" and edge.missed == ()


OVERLAP = [
    # Two ticks due (11:00 and 12:00, after an outage): policy, active runs, what fires,
    # what is skipped, what is cancelled, what is left waiting.
    ("Skip", [], ["11:00"], ["12:00"], [], None),  # the first one's run is active then
    ("Skip", ["old"], [], ["11:00", "12:00"], [], None),
    ("Allow", ["old"], ["11:00", "12:00"], [], [], None),
    ("BufferOne", [], ["11:00"], [], [], "12:00"),
    ("BufferOne", ["old"], [], ["12:00"], [], "11:00"),
    ("CancelPrevious", ["old", "older"], ["12:00"], ["11:00"], ["old", "older"], None),
]


@pytest.mark.parametrize(("policy", "active", "fire", "skipped", "cancel", "waiting"), OVERLAP)
def test_overlap_policies_over_two_due_ticks(
    policy: str,
    active: list[str],
    fire: list[str],
    skipped: list[str],
    cancel: list[str],
    waiting: str | None,
) -> None:
    s = spec(overlap=policy, catchupWindow="2h")
    p = plan(s, state("2026-05-10T10:00:00Z"), NOW, active, names)

    def at(hours: list[str]) -> list[str]:
        return [f"2026-05-10T{h}:00Z" for h in hours]

    assert summary(p) == {
        "fire": at(fire),
        "skipped": at(skipped),
        "missed": [],
        "cancel": cancel,
        "waiting": None if waiting is None else at([waiting])[0],
    }
    assert p.state.cursor == utc("2026-05-10T12:00:00Z")


def test_skip_names_the_run_that_has_not_finished() -> None:
    p = plan(HOURLY, state("2026-05-10T11:00:00Z"), NOW, ["report-1a2b"])
    reason = "execution report-1a2b has not finished (Skip)"
    assert p.skipped == (Skipped(utc("2026-05-10T12:00:00Z"), reason),)


def test_buffer_one_waits_for_the_run_then_fires_however_old_the_tick_is() -> None:
    s = spec(overlap="BufferOne", catchupWindow="3h")
    first = plan(s, state("2026-05-10T11:00:00Z"), NOW, ["old"], names)
    assert first.buffered == utc("2026-05-10T12:00:00Z") and first.fire == ()
    # Still running two hours later: the waiting tick stays, the later ones are skipped.
    later = NOW + timedelta(hours=2)
    second = plan(s, first.state, later, ["old"], names)
    assert summary(second)["skipped"] == ["2026-05-10T13:00:00Z", "2026-05-10T14:00:00Z"]
    assert second.state.buffered == first.state.buffered and second.buffered is None
    assert "tick 2026-05-10T12:00:00Z is already waiting" in second.skipped[0].reason
    # The run ended (at 18:00): the buffered tick fires, though older than the window,
    # and since its run is now active the next on-time tick waits in its place.
    third = plan(s, second.state, later + timedelta(hours=4), [], names)
    assert summary(third) == {
        "fire": ["2026-05-10T12:00:00Z"],
        "skipped": ["2026-05-10T17:00:00Z", "2026-05-10T18:00:00Z"],
        "missed": ["2026-05-10T15:00:00Z"],
        "cancel": [],
        "waiting": "2026-05-10T16:00:00Z",
    }


def test_a_buffered_tick_under_a_policy_changed_since_is_judged_by_the_new_one() -> None:
    waiting = state("2026-05-10T12:00:00Z", buffered="2026-05-10T11:00:00Z")
    p = plan(spec(overlap="Skip"), waiting, NOW, ["old"], names)
    assert summary(p)["skipped"] == ["2026-05-10T11:00:00Z"] and p.state.buffered is None


def test_cancel_previous_cancels_nothing_when_no_tick_is_due() -> None:
    p = plan(spec(overlap="CancelPrevious"), state("2026-05-10T12:00:00Z"), NOW, ["old"], names)
    assert p.cancel == () and p.fire == ()


def test_a_tick_whose_run_is_already_active_fires_again_instead_of_being_skipped() -> None:
    # A pass started run-12 and failed before storing its cursor: the retry must not
    # count its own run as an earlier one.
    p = plan(HOURLY, state("2026-05-10T11:00:00Z"), NOW, ["run-12"], names)
    assert summary(p)["fire"] == ["2026-05-10T12:00:00Z"] and p.skipped == ()
    replacing = spec(overlap="CancelPrevious")
    cancel = plan(replacing, state("2026-05-10T11:00:00Z"), NOW, ["run-12"], names)
    assert cancel.cancel == () and summary(cancel)["fire"] == ["2026-05-10T12:00:00Z"]


def test_suspended_nothing_fires_and_the_cursor_moves_to_now() -> None:
    s = spec(overlap="BufferOne", suspend=True)
    p = plan(s, state("2026-05-10T09:00:00Z", buffered="2026-05-10T08:00:00Z"), NOW, ["old"])
    assert p.fire == () and p.missed == () and p.next_time is None
    assert p.skipped == (Skipped(utc("2026-05-10T08:00:00Z"), "suspended"),)
    assert p.state.cursor == NOW and p.state.buffered is None


def test_a_long_outage_is_worked_off_in_bounded_passes() -> None:
    minutely = spec(cron="* * * * *")
    start = state("2026-05-01T00:00:00Z")
    first = plan(minutely, start, NOW)
    assert first.more and len(first.missed) == MAX_TICKS and first.fire == ()
    assert first.state.cursor == utc("2026-05-01T00:00:00Z") + timedelta(minutes=MAX_TICKS)
    assert first.next_time is not None and first.next_time < NOW


# ------------------------------------------------------------------ puts


def test_a_put_of_the_same_uid_keeps_the_cursor_whatever_changed() -> None:
    before = ScheduleState(ANCHOR, utc("2026-05-10T11:00:00Z"), utc("2026-05-10T10:00:00Z"))
    stored = Stored("uid-1", HOURLY, before)
    changed = spec(cron="*/5 * * * *", input={"x": 1}, overlap="BufferOne")
    assert put_state(stored, "uid-1", changed, NOW) == before


def test_a_resume_moves_the_cursor_to_now() -> None:
    stored = Stored("uid-1", spec(suspend=True), state("2026-05-10T03:00:00Z"))
    assert put_state(stored, "uid-1", HOURLY, NOW).cursor == NOW


def test_a_new_uid_starts_afresh_with_ticks_since_its_creation_inside_the_window() -> None:
    stored = Stored("uid-0", HOURLY, state("2026-05-01T00:00:00Z"))
    fresh = put_state(stored, "uid-1", HOURLY, NOW)
    assert fresh == ScheduleState(NOW.replace(microsecond=0), NOW)
    created = utc("2026-05-10T11:30:00.250Z")
    assert put_state(None, "uid-1", HOURLY, NOW, created) == ScheduleState(
        utc("2026-05-10T11:30:00Z"), created
    )
    long_ago = put_state(None, "uid-1", HOURLY, NOW, utc("2026-04-01T00:00:00Z"))
    assert long_ago.cursor == NOW - timedelta(hours=1)


def test_the_schedule_object_is_camel_case() -> None:
    status = ScheduleStatus(next_schedule_time="2026-05-10T13:00:00Z", active=("a",), started=2)
    found = schedule_object(REF, spec(timezone="Europe/Amsterdam"), status)
    assert found["metadata"] == {"name": "nightly", "namespace": "ops", "uid": "uid-1"}
    assert found["spec"]["workflowRef"] == {"name": "report"}
    assert (
        found["spec"]["catchupWindow"] == "1h" and found["spec"]["timezone"] == "Europe/Amsterdam"
    )
    assert found["status"] == {
        "lastScheduleTime": None,
        "nextScheduleTime": "2026-05-10T13:00:00Z",
        "active": ["a"],
        "started": 2,
        "skipped": 0,
        "missed": 0,
    }
