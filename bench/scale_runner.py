"""The scale benchmark's step handler: logs every invocation with its wall time.

The log (SCALE_LOG) is what `scale.py` reads to count calls, repeats and the time of
the first one; the handler itself does no work, so the figures measure the loop.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sagaflow_runner import StepContext, step

_LOG = open(os.environ["SCALE_LOG"], "a", buffering=1)  # noqa: SIM115 - open for the process


@step("scale.work")
async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _LOG.write(f"{time.time():.6f} {ctx.idempotency_key}\n")
    return {"step": ctx.step}
