"""Which handler runs which step type: the `@step` decorator and the registry it fills.

A runner process serves the step types registered before its worker starts; the
worker derives the command queues to listen on from the registered prefixes
(`inventory.reserve` is served from queue `steps.inventory`). Registration is
checked eagerly, at import time, so a typo or something that is not a function
fails the process start instead of the first command.

A handler is an `async def` (it runs on the host's event loop and must not block
it) or a plain `def` (the host runs it in a thread, so blocking calls are fine).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sagaflow_runner.context import StepContext

AsyncHandler = Callable[[dict[str, Any], StepContext], Awaitable[dict[str, Any] | None]]
SyncHandler = Callable[[dict[str, Any], StepContext], dict[str, Any] | None]
Handler = AsyncHandler | SyncHandler
H = TypeVar("H", bound=Handler)

# Same shape the orchestrator accepts in manifests: `prefix.name`, letters first.
STEP_TYPE_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]*(\.[a-zA-Z][a-zA-Z0-9_-]*)+$")
# Built-in steps (`sagaflow.pass`, ...) run inside the orchestrator, never on a runner.
RESERVED_PREFIX = "sagaflow"


class Registry:
    """Step type -> async handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, step_type: str, handler: Handler) -> None:
        if not isinstance(step_type, str) or not STEP_TYPE_PATTERN.match(step_type):
            raise ValueError(
                f"invalid step type {step_type!r}: use `prefix.name` "
                "(letters, digits, '_' or '-', starting with a letter), e.g. inventory.reserve"
            )
        if step_type.split(".", 1)[0] == RESERVED_PREFIX:
            raise ValueError(
                f"step type {step_type!r}: the {RESERVED_PREFIX!r} prefix is reserved "
                "for built-in steps"
            )
        if not callable(handler):
            raise TypeError(
                f"step {step_type!r}: handler {_name(handler)} must be a function taking "
                "(input: dict, ctx: StepContext), `async def` or plain `def`"
            )
        existing = self._handlers.get(step_type)
        if existing is not None and not _same_function(existing, handler):
            raise ValueError(
                f"step type {step_type!r} is already registered by {_name(existing)}; "
                f"cannot register {_name(handler)} too"
            )
        self._handlers[step_type] = handler

    def handler(self, step_type: str) -> Handler | None:
        return self._handlers.get(step_type)

    def types(self) -> list[str]:
        return sorted(self._handlers)

    def prefixes(self) -> set[str]:
        return {t.split(".", 1)[0] for t in self._handlers}

    def __len__(self) -> int:
        return len(self._handlers)

    def __contains__(self, step_type: object) -> bool:
        return step_type in self._handlers


default_registry = Registry()


def step(step_type: str, *, registry: Registry | None = None) -> Callable[[H], H]:
    """Register the decorated `handler(input, ctx)` for `step_type`: an `async def`, or a
    plain `def` that the host runs in a thread (for blocking code).

    The handler returns its output as a dict (None means `{}`), raises
    `PermanentError` when retrying cannot help, and `RetryableError` (or anything
    else) when it might.
    """
    target = default_registry if registry is None else registry

    def decorate(handler: H) -> H:
        target.register(step_type, handler)
        return handler

    return decorate


def is_async_handler(handler: object) -> bool:
    """Whether the host awaits `handler` on its loop (else it runs it in a thread)."""
    if inspect.iscoroutinefunction(handler):
        return True
    # A callable object whose __call__ is `async def` behaves the same way.
    call = getattr(type(handler), "__call__", None)  # noqa: B004 - the method, not callable()
    return not inspect.isfunction(handler) and inspect.iscoroutinefunction(call)


def _same_function(a: object, b: object) -> bool:
    # Re-importing or reloading a step module registers a new function object for
    # the same definition; that is the same step, not a conflicting one.
    if a is b:
        return True
    key_a = (getattr(a, "__module__", None), getattr(a, "__qualname__", None))
    key_b = (getattr(b, "__module__", None), getattr(b, "__qualname__", None))
    return None not in key_a and key_a == key_b


def _name(handler: object) -> str:
    module = getattr(handler, "__module__", None) or "?"
    qualname = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{module}.{qualname}"
