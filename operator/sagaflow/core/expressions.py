"""Data passing between steps: `${{ EXPR }}` templates over JMESPath.

This module owns the template language a workflow uses to feed one step's input
from the execution input and from upstream step outputs. It is pure (no I/O) and
never executes code: expressions are JMESPath, evaluated by the `jmespath`
library over a context of plain data::

    {"input": <execution input>, "steps": {<step name>: {"output": ...}}}

A string that is exactly one template (`"${{ steps.charge.output.id }}"`) becomes
the JSON value of the expression, whatever its type. A template inside a longer
string interpolates as text: strings as they are, anything else as compact JSON
(so a missing key reads `null`). Templates may sit anywhere inside nested dicts
and lists; dict keys are never templates.

Validation (`check_templates`, `step_references`, `template_references`,
`template_roots`) and the
engine (`render`) share one cached parse of each template string, so a manifest
that validated renders with the very same expressions.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath
from jmespath import exceptions as jmespath_errors
from jmespath import functions as jmespath_functions
from jmespath.parser import ParsedResult

OPEN = "${{"
CLOSE = "}}"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# Function signatures of the JMESPath built-ins, used to reject unknown functions
# and wrong argument counts when a manifest is validated rather than when it runs.
_FUNCTIONS: dict[str, Any] = dict(jmespath_functions.Functions().FUNCTION_TABLE)


class ExpressionError(ValueError):
    """A template that cannot be parsed or evaluated, with the field path it sits at."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[ExpressionError], tuple[str, str]]:
        # Keeps the error picklable despite the two-argument constructor.
        return (type(self), (self.path, self.reason))


def child_path(path: str, key: str | int) -> str:
    """Extend a field path: `a` + `b` -> `a.b`, `a` + 0 -> `a[0]`, odd keys quoted."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _IDENTIFIER.match(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


@dataclass(frozen=True, slots=True)
class _Template:
    """One parsed string: literal text and compiled expressions, in order."""

    parts: tuple[str | ParsedResult, ...]
    whole: ParsedResult | None  # set when the string is exactly one template
    errors: tuple[str, ...]
    references: frozenset[str]
    roots: frozenset[str]  # the first field of every path read from the context


# ---------------------------------------------------------------- public API


def check_templates(value: Any, path: str) -> list[ExpressionError]:
    """Return every template problem (syntax, empty, unclosed, bad function) in `value`."""
    return [
        ExpressionError(at, reason)
        for at, text in _template_strings(value, path)
        for reason in _parse(text).errors
    ]


def step_references(value: Any) -> set[str]:
    """Names of steps whose outputs the templates in `value` read (`steps.NAME...`)."""
    names: set[str] = set()
    for _, text in _template_strings(value, ""):
        names |= _parse(text).references
    return names


def template_references(value: Any, path: str) -> list[tuple[str, frozenset[str]]]:
    """Like `step_references`, but per string, with its field path (for error reports)."""
    found = []
    for at, text in _template_strings(value, path):
        references = _parse(text).references
        if references:
            found.append((at, references))
    return found


def template_roots(value: Any, path: str) -> list[tuple[str, frozenset[str], bool]]:
    """Per string holding templates: its field path, the names it reads from the root of
    the context (`input`, `steps`, `item`, ...; not fields inside projections, filters
    or `&expr`, which belong to elements), and whether it is exactly one template."""
    found = []
    for at, text in _template_strings(value, path):
        parsed = _parse(text)
        found.append((at, parsed.roots, parsed.whole is not None))
    return found


def render(value: Any, context: Mapping[str, Any], path: str = "input") -> Any:
    """Return `value` with every template replaced by its value over `context`.

    Parts without templates are returned as they are (not copied); containers are
    copied only when something inside them changed. Raises ExpressionError with
    the field path of the failing string.
    """
    try:
        return _render(value, context)
    except _RenderFailure as failure:
        at = path
        for key in reversed(failure.keys):
            at = child_path(at, key)
        raise ExpressionError(at, failure.reason) from failure.__cause__


# ------------------------------------------------------------------ rendering


class _RenderFailure(Exception):
    """Carries a failure up through the containers, collecting the keys on the way.

    Building paths only on failure keeps the successful walk free of string work.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.keys: list[str | int] = []


