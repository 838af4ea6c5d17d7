"""forEach: one item run per element of a list, each with its own attempts.

A forEach step evaluates its list when its dependencies are done (and its `when`
held), then runs one item per element: the step's input rendered with `item` and
`index`, dispatched under the item key `<step>[<index>]`, so each item has its own
attempt ids (`<execution>/<step>[<index>]/<attempt>`), retries, timeouts and timers.
At most `maxParallel` items are in flight at once (a retrying item keeps its slot);
items start in index order.

The step is Running while items run. It succeeds once every item settled with at
most `toleratedFailures` failed: its output is the list of item outputs in item
order (null for a failed item). One failure more and it fails: items not started
stay Pending and are never started, items waiting to retry fail without their
retry; items in flight finish and are recorded, so
compensation can undo every item that succeeded (`fanout_undo`). Status shows
counts per phase, never every item (`StepState.items` keeps them in the row).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from sagaflow.core.decisions import Dispatch
from sagaflow.core.definition import FAIL, PASS, StepDef
from sagaflow.core.effects import Effects, item_key, render_over, stop_items, timer_key
from sagaflow.core.expressions import ExpressionError
from sagaflow.core.facts import StepCompleted, StepFailed, StepHeartbeat, TimerFired
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.state import Failure, Item, Items, StepState

RUNNING = ExecutionPhase.RUNNING
_ACTIVE = (StepPhase.RUNNING, StepPhase.RETRYING)


def begin(out: Effects, step: StepState, spec: StepDef) -> Failure | None:
    """Start a forEach step whose turn has come; the failure if its list is no list.

    A redriven step keeps the items that succeeded and runs the others again.
    """
    assert spec.for_each is not None
    if step.items is not None:
        items = _rerun(step.items)
    else:
        try:
            value = render_over(out.state, spec.for_each, f"steps.{spec.name}.forEach")
        except ExpressionError as exc:
            return Failure("ExpressionError", str(exc))
        if not isinstance(value, list):
            kind = "null" if value is None else type(value).__name__
            return Failure("InvalidForEach", f"forEach must give a list, got {kind}")
        items = Items.new(tuple(value))
    running = replace(
        step,
        phase=StepPhase.RUNNING,
        attempt=1,
        started_at=step.started_at or out.now,
        attempt_started_at=out.now,
        items=items,
        error=None,
        output=None,
    )
    out.set_step(running)
    limit = f", at most {spec.max_parallel} at once" if spec.max_parallel else ""
    out.record(
        "StepFanningOut",
        f"step {spec.name} runs {len(items)} items{limit}",
        spec.name,
        items=len(items),
    )
    fill(out, spec)
    return None


def _rerun(items: Items) -> Items:
    """Items for a redrive: the succeeded ones kept, every other one Pending again."""
    for index, item in enumerate(items.entries):
        if item.phase is not StepPhase.SUCCEEDED and item.phase is not StepPhase.PENDING:
            items = items.put(index, replace(item, phase=StepPhase.PENDING, error=None))
    return replace(items, cursor=0)


def fill(out: Effects, spec: StepDef) -> None:
    """Dispatch items while slots are free; settle the step when nothing is left."""
    step = out.step(spec.name)
    items = step.items
    assert items is not None
    ready = (
        out.state.phase is RUNNING
        and step.phase is StepPhase.RUNNING
        and not _failed_too_often(spec, items)
        and items.count(StepPhase.PENDING) > 0
    )
    if step.phase is StepPhase.RUNNING and _failed_too_often(spec, items):
        if items.count(StepPhase.RETRYING):
            stop_items(out, step)  # doomed: a retry that has not gone out stays undone
    elif ready:
        active = items.count(*_ACTIVE)
        free = spec.max_parallel - active if spec.max_parallel else len(items)
        if free > 0 and spec.type in (PASS, FAIL):
            _fill_one_by_one(out, spec)
        elif free > 0:
            _dispatch_many(out, spec, free)
    settle(out, spec)


def _fill_one_by_one(out: Effects, spec: StepDef) -> None:
    """Built-in item types settle as they are dispatched, so each may free a slot."""
    while True:
        step = out.step(spec.name)
        items = step.items
        assert items is not None
        if out.state.phase is not RUNNING or step.phase is not StepPhase.RUNNING:
            return
        if _failed_too_often(spec, items):
            return
        if spec.max_parallel and items.count(*_ACTIVE) >= spec.max_parallel:
            return
        index = _next_pending(items)
        if index is None:
            return
        out.set_step(replace(step, items=replace(items, cursor=index + 1)))
        _dispatch(out, spec, index)


def _dispatch_many(out: Effects, spec: StepDef, free: int) -> None:
    """Dispatch up to `free` pending items in order, with one copy of the items.

    A burst (a forEach of 10,000 with no limit starts them all in one transaction)
    must not copy the items once per item."""
    step = out.step(spec.name)
    items = step.items
    assert items is not None
    changed: dict[int, Item] = {}
    index, started = items.cursor, 0
    while started < free and index < len(items):  # an item that fails to render frees its slot
        item = items.entries[index]
        index += 1
        if item.phase is not StepPhase.PENDING:
            continue
        attempt = item.attempt + 1
        key = item_key(spec.name, index - 1)
        try:
            rendered = render_input(out, spec, index - 1)
        except ExpressionError as exc:
            error = Failure("ExpressionError", str(exc))
            changed[index - 1] = Item(StepPhase.FAILED, attempt, None, error)
            message = f"item {key} failed on attempt {attempt}: {error.type}: {error.message}"
            out.record("ItemFailed", message, key, attempt=attempt, error=error.type)
            if items.count(StepPhase.FAILED) + _failed_in(changed) > spec.tolerated_failures:
                break
            continue
        changed[index - 1] = Item(StepPhase.RUNNING, attempt)
        started += 1
        _send(out, spec, key, attempt, rendered)
    out.set_step(replace(step, items=items.put_many(changed, cursor=index)))


def _failed_in(changed: dict[int, Item]) -> int:
    return sum(1 for i in changed.values() if i.phase is StepPhase.FAILED)


def _next_pending(items: Items) -> int | None:
    index = items.cursor
    while index < len(items) and items.entries[index].phase is not StepPhase.PENDING:
        index += 1
    return index if index < len(items) else None


def _failed_too_often(spec: StepDef, items: Items) -> bool:
    return items.count(StepPhase.FAILED) > spec.tolerated_failures


def _dispatch(out: Effects, spec: StepDef, index: int) -> None:
    step = out.step(spec.name)
    assert step.items is not None
    item = step.items.entries[index]
    attempt = item.attempt + 1
    key = item_key(spec.name, index)
    running = replace(item, phase=StepPhase.RUNNING, attempt=attempt, ready=False)
    out.set_step(replace(step, items=step.items.put(index, running)))
    try:
        rendered = render_input(out, spec, index)
    except ExpressionError as exc:
        _item_failed(out, spec, index, Failure("ExpressionError", str(exc)), retryable=False)
        return
    if spec.type == PASS:
        _item_succeeded(out, spec, index, rendered)
        return
    if spec.type == FAIL:
        error = Failure(str(rendered.get("type", "Failed")), str(rendered.get("message", "")))
        _item_failed(out, spec, index, error, retryable=False)
        return
    _send(out, spec, key, attempt, rendered)


def _send(out: Effects, spec: StepDef, key: str, attempt: int, rendered: Any) -> None:
    """The command of one item attempt, its timers and its line of history."""
    deadline = out.now + timedelta(seconds=spec.timeout) if spec.timeout is not None else None
    out.dispatches.append(
        Dispatch(key, attempt, spec.type, rendered, deadline, spec.heartbeat_timeout)
    )
    if deadline is not None:
        out.timer("step-timeout", key, attempt, deadline)
    if spec.heartbeat_timeout is not None:
        due = out.now + timedelta(seconds=spec.heartbeat_timeout)
        out.timer("heartbeat-timeout", key, attempt, due)
    out.record("ItemDispatched", f"item {key} attempt {attempt} dispatched", key, attempt=attempt)


def render_input(out: Effects, spec: StepDef, index: int, *, undo: bool = False) -> Any:
    """The input of one item: the step's input with `item` and `index` set."""
    items = out.step(spec.name).items
    assert items is not None
    extra = {"item": items.values[index], "index": index}
    path = f"steps.{spec.name}.input"
    return render_over(out.state, spec.input, path, undo=undo, extra=extra)


