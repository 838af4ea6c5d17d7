"""Step handlers for the large-payload test: one step makes a big output, the next
reports what it received, so the test can see the whole value arrived intact."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sagaflow_runner import StepContext, step

ITEM = 1000  # characters per item


@step("bulk.produce")
async def produce(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    count = int(input["bytes"]) // (ITEM + 3)  # each item is '"...",' in compact JSON
    return {"items": [str(i % 10) * ITEM for i in range(count)]}


@step("bulk.measure")
async def measure(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    data = input["data"]
    # Encoded as the claim check encodes, so the size compares with the reference's.
    encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return {
        "bytes": len(encoded),
        "sha256": hashlib.sha256(encoded).hexdigest(),
        "items": len(data["items"]),
    }
