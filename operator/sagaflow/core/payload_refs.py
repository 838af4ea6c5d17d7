"""Claim-check references as plain data, and what the pure engine may do with them.

This module owns the reference marker: a payload too large to travel in a message
is stored in a payload store and replaced by `{"$sagaflowRef": {"uri", "size",
"sha256"}}` (`ref_object`). Messages and execution state carry the marker as it is,
so state rows stay small; only the runtime's `ClaimCheck` turns it back into the
value. Everything here is pure: the engine uses it without any I/O.

Rendering step inputs over offloaded outputs: a runner stores a large output by
reference whole, or field by field (`ClaimCheck.offload`), so a marker may stand for
the whole output or sit anywhere inside it (`{"data": <marker>, "sha": "..."}`). A
template that yields a marker as a value (`${{ steps.X.output }}`,
`${{ steps.X.output.data }}`) passes it on, and the next runner resolves it; fields
kept inline read as usual (`steps.X.output.sha`). An expression that looks inside a
marker cannot be answered without the payload; evaluated over the marker it would
read `null` and the step would run on wrong data. So while templates render, each
marker in an output is replaced by a stand-in (`stand_in`) that fails every look
inside with ReferenceAccessError, naming the step and the field, and `reveal` puts
the markers back into whatever was passed whole. An output without a marker is
handed over as it is: `stand_in` only scans it, and returns the very same object.

The key `$sagaflowRef` is reserved: a value that has that shape anywhere inside a
step input or output is treated as a reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

from sagaflow.core.expressions import child_path
from sagaflow.core.ports import PayloadRef

REF_KEY: Final = "$sagaflowRef"


def ref_object(ref: PayloadRef) -> dict[str, Any]:
    """The marker that stands for `ref` in messages and state."""
    return {REF_KEY: ref.to_json()}


def is_ref(value: Any) -> bool:
    """Whether `value` is a reference marker (and nothing else)."""
    if type(value) is not dict or len(value) != 1:  # exact dict: a stand-in is not one
        return False
    body = value.get(REF_KEY)
    return (
        isinstance(body, dict)
        and isinstance(body.get("uri"), str)
        and isinstance(body.get("sha256"), str)
        and _is_size(body.get("size"))
    )


def ref_of(value: Any) -> PayloadRef:
    """The PayloadRef a marker names; ValueError for anything that is not a marker."""
    if not is_ref(value):
        raise ValueError(
            f"not a payload reference: expected {{{REF_KEY!r}: {{uri, size, sha256}}}}"
        )
    body = value[REF_KEY]
    return PayloadRef(uri=body["uri"], size=body["size"], sha256=body["sha256"])


def find_refs(value: Any) -> list[PayloadRef]:
    """Every reference inside `value` (at any depth), in document order."""
    return list(_walk_refs(value))


def replace_refs(value: Any, resolved: dict[PayloadRef, Any]) -> Any:
    """`value` with each marker whose ref is in `resolved` replaced by its value.

    Containers are copied only where something inside them changed.
    """
    return _rebuild(value, lambda v: resolved.get(ref_of(v), v) if is_ref(v) else _KEEP)


# ------------------------------------------------------ rendering over references


class ReferenceAccessError(TypeError):
    """An expression looked inside a step output that is stored by reference.

    A TypeError, because expression evaluation already reports type errors from the
    data against the template and its field path.
    """


class _Guard:
    """What both stand-ins share: the marker, and the refusal that names the step and
    the field path inside it (`where`: `output`, `output.data`)."""

    __slots__ = ()
    marker: dict[str, Any]
    step: str
    where: str

    def _refusal(self) -> str:
        size = self.marker[REF_KEY]["size"]
        return (
            f"{self.where} of step {self.step!r} is stored by reference ({size} bytes); "
            "pass it whole"
        )

    def _refuse(self, *_: Any, **__: Any) -> NoReturn:
        raise ReferenceAccessError(self._refusal())

    def __repr__(self) -> str:
        return f"<{self._refusal()}>"


class _StoredOutput(_Guard, dict[str, Any]):
    """Stands in for a whole step output stored by reference while templates render.

    A dict subclass, so JMESPath treats it as an object where it only tests the type
    (list operations then give null, exactly as on the real output, which is always a
    JSON object); every look inside (field, keys, values, length, equality,
    truthiness, JSON encoding) raises. Its type name is unknown to JMESPath, so
    functions that check argument types reject it, loudly, naming this object.
    """

    __slots__ = ("marker", "step", "where")

    def __init__(self, step: str, marker: dict[str, Any]) -> None:
        # Holding the marker's items keeps C fast paths that read the dict's storage
        # directly (json's "empty dict" shortcut) from seeing an empty object.
        super().__init__(marker)
        self.step = step
        self.marker = marker
        self.where = "output"

    get = keys = values = items = __getitem__ = __contains__ = _Guard._refuse
    __iter__ = __len__ = __eq__ = __ne__ = _Guard._refuse
    __str__ = _Guard.__repr__


class _StoredField(_Guard):
    """Stands in for a field of a step output stored by reference while templates render.

    Unlike a whole output, a field may have been any JSON value, so no answer that
    depends on its type may be given: as a dict (or list) subclass it would read null
    at an index (or a key) where the real list (or object) has a value. It is neither:
    what JMESPath reads (keys, items, indexes, length, equality, text) raises, and so
    does `__class__`, because JMESPath decides every type question with isinstance(),
    which consults `__class__` for classes the object is not an instance of; `type()`,
    `to_array()`, ordering and every other type test therefore refuse too. Only
    passing it along is allowed (a hash, a list, `not_null`): `reveal` then swaps the
    marker back. `__str__` refuses as well, so JSON encoding with `default=str`
    (`to_string`, text interpolation) cannot write the stand-in's description as data.
    """

    __slots__ = ("marker", "step", "where")

    def __init__(self, step: str, marker: dict[str, Any], where: str) -> None:
        self.step = step
        self.marker = marker
        self.where = where

    get = keys = values = items = __getitem__ = __contains__ = _Guard._refuse
    __iter__ = __len__ = __eq__ = __ne__ = __bool__ = __str__ = _Guard._refuse

    # Read-only and refusing on purpose (see the class docstring), which typing forbids.
    @property  # type: ignore[misc]
    def __class__(self) -> NoReturn:  # type: ignore[override]
        self._refuse()


def stand_in(step: str, output: Any) -> Any:
    """What the render context holds for a step's output: the output itself (the very
    same object) when it holds no reference, else a copy in which every marker, the
    whole output's or a field's at any depth, is a guarding stand-in."""
    if is_ref(output):
        return _StoredOutput(step, output)
    if not isinstance(output, _CONTAINERS):
        return output
    if (
        type(output) is dict
        and len(output) <= _FLAT
        and not any(isinstance(v, _CONTAINERS) for v in output.values())
    ):
        return output  # a few scalars, the common output: no marker can hide in it
    # Outputs are never changed once in state, so what the scan found for this very
    # object holds: a forEach renders over the same upstream outputs once per item.
    key = (id(output), step)
    seen = _SCANNED.get(key)
    if seen is not None and seen[0] is output:
        return seen[1]
    result = _guarded(output, step, ()) if _holds_ref(output) else output
    if len(_SCANNED) >= _SCANNED_MAX:
        _SCANNED.clear()
    _SCANNED[key] = (output, result)  # holding the object keeps its id from being reused
    return result


def reveal(value: Any) -> Any:
    """`value` with every stand-in replaced by the marker it stands for."""
    return _rebuild(value, lambda v: v.marker if isinstance(v, _Guard) else _KEEP)


# ------------------------------------------------------------------- internals

_KEEP: Final = object()  # "leave this value as it is and look inside it"
_SCANNED: dict[tuple[int, str], tuple[Any, Any]] = {}
_FLAT: Final = 16  # a flat dict this small is checked directly, not through the cache
_SCANNED_MAX: Final = 256  # outputs kept alive by it: each at most the offload threshold
_CONTAINERS: Final = (dict, list, tuple)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _holds_ref(value: Any) -> bool:
    """Whether a marker sits anywhere inside the container `value`.

    Runs over every output each time templates render, so it builds nothing and
    settles the scalars that make up most of an output by identity checks alone
    (isinstance costs several times more per item).
    """
    if isinstance(value, dict):
        if REF_KEY in value and is_ref(value):
            return True
        items: Any = value.values()
    else:
        items = value
    for item in items:
        kind = type(item)
        if kind is str or kind is int or kind is float or kind is bool or item is None:
            continue
        if isinstance(item, _CONTAINERS) and _holds_ref(item):
            return True
    return False


def _guarded(value: Any, step: str, path: tuple[str | int, ...]) -> Any:
    """`value` with each marker inside it replaced by a stand-in that names its field
    path; containers are copied only on the way to a marker."""
    if is_ref(value):
        where = "output"
        for key in path:
            where = child_path(where, key)
        return _StoredField(step, value, where)
    if isinstance(value, dict):
        pairs: Any = value.items()
    elif isinstance(value, list | tuple):
        pairs = enumerate(value)
    else:
        return value
    changed: dict[Any, Any] = {}
    for key, item in pairs:
        if isinstance(item, _CONTAINERS):
            new = _guarded(item, step, (*path, key))
            if new is not item:
                changed[key] = new
    if not changed:
        return value
    if isinstance(value, dict):
        return {**value, **changed}
    items = [changed.get(index, item) for index, item in enumerate(value)]
    return tuple(items) if isinstance(value, tuple) else items


def _walk_refs(value: Any) -> Iterator[PayloadRef]:
    if isinstance(value, _Guard):  # first: a field's stand-in refuses other type tests
        return
    if is_ref(value):
        yield ref_of(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk_refs(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk_refs(item)


def _rebuild(value: Any, swap: Callable[[Any], Any]) -> Any:
    """Copy-on-change walk: `swap` returns a replacement, or _KEEP to descend."""
    replacement = swap(value)
    if replacement is not _KEEP:
        return replacement
    # Tested first: a field's stand-in refuses every other type test (it is never opened).
    if isinstance(value, _Guard):
        return value
    if isinstance(value, dict):
        copy: dict[Any, Any] | None = None
        for key, item in value.items():
            new = _rebuild(item, swap)
            if new is not item:
                copy = dict(value) if copy is None else copy
                copy[key] = new
        return value if copy is None else copy
    if isinstance(value, list | tuple):
        items = [_rebuild(item, swap) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return tuple(items) if isinstance(value, tuple) else items
    return value
