"""Step code that tries to end the runner's process: `sys.exit` and `os._exit`.

A handler that calls `sys.exit(3)` raises SystemExit, which the host catches like
any failure of that step. `os._exit(7)` raises nothing: the process would just end,
with an exit code no Sagaflow command documents, taking every other running step
with it. While a host runs (`guarding()`), `os._exit` called by step code (a handler,
or a thread it runs in) raises `HandlerExit` instead, so it too fails only its own
step. Called anywhere else, or in a process forked from a handler, it exits as usual.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NoReturn

_in_step: ContextVar[bool] = ContextVar("sagaflow_in_step", default=False)
_real_exit = os._exit
_guards = 0
_guard_pid = 0


class HandlerExit(SystemExit):
    """A handler called `os._exit(code)`; the host reports it as that step's failure."""


def _guarded_exit(status: int) -> NoReturn:
    if _in_step.get() and os.getpid() == _guard_pid:
        raise HandlerExit(status)
    _real_exit(status)


@contextmanager
def guarding() -> Iterator[None]:
    """Turn `os._exit` inside step code into HandlerExit while the block runs."""
    global _guards, _guard_pid
    if _guards == 0:
        _guard_pid = os.getpid()
        os._exit = _guarded_exit
    _guards += 1
    try:
        yield
    finally:
        _guards -= 1
        if _guards == 0:
            os._exit = _real_exit


@contextmanager
def step_code() -> Iterator[None]:
    """Mark the running context (and threads started from a copy of it) as step code."""
    token = _in_step.set(True)
    try:
        yield
    finally:
        _in_step.reset(token)


def exit_failure(exc: SystemExit) -> tuple[str, str]:
    """(error type, message) of a step that tried to end the process."""
    if isinstance(exc, HandlerExit):
        return "ProcessExit", f"the handler called os._exit({exc.code!r}); the runner kept running"
    return "SystemExit", f"the handler called sys.exit({exc.code!r}); the runner kept running"