def _render(value: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return _render_string(value, context) if OPEN in value else value
    if isinstance(value, dict):
        return _render_dict(value, context)
    if isinstance(value, list | tuple):
        return _render_sequence(value, context)
    return value


def _render_dict(value: dict[Any, Any], context: Mapping[str, Any]) -> dict[Any, Any]:
    copy: dict[Any, Any] | None = None
    for key, item in value.items():
        try:
            rendered = _render(item, context)
        except _RenderFailure as failure:
            failure.keys.append(key)
            raise
        if rendered is not item:
            if copy is None:
                copy = dict(value)
            copy[key] = rendered
    return value if copy is None else copy


def _render_sequence(value: list[Any] | tuple[Any, ...], context: Mapping[str, Any]) -> Any:
    copy: list[Any] | None = None
    for index, item in enumerate(value):
        try:
            rendered = _render(item, context)
        except _RenderFailure as failure:
            failure.keys.append(index)
            raise
        if rendered is not item:
            if copy is None:
                copy = list(value)
            copy[index] = rendered
    if copy is None:
        return value
    return tuple(copy) if isinstance(value, tuple) else copy


def _render_string(text: str, context: Mapping[str, Any]) -> Any:
    template = _parse(text)
    if template.errors:
        raise _RenderFailure(template.errors[0])
    if template.whole is not None:
        return _evaluate(template.whole, context)
    pieces = []
    for part in template.parts:
        if isinstance(part, str):
            pieces.append(part)
        else:
            pieces.append(_as_text(_evaluate(part, context)))
    return "".join(pieces)


def _evaluate(expression: ParsedResult, context: Mapping[str, Any]) -> Any:
    try:
        return expression.search(context)
    except (jmespath_errors.JMESPathError, TypeError) as error:
        # Type errors come from the data (e.g. length() of a number), so they are
        # reported against the template rather than crashing the caller.
        failure = _RenderFailure(f"evaluating '{expression.expression}' failed: {error}")
        raise failure from error


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    if not isinstance(result, dict | list | tuple | int | float | bool | None):
        return str(result)  # YAML dates and other non-JSON scalars read as themselves
    # default=str covers the same scalars nested inside containers.
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False, default=str)


# -------------------------------------------------------------------- parsing


