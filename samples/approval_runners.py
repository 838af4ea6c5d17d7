"""Step handlers for the approval sample (`samples/approval.yaml`).

The wait for the approval is Sagaflow's own step (`sagaflow.waitForSignal`): no
handler runs while the run waits, however long that is.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sagaflow_runner import PermanentError, StepContext, step


@step("expenses.check")
async def check(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    expense = input["expense"]
    if float(expense["amount"]) <= 0:
        raise PermanentError("amount must be positive", type="InvalidExpense")
    return {"id": expense["id"], "amount": expense["amount"]}


@step("expenses.pay")
async def pay(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    key = hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:10]
    return {"paymentId": f"pay-{key}", "approvedBy": input["approvedBy"]}


@step("expenses.notify")
async def notify(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"sent": input["to"]}
