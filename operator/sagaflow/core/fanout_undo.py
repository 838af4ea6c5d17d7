"""Compensating a forEach step: each item that succeeded is undone on its own.

When compensation reaches a forEach step (`compensation._dispatch`), every item
that Succeeded gets its own compensation command under its item key
(`<execution>/<step>[<index>]/compensate/<attempt>`), with the compensation's retry
policy and timeout, at most `maxParallel` at once. The compensation input sees
`item` and `index`, and `steps.<step>.output` / `.input` are that item's output and
input. Items that failed or never started are not undone.

The step is Compensated once every such item is; if one fails for good it is
CompensationFailed (its error names the item), and a redrive retries only the
items whose undo failed.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from sagaflow.core.decisions import Dispatch
from sagaflow.core.definition import FAIL, PASS, StepDef
from sagaflow.core.effects import Effects, context, item_key, timer_key
from sagaflow.core.expressions import ExpressionError, render
from sagaflow.core.facts import StepCompleted, StepFailed, StepHeartbeat, TimerFired
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.payload_refs import ReferenceAccessError, reveal, stand_in
from sagaflow.core.state import Failure, Item, Items

_UNDOING = StepPhase.COMPENSATING
_SUSPENDED = ExecutionPhase.SUSPENDED


def begin(out: Effects, spec: StepDef) -> None:
    """Start undoing the step's items (its Undo is `running` from here on)."""
    step = out.step(spec.name)
    assert step.items is not None
    assert step.undo is not None
    items = step.items
    for index, item in enumerate(items.entries):
        if item.phase is StepPhase.COMPENSATION_FAILED:  # a redrive: try it again
            items = items.put(index, replace(item, phase=StepPhase.SUCCEEDED, undo_error=None))
    undo = replace(
        step.undo,
        status="running",
        attempt=max(step.undo.attempt, 1),
        started_at=step.undo.started_at or out.now,
        attempt_started_at=out.now,
    )
    out.set_step(
        replace(step, phase=StepPhase.COMPENSATING, undo=undo, items=replace(items, cursor=0))
    )
    out.record(
        "StepCompensating",
        f"step {spec.name}: undoing {items.count(StepPhase.SUCCEEDED)} items",
        spec.name,
    )
    _fill(out, spec)


def _fill(out: Effects, spec: StepDef) -> None:
    step = out.step(spec.name)
    items = step.items
    assert items is not None
    while out.state.phase is not _SUSPENDED:
        if spec.max_parallel and items.count(_UNDOING) >= spec.max_parallel:
            break
        index = items.cursor
        while index < len(items) and items.entries[index].phase is not StepPhase.SUCCEEDED:
            index += 1
        if index >= len(items):
            break
        out.set_step(replace(step, items=replace(items, cursor=index + 1)))
        _dispatch(out, spec, index)
        step = out.step(spec.name)
        items = step.items
        assert items is not None
    _settle(out, spec)


def _dispatch(out: Effects, spec: StepDef, index: int) -> None:
    comp = spec.compensate
    assert comp is not None
    step = out.step(spec.name)
    assert step.items is not None
    item = step.items.entries[index]
    attempt = item.undo_attempt + 1
    running = replace(item, phase=_UNDOING, undo_attempt=attempt, undo_retrying=False)
    out.set_step(replace(step, items=step.items.put(index, running)))
    try:
        rendered = _render(out, spec, index)
    except ExpressionError as exc:
        _failed(out, spec, index, Failure("ExpressionError", str(exc)), retryable=False)
        return
    if comp.type == PASS:
        _undone(out, spec, index)
        return
    if comp.type == FAIL:
        error = Failure(str(rendered.get("type", "Failed")), str(rendered.get("message", "")))
        _failed(out, spec, index, error, retryable=False)
        return
    key = item_key(spec.name, index)
    deadline = out.now + timedelta(seconds=comp.timeout) if comp.timeout is not None else None
    out.dispatches.append(
        Dispatch(key, attempt, comp.type, rendered, deadline, None, compensation=True)
    )
    if deadline is not None:
        out.timer("compensation-timeout", key, attempt, deadline)
    message = f"item {key} compensation attempt {attempt} dispatched ({comp.type})"
    out.record("ItemCompensating", message, key, attempt=attempt)


def _render(out: Effects, spec: StepDef, index: int) -> Any:
    """The item's compensation input: its own output and input stand for the step's."""
    from sagaflow.core import fanout

    comp = spec.compensate
    assert comp is not None
    step = out.step(spec.name)
    assert step.items is not None
    item_input = fanout.render_input(out, spec, index)
    ctx, _ = context(out.state, undo=True)
    output = step.items.entries[index].output
    ctx["steps"] = {
        **ctx["steps"],
        spec.name: {"output": stand_in(spec.name, output), "input": item_input},
    }
    ctx["item"] = step.items.values[index]
    ctx["index"] = index
    path = f"steps.{spec.name}.compensate.input"
    try:
        return reveal(render(comp.input, ctx, path=path))
    except ReferenceAccessError as exc:
        raise ExpressionError(path, str(exc)) from exc


