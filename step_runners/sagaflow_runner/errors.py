"""How a step handler says that an attempt failed, and whether trying again can help.

The orchestrator decides on retries from two facts in the StepFailed event: the
error type (matched against a step's `nonRetryableErrors`) and the retryable flag.
These exceptions let a handler set both; any other exception is treated as
retryable with its class name as the type, because an unexpected error is more
often transient (a network blip, a restarted dependency) than a verdict.
"""

from __future__ import annotations

from typing import ClassVar


class StepError(Exception):
    """Base of the failures a handler raises on purpose."""

    retryable: ClassVar[bool] = True

    def __init__(self, message: str, *, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # `type` shadows the builtin inside this method only; the keyword name is
        # what step authors write (`PermanentError("...", type="OutOfStock")`).
        self.type = type or self.__class__.__name__

    def __str__(self) -> str:
        return self.message


class RetryableError(StepError):
    """The attempt failed but a later attempt may succeed (a timeout, a busy service)."""

    retryable = True


class PermanentError(StepError):
    """The attempt failed and retrying with the same input cannot help (bad input,
    a business rule such as an empty stock); the saga compensates instead."""

    retryable = False
