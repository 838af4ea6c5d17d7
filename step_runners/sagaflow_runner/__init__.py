"""The step runner SDK: everything a step author imports, and nothing of the orchestrator.

A step is an `async def handler(input: dict, ctx: StepContext) -> dict | None`
registered with `@step("prefix.name")`. The runner host (`sagaflow.runtime.worker`)
receives commands, calls the handler and reports the outcome; this package only
defines the contract, so step services depend on it alone (an import-linter
contract forbids importing `sagaflow` from here).
"""

from sagaflow_runner.context import HeartbeatCallback, StepContext
from sagaflow_runner.errors import PermanentError, RetryableError, StepError
from sagaflow_runner.loading import StepModuleNotFoundError, load_module
from sagaflow_runner.registry import Handler, Registry, default_registry, step

__all__ = [
    "Handler",
    "HeartbeatCallback",
    "PermanentError",
    "Registry",
    "RetryableError",
    "StepContext",
    "StepError",
    "StepModuleNotFoundError",
    "default_registry",
    "load_module",
    "step",
]