def _current(out: Effects, name: str, index: int, attempt: int) -> tuple[StepDef, Item] | str:
    spec = out.definition.by_name.get(name)
    step = out.state.steps.get(name)
    if spec is None or step is None or step.items is None or index >= len(step.items):
        return f"unknown item {item_key(name, index)}"
    item = step.items.entries[index]
    if item.attempt != attempt:
        return f"attempt {attempt} is not current (current is {item.attempt})"
    if item.phase is not StepPhase.RUNNING:
        return f"attempt {attempt} already settled ({item.phase.value})"
    return spec, item


def completed(out: Effects, name: str, index: int, fact: StepCompleted) -> str | None:
    found = _current(out, name, index, fact.attempt)
    if isinstance(found, str):
        return found
    spec, _ = found
    _item_succeeded(out, spec, index, fact.output)
    fill(out, spec)
    return None


def failed(out: Effects, name: str, index: int, fact: StepFailed) -> str | None:
    found = _current(out, name, index, fact.attempt)
    if isinstance(found, str):
        return found
    spec, _ = found
    error = Failure(fact.error_type, fact.message)
    _item_failed(out, spec, index, error, retryable=fact.retryable)
    fill(out, spec)
    return None


def heartbeat(out: Effects, name: str, index: int, fact: StepHeartbeat) -> str | None:
    found = _current(out, name, index, fact.attempt)
    if isinstance(found, str):
        return found
    spec, _ = found
    if spec.heartbeat_timeout is None:
        return "step has no heartbeat timeout"
    due = out.now + timedelta(seconds=spec.heartbeat_timeout)
    out.timer("heartbeat-timeout", item_key(name, index), fact.attempt, due)
    return None


