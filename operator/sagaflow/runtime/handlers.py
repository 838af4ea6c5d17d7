"""How the runner host calls a step handler: on the loop or in a thread, with payloads
resolved and stored by the claim check.

Kept apart from the worker's delivery logic (`worker.py`): these wrappers turn
whatever the step author registered into one `async (input, ctx) -> output`, so
deadlines, lock renewal and shutdown apply to every kind of handler alike.

- An `async def` handler is awaited on the loop. A plain `def` runs in the host's
  thread pool (with a copy of the caller's context), so blocking code blocks only its
  thread. A thread cannot be cancelled: at a deadline or at shutdown the attempt
  ends without a result while the thread runs on until the function returns.
- With a `ClaimCheck`, references in the input are resolved before the handler runs,
  and a large output or a long error message is stored by reference before the
  result is sent; their failures become the step's failure.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from concurrent.futures import Executor
from typing import Any, cast

from sagaflow.core.payload_refs import ref_of
from sagaflow.core.ports import PayloadIntegrityError, PayloadMissingError
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow_runner import (
    AsyncHandler,
    Handler,
    PermanentError,
    RetryableError,
    StepContext,
    StepError,
    SyncHandler,
    is_async_handler,
)

log = logging.getLogger("sagaflow.runner")

# Error messages travel in events and land in execution status; keep them small.
MAX_ERROR_MESSAGE = 2000


def as_async(handler: Handler, threads: Executor) -> AsyncHandler:
    if is_async_handler(handler):
        return cast("AsyncHandler", handler)
    function = cast("SyncHandler", handler)

    async def in_thread(input: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
        call = functools.partial(contextvars.copy_context().run, function, input, ctx)
        return await asyncio.get_running_loop().run_in_executor(threads, call)

    return in_thread


# What a reference that cannot be resolved means for the attempt: the same command
# can never succeed when its payload is gone or corrupt; a store that failed may work
# on the next attempt.
_UNUSABLE = {PayloadMissingError: "PayloadMissing", PayloadIntegrityError: "PayloadIntegrity"}


def claim_checked(handler: AsyncHandler, claim_check: ClaimCheck) -> AsyncHandler:
    async def run(input: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
        try:
            resolved = await claim_check.resolve(input)
        except Exception as exc:
            kind = next((t for c, t in _UNUSABLE.items() if isinstance(exc, c)), None)
            if kind is not None:
                raise PermanentError(f"step input: {exc}", type=kind) from exc
            raise RetryableError(f"step input: {exc}", type="PayloadUnavailable") from exc
        try:
            output = await handler(resolved, ctx)
        except Exception as exc:
            replacement = await _with_long_message_stored(exc, claim_check, ctx)
            if replacement is exc:
                raise
            raise replacement from exc
        if not isinstance(output, dict):
            return output  # the worker reports InvalidOutput
        try:
            return await claim_check.offload(output, f"{ctx.idempotency_key}/output")
        except (TypeError, ValueError):
            return output  # not storable JSON: the worker reports InvalidOutput, with its path
        except Exception as exc:
            raise RetryableError(
                f"storing the step output failed: {exc}", type="PayloadUnavailable"
            ) from exc

    return run


async def _with_long_message_stored(
    exc: Exception, claim_check: ClaimCheck, ctx: StepContext
) -> Exception:
    """`exc`, or when its message is too long for the event, a StepError of the same
    type and retryability whose message ends with the reference to the full text."""
    message = str(exc)
    if len(message) <= MAX_ERROR_MESSAGE:
        return exc
    try:
        marker = await claim_check.store_always(
            {"message": message}, f"{ctx.idempotency_key}/error"
        )
    except Exception as store_exc:
        log.warning("storing a long error message failed, truncating it: %s", store_exc)
        return exc
    ref = ref_of(marker)
    suffix = f" ... [full message, {ref.size} bytes: {ref.uri}]"
    short = message[: max(0, MAX_ERROR_MESSAGE - len(suffix))] + suffix
    if isinstance(exc, StepError):
        kind = RetryableError if exc.retryable else PermanentError
        return kind(short, type=exc.type)
    log.debug("handler traceback: %s", ctx.idempotency_key, exc_info=exc)
    return RetryableError(short, type=type(exc).__name__)
