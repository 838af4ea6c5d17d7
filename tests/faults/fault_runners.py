"""Step handlers for the fault suite: each call is logged (start and end, with pid and
time) to FAULT_LOG, and does what its input says: succeed, return what Postgres cannot
store, kill or exit its process, block the loop, or wait for a file to appear."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sagaflow_runner import StepContext, step

_LOG = Path(os.environ["FAULT_LOG"])


def _log(event: str, ctx: StepContext) -> None:
    with _LOG.open("a") as log:
        log.write(f"{event} {ctx.idempotency_key} {os.getpid()} {time.time():.6f}\n")


def _wait_for(path: str) -> None:
    # A file from the test says "go on": checked every 20 ms, in this handler's thread.
    while not Path(path).exists():
        threading.Event().wait(0.02)


@step("fault.work")
async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _log("start", ctx)
    behave = input.get("behave", "ok")
    if behave == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash: nothing can catch it
    if behave == "exit":
        sys.exit(3)
    if behave == "os_exit":
        os._exit(7)
    if behave == "hog":
        time.sleep(float(input.get("seconds", 2)))  # blocks the loop, on purpose
    if behave == "sleep":
        await asyncio.sleep(float(input.get("seconds", 1)))
    output: dict[str, Any] = {"step": ctx.step}
    if behave == "nan":
        output["total"] = math.nan
    _log("end", ctx)
    return output


@step("fault.blocking")
def blocking(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A plain `def`: runs in a thread, may block."""
    _log("start", ctx)
    if "until" in input:
        _wait_for(input["until"])
    else:
        time.sleep(float(input.get("seconds", 1)))
    _log("end", ctx)
    return {"step": ctx.step}
