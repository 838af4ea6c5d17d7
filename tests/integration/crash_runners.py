"""Step handlers for the crash test: each call is logged, and on the first run the
process signals the test through a FIFO once enough calls happened, then hangs so
it can be killed mid-run."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from sagaflow_runner import StepContext, step

LOG = Path(os.environ["CRASH_LOG"])
SIGNAL_AT = int(os.environ.get("CRASH_SIGNAL_AT", "0"))
FIFO = os.environ.get("CRASH_FIFO")


@step("crash.work")
async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    with LOG.open("a") as log:
        log.write(f"{ctx.idempotency_key}\n")
    calls = len(LOG.read_text().splitlines())
    if SIGNAL_AT and FIFO and calls >= SIGNAL_AT:
        with open(FIFO, "w") as fifo:  # blocks until the test reads: then it kills us
            fifo.write("ready\n")
        await asyncio.Event().wait()
    return {"step": ctx.step, "seen": input.get("prev")}
