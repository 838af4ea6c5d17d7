"""The chaos benchmark's step handler: logs every call (start and end, pid, time) to
CHAOS_LOG, takes CHAOS_STEP_SECONDS (from a hash of the attempt, so a redelivered
attempt takes as long), and fails the first attempt of step `b` of every tenth
execution with a retryable error, so durable retry timers are in flight throughout."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

from sagaflow_runner import RetryableError, StepContext, step

_LOG = open(os.environ["CHAOS_LOG"], "a", buffering=1)  # noqa: SIM115 - for the process
_SECONDS = float(os.environ.get("CHAOS_STEP_SECONDS", "1"))


def _log(event: str, ctx: StepContext) -> None:
    _LOG.write(f"{event} {ctx.idempotency_key} {os.getpid()} {time.time():.6f}\n")


@step("chaos.work")
async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _log("start", ctx)
    digest = int(hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:8], 16)
    await asyncio.sleep(_SECONDS * (0.5 + (digest % 1000) / 1000))
    if ctx.step == "b" and ctx.attempt == 1 and input.get("n", 0) % 10 == 0:
        _log("end", ctx)
        raise RetryableError("the first try of every tenth b fails", type="Flaky")
    _log("end", ctx)
    return {"step": ctx.step, "attempt": ctx.attempt}
