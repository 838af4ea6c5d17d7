"""What a value must be to travel in a message and be stored in Postgres as `jsonb`.

Python's `json` writes `NaN` and `Infinity` and reads them back, strings may hold
the NUL character and lone surrogates; Postgres rejects all of these in `jsonb`, and
one such value in a transaction rolls back every state change folded into it. So
every value that crosses into state is checked here first: a step's output at the
runner before the result is sent, a result's output again at the orchestrator (a
runner in another language, or a message from anywhere), manifest inputs at
validation. A problem is named by the value's path (`output.items[2].price`), so the
step's author can find it.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from sagaflow.core.expressions import child_path

_SCALARS = (str, int, float, bool, type(None))


def unstorable(value: Any, path: str) -> str | None:
    """`"<path>: <reason>"` for the first part of `value` (in document order) that is not
    storable JSON, or None when all of it is.

    Iterative, so a deeply nested value cannot exhaust the interpreter's stack.
    """
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        at, item = stack.pop()
        if isinstance(item, dict):
            children = []
            for key, child in item.items():
                if not isinstance(key, str | int | bool) and key is not None:
                    return f"{at}: a key of type {type(key).__name__} is not JSON"
                name = str(key)
                if isinstance(key, str) and (problem := _text_problem(key)) is not None:
                    return f"{child_path(at, name)}: its key {problem}"
                children.append((child_path(at, name), child))
            stack.extend(reversed(children))
        elif isinstance(item, list | tuple):
            stack.extend(reversed([(child_path(at, i), c) for i, c in enumerate(item)]))
        elif isinstance(item, float) and not math.isfinite(item):
            shown = "NaN" if math.isnan(item) else ("-" if item < 0 else "") + "Infinity"
            return f"{at}: {shown} is not a JSON number"
        elif isinstance(item, str):
            if (problem := _text_problem(item)) is not None:
                return f"{at}: the text {problem}"
        elif isinstance(item, datetime.date):
            return f"{at}: {item.isoformat()} is a date, not JSON text: quote it in YAML"
        elif not isinstance(item, _SCALARS):
            return f"{at}: a value of type {type(item).__name__} is not JSON"
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds the NUL character (\\u0000), which Postgres cannot store"
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate (\\u{ord(text[exc.start]):04x}), which is not valid Unicode"
    return None


def scrub_text(text: str) -> str:
    """`text` with what Postgres cannot store replaced by U+FFFD, for messages that are
    ours to shape (error texts), where failing is worse than a replaced character."""
    if _text_problem(text) is None:
        return text
    return "".join("\ufffd" if ch == "\x00" or "\ud800" <= ch <= "\udfff" else ch for ch in text)
