"""The step runner SDK: everything a step author imports, and nothing of the orchestrator.

A step is a `handler(input: dict, ctx: StepContext) -> dict | None`, an `async def`
or a plain `def` (run in a thread), registered with `@step("prefix.name")`. The
runner host (`sagaflow.runtime.worker`) receives commands, calls the handler and
reports the outcome; this package only
defines the contract, so step services depend on it alone (an import-linter
contract forbids importing `sagaflow` from here).
"""

from sagaflow_runner.context import HeartbeatCallback, StepContext
from sagaflow_runner.errors import PermanentError, RetryableError, StepError
from sagaflow_runner.loading import StepModuleNotFoundError, load_module
from sagaflow_runner.registry import (
    AsyncHandler,
    Handler,
    Registry,
    SyncHandler,
    default_registry,
    is_async_handler,
    step,
)

__all__ = [
    "AsyncHandler",
    "Handler",
    "HeartbeatCallback",
    "PermanentError",
    "Registry",
    "RetryableError",
    "StepContext",
    "StepError",
    "StepModuleNotFoundError",
    "SyncHandler",
    "default_registry",
    "is_async_handler",
    "load_module",
    "step",
]
