"""Step handlers for the order-fulfilment sample.

Run in-process with `sagaflow run -f samples/order-fulfilment.yaml --runners
samples/order_runners.py`, or as a separate process with `sagaflow runner
--module samples/order_runners.py`. Each handler is idempotent per
`ctx.idempotency_key`: the ids it returns derive from it, so a redelivered
command produces the same result.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sagaflow_runner import PermanentError, RetryableError, StepContext, step


def _id(prefix: str, ctx: StepContext) -> str:
    return prefix + "-" + hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:10]


@step("orders.validate")
async def validate(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    order = input.get("order") or {}
    items = order.get("items") or []
    if not items:
        raise PermanentError("order has no items", type="InvalidOrder")
    total = sum(float(i["price"]) * int(i["quantity"]) for i in items)
    return {"orderId": order.get("id"), "items": items, "total": round(total, 2)}


@step("inventory.reserve")
async def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    skus = [i["sku"] for i in input["items"]]
    return {"reservationId": _id("res", ctx), "skus": skus}


@step("payments.charge")
async def charge(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    # The payment gateway of this sample times out on the first try of every charge.
    if ctx.attempt == 1:
        raise RetryableError("gateway timed out", type="GatewayTimeout")
    if input["amount"] > 10_000:
        raise PermanentError("amount over card limit", type="CardDeclined")
    return {"paymentId": _id("pay", ctx), "amount": input["amount"], "customer": input["customer"]}


@step("inventory.release")
async def release(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    # Runs as the compensation of reserve-inventory: ctx.compensates names that step.
    return {"released": input["reservationId"], "undid": ctx.compensates}


@step("payments.refund")
async def refund(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"refundId": _id("ref", ctx), "refunded": input["amount"], "undid": ctx.compensates}


@step("shipping.create")
async def ship(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if "Atlantis" in input["address"]:
        raise PermanentError("no carrier delivers to this address", type="AddressRejected")
    return {"trackingNumber": _id("trk", ctx), "address": input["address"], "note": input["note"]}