def timer(out: Effects, name: str, index: int, fact: TimerFired) -> str | None:
    if fact.kind == "retry":
        step = out.state.steps.get(name)
        items = step.items if step is not None else None
        if step is None or items is None or index >= len(items):
            return "retry no longer due"
        item = items.entries[index]
        if item.phase is not StepPhase.RETRYING or item.attempt != fact.attempt - 1:
            return "retry no longer due"
        if out.state.phase is ExecutionPhase.SUSPENDED:
            if item.ready:
                return "suspended: the retry is dispatched on resume"
            out.set_step(replace(step, items=items.put(index, replace(item, ready=True))))
            return None
        if out.state.phase is not RUNNING:
            return "execution no longer running"
        spec = out.definition.step(name)
        _dispatch(out, spec, index)
        fill(out, spec)
        return None
    found = _current(out, name, index, fact.attempt)
    if isinstance(found, str):
        return found
    spec, _ = found
    if fact.kind == "step-timeout":
        error = Failure("StepTimeout", f"no result within {spec.timeout or 0:g}s")
    elif fact.kind == "heartbeat-timeout":
        error = Failure("HeartbeatTimeout", f"no heartbeat within {spec.heartbeat_timeout or 0:g}s")
    else:
        return f"an item has no {fact.kind} timer"
    key = item_key(name, index)
    out.record("ItemTimedOut", f"item {key} attempt {fact.attempt}: {error.message}", key)
    _item_failed(out, spec, index, error, retryable=True)
    fill(out, spec)
    return None


def resume(out: Effects, spec: StepDef) -> None:
    """After a resume: item retries that came due go out, then free slots fill."""
    step = out.step(spec.name)
    items = step.items
    if step.phase is not StepPhase.RUNNING or items is None:
        return
    if items.count(StepPhase.RETRYING):
        for index, item in enumerate(items.entries):
            if item.phase is StepPhase.RETRYING and item.ready:
                out.cancel_timers(timer_key("retry", item_key(spec.name, index), item.attempt + 1))
                _dispatch(out, spec, index)
    fill(out, spec)


def _item_succeeded(out: Effects, spec: StepDef, index: int, output: Any) -> None:
    step = out.step(spec.name)
    assert step.items is not None
    item = step.items.entries[index]
    done = Item(StepPhase.SUCCEEDED, item.attempt, output)  # the constructor: hot, and fast
    out.set_step(replace(step, items=step.items.put(index, done)))
    out.cancel_timers(*_attempt_timers(spec.name, index, item.attempt))
    key = item_key(spec.name, index)
    message = f"item {key} succeeded on attempt {item.attempt}"
    out.record("ItemSucceeded", message, key, attempt=item.attempt)


