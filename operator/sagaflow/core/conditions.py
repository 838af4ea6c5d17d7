"""`when`: a step that runs only if a condition holds when its turn comes.

The condition is a template evaluated once, when the step's dependencies are done,
over the same context as its input. False, null and empty values (an empty string,
list or object, JMESPath's falsy values) make the step Skipped: its input is not
rendered and nothing is dispatched. A Skipped step satisfies its dependents like a
Succeeded one, and reading its output gives null. The reason, with the value the
condition gave, is kept on the step and in history, so `kubectl describe` says why.
A `finally` step's condition also sees `execution` (`phase`, `error`).
"""

from __future__ import annotations

import json
from typing import Any

from sagaflow.core import finals
from sagaflow.core.definition import StepDef
from sagaflow.core.effects import Effects, render_over
from sagaflow.core.expressions import ExpressionError
from sagaflow.core.state import Failure


def skip_reason(out: Effects, spec: StepDef) -> str | Failure | None:
    """Why the step is skipped, None if it runs, or the failure of a bad condition."""
    assert spec.when is not None
    extra = finals.context(out) if spec.final else None
    try:
        value = render_over(out.state, spec.when, f"steps.{spec.name}.when", extra=extra)
    except ExpressionError as exc:
        return Failure("ExpressionError", str(exc))
    if truthy(value):
        return None
    return f"when {spec.when} gave {_show(value)}"


def truthy(value: Any) -> bool:
    """JMESPath's truth: false, null, "", [] and {} are false; numbers are true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict | tuple):
        return len(value) > 0
    return True


def _show(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= 60 else text[:57] + "..."