def _template_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Yield (field path, string) for every string in `value` that holds a template."""
    if isinstance(value, str):
        if OPEN in value:
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _template_strings(item, child_path(path, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _template_strings(item, child_path(path, index))


@functools.lru_cache(maxsize=1024)
def _compile(expression: str) -> ParsedResult:
    return jmespath.compile(expression)


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> _Template:
    """Split a string into literal text and compiled expressions.

    A template ends at the first `}}` that closes a valid expression, so nested
    multiselect hashes (`${{ {a: {b: c}} }}`) work; when none does, the error of
    the first `}}` is reported. Cached: the engine renders the same manifest
    strings over and over.
    """
    parts: list[str | ParsedResult] = []
    errors: list[str] = []
    position = 0
    while (start := text.find(OPEN, position)) >= 0:
        if start > position:
            parts.append(text[position:start])
        body = start + len(OPEN)
        end, compiled, error = _close_template(text, body)
        if end < 0:
            errors.append(f"unclosed '{OPEN}' at character {start + 1}: expected '{CLOSE}'")
            position = len(text)
            break
        if compiled is None:
            errors.append(error)
        else:
            parts.append(compiled)
            errors.extend(_function_errors(compiled))
            errors.extend(_negation_errors(compiled))
        position = end + len(CLOSE)
    if position < len(text):
        parts.append(text[position:])
    whole = parts[0] if len(parts) == 1 and isinstance(parts[0], ParsedResult) else None
    heads = [h for part in parts if isinstance(part, ParsedResult) for h in _heads(part.parsed)]
    references = frozenset(h[1] for h in heads if len(h) >= 2 and h[0] == "steps")
    roots = frozenset(h[0] for h in heads if h)
    return _Template(tuple(parts), whole, tuple(errors), references, roots)


def _close_template(text: str, body: int) -> tuple[int, ParsedResult | None, str]:
    """Find the end of the template whose expression starts at `body`.

    Returns (index of its `}}` or -1, compiled expression or None, error reason).
    """
    first = text.find(CLOSE, body)
    if first < 0:
        return -1, None, ""
    if not text[body:first].strip():
        return first, None, f"empty expression in '{OPEN} {CLOSE}'"
    # A template never spans into the next one, which bounds the search.
    limit = text.find(OPEN, body)
    limit = len(text) if limit < 0 else limit
    first_error = ""
    end = first
    while 0 <= end < limit:
        expression = text[body:end].strip()
        try:
            return end, _compile(expression), ""
        except jmespath_errors.JMESPathError as error:
            first_error = first_error or _syntax_reason(expression, error)
        end = text.find(CLOSE, end + 1)
    return first, None, first_error


def _syntax_reason(expression: str, error: jmespath_errors.JMESPathError) -> str:
    prefix = f"invalid expression '{expression}'"
    if isinstance(error, jmespath_errors.LexerError):
        reason = f"{prefix}: {error.message} at column {error.lexer_position + 1}"
        if error.lexer_value == "-":
            reason += "; quote step names that contain '-', e.g. steps.\"charge-card\".output"
        return reason
    if isinstance(error, jmespath_errors.IncompleteExpressionError):
        return f"{prefix}: the expression is incomplete"
    if isinstance(error, jmespath_errors.ParseError):
        return f"{prefix}: {error.msg} at column {error.lex_position + 1}"
    return f"{prefix}: {error}"


def _function_errors(compiled: ParsedResult) -> list[str]:
    """Unknown functions and wrong argument counts, which jmespath finds only at run time."""
    errors = []
    for node in _walk(compiled.parsed):
        if node["type"] != "function_expression":
            continue
        name, given = node["value"], len(node["children"])
        entry = _FUNCTIONS.get(name)
        if entry is None:
            errors.append(f"unknown function '{name}()'")
            continue
        signature = entry["signature"]
        wanted = len(signature)
        if signature and signature[-1].get("variadic"):
            if given < wanted:
                errors.append(f"function '{name}()' takes at least {wanted} arguments, got {given}")
        elif given != wanted:
            errors.append(f"function '{name}()' takes {wanted} arguments, got {given}")
    return errors


def _negation_errors(compiled: ParsedResult) -> list[str]:
    """`!a.b` is `(!a).b` in JMESPath (`!` binds tighter than `.`): null whatever `a.b`
    holds. Nobody means that; `when: ${{ !steps.x.output.ok }}` would never run."""
    errors = []
    for node in _walk(compiled.parsed):
        if node["type"] in ("subexpression", "index_expression"):
            first = node["children"][0]
            if first["type"] == "not_expression":
                errors.append(
                    "'!' applies only to what follows it up to the first '.' or '[': "
                    "write !(a.b) to negate a.b"
                )
    return errors


def _walk(node: Any) -> Iterator[Any]:
    yield node
    for child in node.get("children", ()):
        # Slice nodes keep plain ints (or None) as children.
        if isinstance(child, dict):
            yield from _walk(child)


# ----------------------------------------------------------------- references

# Node types whose first child is evaluated against the same value as the node
# itself (the rest against its result or its elements).
_LEFT_ONLY = frozenset(
    {"subexpression", "index_expression", "projection", "value_projection", "pipe"}
)
_FILTER = "filter_projection"
# Node types whose children are all evaluated against the node's own value.
_ALL_CHILDREN = frozenset(
    {
        "function_expression",
        "multi_select_list",
        "multi_select_dict",
        "key_val_pair",
        "comparator",
        "and_expression",
        "or_expression",
        "not_expression",
        "flatten",
    }
)


def _heads(node: Any) -> Iterator[list[str]]:
    """The field names each sub-expression evaluated against the context root starts
    with (`steps.charge.output` -> ["steps", "charge", "output"]).

    Inside projections, filters and `&expr`, identifiers refer to elements, so a
    field called `steps` there is not a step reference.
    """
    head, _ = _field_head(node)
    if head:
        yield head
    kind = node["type"]
    children = node.get("children", ())
    if kind in _LEFT_ONLY or kind == _FILTER:
        yield from _heads(children[0])
    elif kind in _ALL_CHILDREN:
        for child in children:
            yield from _heads(child)


def _field_head(node: Any) -> tuple[list[str], bool]:
    """The field names a node starts walking with, and whether it is only fields."""
    kind = node["type"]
    if kind == "field":
        return [node["value"]], True
    if kind in ("current", "identity"):
        return [], True
    if kind == "subexpression":
        head: list[str] = []
        for child in node["children"]:
            names, complete = _field_head(child)
            head += names
            if not complete:
                return head, False
        return head, True
    if kind in _LEFT_ONLY or kind == _FILTER:
        return _field_head(node["children"][0])[0], False
    return [], False