def _item_failed(
    out: Effects, spec: StepDef, index: int, error: Failure, *, retryable: bool
) -> None:
    step = out.step(spec.name)
    assert step.items is not None
    item = step.items.entries[index]
    key = item_key(spec.name, index)
    out.cancel_timers(*_attempt_timers(spec.name, index, item.attempt))
    can_retry = (
        retryable
        and error.type not in spec.retry.non_retryable_errors
        and item.attempt < spec.retry.max_attempts
        and out.state.underlying_phase is RUNNING
    )
    if not can_retry:
        failed_item = replace(item, phase=StepPhase.FAILED, error=error)
        out.set_step(replace(step, items=step.items.put(index, failed_item)))
        out.record(
            "ItemFailed",
            f"item {key} failed on attempt {item.attempt}: {error.type}: {error.message}",
            key,
            attempt=item.attempt,
            error=error.type,
        )
        return
    delay = spec.retry.delay_after(item.attempt)
    retrying = replace(item, phase=StepPhase.RETRYING, error=error)
    out.set_step(replace(step, items=step.items.put(index, retrying)))
    out.record(
        "ItemRetrying",
        f"item {key} attempt {item.attempt} failed ({error.type}: {error.message}); "
        f"attempt {item.attempt + 1} in {delay:g}s",
        key,
        attempt=item.attempt,
        error=error.type,
    )
    if delay <= 0 and out.state.phase is RUNNING:
        _dispatch(out, spec, index)
    else:
        out.timer("retry", key, item.attempt + 1, out.now + timedelta(seconds=delay))


def _attempt_timers(name: str, index: int, attempt: int) -> tuple[str, ...]:
    key = item_key(name, index)
    return (timer_key("step-timeout", key, attempt), timer_key("heartbeat-timeout", key, attempt))


def settle(out: Effects, spec: StepDef) -> None:
    """End the step once no item is in flight and none will start: Succeeded within
    the tolerated failures, else Failed. Then the run carries on (`forward`)."""
    from sagaflow.core import forward  # forward calls this module: imported late

    step = out.step(spec.name)
    items = step.items
    if step.phase is not StepPhase.RUNNING or items is None or items.count(*_ACTIVE):
        return
    failed = items.count(StepPhase.FAILED)
    pending = items.count(StepPhase.PENDING)
    succeeded = items.count(StepPhase.SUCCEEDED)
    if pending and not _failed_too_often(spec, items) and out.state.underlying_phase is RUNNING:
        return  # more items start once the run is dispatching again
    if not pending and not _failed_too_often(spec, items):
        output = [e.output if e.phase is StepPhase.SUCCEEDED else None for e in items.entries]
        forward.succeed(out, step, output)
        forward.after_result(out, spec.name, succeeded=True)
        return
    error = _items_error(spec, items, failed, pending)
    out.set_step(replace(step, phase=StepPhase.FAILED, finished_at=out.now, error=error))
    out.record(
        "StepFailed",
        f"step {spec.name} failed: {error.message}",
        spec.name,
        attempt=step.attempt,
        error=error.type,
        succeeded=succeeded,
        failed=failed,
    )
    if out.state.underlying_phase is RUNNING:
        from sagaflow.core import compensation

        cause = Failure(error.type, f"step {spec.name} failed: {error.message}", step=spec.name)
        compensation.fail(out, cause)
    else:
        forward.after_result(out, spec.name, succeeded=succeeded > 0)


def _items_error(spec: StepDef, items: Items, failed: int, pending: int) -> Failure:
    if failed <= spec.tolerated_failures:
        return Failure("Stopped", f"the run stopped with {pending} of {len(items)} items not run")
    first = next((i, e) for i, e in enumerate(items.entries) if e.phase is StepPhase.FAILED)
    index, entry = first
    cause = entry.error or Failure("Error", "")
    message = (
        f"{failed} of {len(items)} items failed (toleratedFailures {spec.tolerated_failures}); "
        f"first: item {index}: {cause.type}: {cause.message}"
    )
    if pending:
        message += f"; {pending} not started"
    return Failure("ItemsFailed", message)


def has_successes(step: StepState) -> bool:
    return step.items is not None and step.items.count(StepPhase.SUCCEEDED) > 0


def summary(step: StepState) -> dict[str, int]:
    """Counts of items per phase, for status (bounded whatever the list's length)."""
    assert step.items is not None
    counts = {p.value: n for p, n in step.items.counts.items() if n}
    return {"total": len(step.items), **counts}
