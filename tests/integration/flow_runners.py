"""Step handlers for the data-flow and coordination tests of `sagaflow run`
(`test_local_flow.py`): every call is logged as one JSON line (start and end, with
the execution, the step or item, whether it undoes, the attempt and its idempotency
key, and the item's index), so order, overlap and repeats are read from the log.

The input tells a handler how to behave:

- `gate`: wait until that file exists in FLOW_DIR (the test opens it from outside);
- `sleep`: an awaited delay in seconds, so items overlap;
- `fail: true`, or `failAt: [indexes]` with `index`: fail for good (type `Told`);
- `effect: true`: apply an idempotent effect keyed by the attempt's idempotency key
  (a marker file created once); a second application of the same key is logged as
  `repeat`, not applied again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from sagaflow_runner import PermanentError, RetryableError, StepContext, step

LOG = Path(os.environ["FLOW_LOG"])
FILES = Path(os.environ["FLOW_DIR"])


def _log(ctx: StepContext, event: str, given: dict[str, Any], **more: Any) -> None:
    line = {
        "ex": ctx.execution,
        "step": ctx.step,
        "undo": ctx.compensates is not None,
        "attempt": ctx.attempt,
        "key": ctx.idempotency_key,
        "index": given.get("index"),
        "event": event,
        "t": time.time(),
        **more,
    }
    # One write of one short line to a file opened for appending: lines from
    # concurrent handlers (and processes) never interleave.
    with LOG.open("a") as log:
        log.write(json.dumps(line) + "\n")


def _effect(ctx: StepContext, input: dict[str, Any]) -> None:
    marks = FILES / "effects"
    marks.mkdir(exist_ok=True)
    mark = marks / hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        _log(ctx, "repeat", input)
        return
    os.close(fd)
    _log(ctx, "effect", input)


async def _behave(input: dict[str, Any], ctx: StepContext) -> None:
    gate = input.get("gate")
    # The test opens the gate from another process, by creating the file.
    while gate and not (FILES / gate).exists():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    if input.get("sleep"):
        await asyncio.sleep(float(input["sleep"]))
    if input.get("fail") or input.get("index") in (input.get("failAt") or ()):
        raise PermanentError(f"told to fail ({ctx.step})", type="Told")
    if input.get("effect"):
        _effect(ctx, input)


@step("flow.work")
@step("flow.undo")
async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Both types: a forward step (or item), or the undo of `ctx.compensates`."""
    _log(ctx, "start", input, input=input)
    try:
        await _behave(input, ctx)
    finally:
        _log(ctx, "end", input)
    if ctx.compensates is not None:
        return {"undid": ctx.step, "saw": input.get("saw")}
    if "index" in input:
        return {"index": input["index"]}
    return {"step": ctx.step, "echo": input.get("echo")}


@step("flow.audit")
async def audit(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A `finally` step: logs the phase it was given; waits for its `gate`; `fail: true`
    makes it fail for good, `failTimes: N` fails its first N attempts (retryable)."""
    _log(ctx, "start", input, phase=input.get("phase"), input=input)
    try:
        await _behave({"gate": input.get("gate")}, ctx)
    finally:
        _log(ctx, "end", input)
    if input.get("fail"):
        raise PermanentError("the audit is down", type="AuditDown")
    if ctx.attempt <= int(input.get("failTimes") or 0):
        raise RetryableError(f"attempt {ctx.attempt} of the audit fails", type="AuditFlaky")
    return {"recorded": input.get("phase")}