def apply(
    out: Effects,
    fact: StepCompleted | StepFailed | StepHeartbeat | TimerFired,
    name: str,
    index: int,
) -> str | None:
    """A compensation result or timer of one item."""
    from sagaflow.core import compensation

    spec = out.definition.by_name.get(name)
    step = out.state.steps.get(name)
    if spec is None or step is None or step.items is None or index >= len(step.items):
        return f"unknown item {item_key(name, index)}"
    if step.undo is None or step.undo.status != "running":
        return f"step {name} is not being undone"
    item = step.items.entries[index]
    if isinstance(fact, StepHeartbeat):
        return "compensations have no heartbeat timeout"
    if isinstance(fact, TimerFired) and fact.kind == "compensation-retry":
        if not item.undo_retrying or item.undo_attempt != fact.attempt - 1:
            return "compensation retry no longer due"
        if out.state.phase is _SUSPENDED:
            return "suspended: the compensation retry is dispatched on resume"
        _dispatch(out, spec, index)
    else:
        if item.phase is not _UNDOING or item.undo_retrying or item.undo_attempt != fact.attempt:
            return f"compensation attempt {fact.attempt} is not current"
        if isinstance(fact, StepCompleted):
            _undone(out, spec, index)
        elif isinstance(fact, StepFailed):
            error = Failure(fact.error_type, fact.message)
            _failed(out, spec, index, error, retryable=fact.retryable)
        else:
            seconds = spec.compensate.timeout if spec.compensate and spec.compensate.timeout else 0
            error = Failure("CompensationTimeout", f"no result within {seconds:g}s")
            _failed(out, spec, index, error, retryable=True)
    _fill(out, spec)
    compensation.advance(out)
    return None


def resume(out: Effects, spec: StepDef) -> None:
    """After a resume: item compensation retries go out, then free slots fill."""
    step = out.step(spec.name)
    items = step.items
    if items is None or step.undo is None or step.undo.status != "running":
        return
    for index, item in enumerate(items.entries):
        if item.phase is _UNDOING and item.undo_retrying:
            out.cancel_timers(
                timer_key("compensation-retry", item_key(spec.name, index), item.undo_attempt + 1)
            )
            _dispatch(out, spec, index)
    _fill(out, spec)


def _undone(out: Effects, spec: StepDef, index: int) -> None:
    step = out.step(spec.name)
    assert step.items is not None
    item = step.items.entries[index]
    key = item_key(spec.name, index)
    out.cancel_timers(timer_key("compensation-timeout", key, item.undo_attempt))
    done = replace(item, phase=StepPhase.COMPENSATED, undo_error=None)
    out.set_step(replace(step, items=step.items.put(index, done)))
    message = f"item {key} compensated on attempt {item.undo_attempt}"
    out.record("ItemCompensated", message, key, attempt=item.undo_attempt)


def _failed(out: Effects, spec: StepDef, index: int, error: Failure, *, retryable: bool) -> None:
    comp = spec.compensate
    assert comp is not None
    step = out.step(spec.name)
    assert step.items is not None
    item = step.items.entries[index]
    key = item_key(spec.name, index)
    attempt = item.undo_attempt
    out.cancel_timers(timer_key("compensation-timeout", key, attempt))
    retry = comp.retry
    if retryable and error.type not in retry.non_retryable_errors and attempt < retry.max_attempts:
        due = out.now + timedelta(seconds=retry.delay_after(attempt))
        waiting = replace(item, undo_error=error, undo_retrying=True)
        out.set_step(replace(step, items=step.items.put(index, waiting)))
        out.timer("compensation-retry", key, attempt + 1, due)
        out.record(
            "ItemCompensationRetrying",
            f"item {key} compensation attempt {attempt} failed ({error.type}: {error.message})",
            key,
            attempt=attempt,
            error=error.type,
        )
        return
    failed = replace(item, phase=StepPhase.COMPENSATION_FAILED, undo_error=error)
    out.set_step(replace(step, items=step.items.put(index, failed)))
    out.record(
        "ItemCompensationFailed",
        f"item {key} compensation failed on attempt {attempt}: {error.type}: {error.message}",
        key,
        attempt=attempt,
        error=error.type,
    )


def _settle(out: Effects, spec: StepDef) -> None:
    step = out.step(spec.name)
    items = step.items
    assert items is not None
    assert step.undo is not None
    if step.undo.status != "running" or items.count(StepPhase.SUCCEEDED, _UNDOING):
        return
    failed = items.count(StepPhase.COMPENSATION_FAILED)
    undone = items.count(StepPhase.COMPENSATED)
    if not failed:
        undo = replace(step.undo, status="done", finished_at=out.now, error=None)
        out.set_step(replace(step, phase=StepPhase.COMPENSATED, undo=undo))
        out.record("StepCompensated", f"step {spec.name}: {undone} items undone", spec.name)
        return
    index, entry = _first_failed(items)
    cause = entry.undo_error or Failure("Error", "")
    error = Failure(
        cause.type,
        f"{failed} of {failed + undone} item compensations failed; "
        f"first: item {index}: {cause.message}",
    )
    undo = replace(step.undo, status="done", finished_at=out.now, error=error)
    out.set_step(replace(step, phase=StepPhase.COMPENSATION_FAILED, undo=undo))
    out.record(
        "StepCompensationFailed",
        f"step {spec.name} compensation failed: {error.type}: {error.message}",
        spec.name,
        error=error.type,
    )


def _first_failed(items: Items) -> tuple[int, Item]:
    return next(
        (i, e) for i, e in enumerate(items.entries) if e.phase is StepPhase.COMPENSATION_FAILED
    )
