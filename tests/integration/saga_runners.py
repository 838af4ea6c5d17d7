"""Step handlers for the saga tests of `sagaflow run`: every call is logged as a JSON
line (start and end, with the step it undoes), and the input tells a handler how to
behave: fail, fail while a marker file exists, fail its first attempts, or wait for a
gate file (so a test can act while the step runs)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from sagaflow_runner import PermanentError, RetryableError, StepContext, step

LOG = Path(os.environ["SAGA_LOG"])
FILES = Path(os.environ["SAGA_DIR"])


def _log(ctx: StepContext, event: str) -> None:
    line = {
        "ex": ctx.execution,
        "step": ctx.step,
        "undo": ctx.compensates is not None,
        "attempt": ctx.attempt,
        "key": ctx.idempotency_key,
        "event": event,
        "t": time.time(),
    }
    with LOG.open("a") as log:
        log.write(json.dumps(line) + "\n")


async def _behave(input: dict[str, Any], ctx: StepContext) -> None:
    gate = input.get("gate")
    # The test opens the gate from another process, by creating the file.
    while gate and not (FILES / gate).exists():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    if input.get("slow"):
        await asyncio.sleep(float(input["slow"]))
    if input.get("failWhile") and (FILES / input["failWhile"]).exists():
        raise RetryableError(f"{input['failWhile']} is there", type="Broken")
    if ctx.attempt <= int(input.get("failTimes", 0)):
        raise RetryableError(f"attempt {ctx.attempt} fails", type="Flaky")
    if input.get("fail"):
        raise PermanentError("told to fail", type="Told")


@step("saga.work")
@step("saga.undo")
async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Both types: a forward step, or (as a compensation) the undo of `ctx.compensates`."""
    _log(ctx, "start")
    try:
        await _behave(input, ctx)
    finally:
        _log(ctx, "end")
    if ctx.compensates is not None:
        return {"undid": ctx.compensates, "saw": input.get("saw")}
    return {"step": ctx.step, "attempt": ctx.attempt}
