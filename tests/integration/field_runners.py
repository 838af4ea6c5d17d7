"""Step handlers for the field-by-field payload test: `produce` returns a large `data`
beside its small `sha`; the others report what they received, so the test can see
each arrived as the handler returned it."""

from __future__ import annotations

import hashlib
from typing import Any

from sagaflow_runner import StepContext, step


def make_data(size: int) -> str:
    """`size` characters, the same in the test as in the runner."""
    return ("0123456789abcdef" * (size // 16 + 1))[:size]


@step("fields.produce")
async def produce(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    data = make_data(int(input["bytes"]))
    return {"data": data, "sha": hashlib.sha256(data.encode()).hexdigest()}


@step("fields.check")
async def check(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"sha": input["sha"]}


@step("fields.measure")
async def measure(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    data = input["data"]
    return {"length": len(data), "sha256": hashlib.sha256(data.encode()).hexdigest()}


@step("fields.whole")
async def whole(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    output = input["output"]
    digest = hashlib.sha256(output["data"].encode()).hexdigest()
    return {"keys": sorted(output), "matches": digest == output["sha"]}
