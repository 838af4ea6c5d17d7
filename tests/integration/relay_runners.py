"""Step handlers for tests where a separate `sagaflow runner` serves steps beside
`sagaflow run`: each attempt is logged to RELAY_LOG and returns the process id that ran
it, so a test can tell which process served which step.

`input.together: N` makes an attempt wait until N different attempts have started (in
any process), so N runs can only finish if they ran at the same time: with each
process's concurrency below N, some of them must have been taken by another process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from sagaflow_runner import StepContext, step

LOG = Path(os.environ["RELAY_LOG"])


def _started() -> set[str]:
    return {line.split()[0] for line in LOG.read_text().splitlines()} if LOG.exists() else set()


@step("relay.work")
async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    with LOG.open("a") as log:  # noqa: ASYNC230 - one short line, then the file is shared
        log.write(f"{ctx.idempotency_key} {os.getpid()}\n")
    together = int(input.get("together", 1))
    # Another process appends to the same file: there is nothing to wait on but the file.
    while len(_started()) < together:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return {"pid": os.getpid(), "step": ctx.step}
