"""Step handlers for the fan-out sample (`samples/fan-out.yaml`).

`billing.charge` runs once per invoice (each call is one item of the forEach step)
and declines invoices whose card says so; the ids it returns derive from the
attempt's idempotency key, so a redelivered command charges nothing twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sagaflow_runner import PermanentError, StepContext, step


@step("billing.charge")
async def charge(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    invoice = input["invoice"]
    if invoice.get("card") == "declined":
        raise PermanentError(f"card declined for {invoice['id']}", type="CardDeclined")
    key = hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:10]
    return {"invoice": invoice["id"], "chargeId": f"ch-{key}", "amount": invoice["amount"]}


@step("billing.refund")
async def refund(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"refunded": input["chargeId"]}


@step("billing.mail")
async def mail(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"sent": True, "charged": input["charged"]}


@step("billing.audit")
async def audit(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"recorded": input["batch"], "phase": input["phase"]}
