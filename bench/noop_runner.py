"""The benchmark's step handler: does nothing, so the figures measure the loop itself."""

from __future__ import annotations

from typing import Any

from sagaflow_runner import StepContext, step


@step("bench.noop")
async def noop(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"i": ctx.attempt}
