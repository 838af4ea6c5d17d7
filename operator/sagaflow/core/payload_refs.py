"""Claim-check references as plain data, and what the pure engine may do with them.

This module owns the reference marker: a payload too large to travel in a message
is stored in a payload store and replaced by `{"$sagaflowRef": {"uri", "size",
"sha256"}}` (`ref_object`). Messages and execution state carry the marker as it is,
so state rows stay small; only the runtime's `ClaimCheck` turns it back into the
value. Everything here is pure: the engine uses it without any I/O.

Rendering step inputs over an offloaded output: `${{ steps.X.output }}` as a whole
value passes the marker on, and the next runner resolves it. An expression that
looks inside the output cannot be answered without the payload; evaluated over the
marker it would read `null` and the step would run on wrong data. So while
templates render, each offloaded output is replaced by a stand-in (`stand_in`) that
fails every look inside with ReferenceAccessError, and `reveal` puts the markers
back into whatever was passed whole.

The key `$sagaflowRef` is reserved: a value that has that shape anywhere inside a
step input or output is treated as a reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

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


class _StoredOutput(dict[str, Any]):
    """Stands in for an offloaded step output while templates render.

    A dict subclass, so JMESPath treats it as an object where it only tests the type
    (list operations then give null, exactly as on the real output, which is always a
    JSON object); every look inside (field, keys, values, length, equality,
    truthiness, JSON encoding) raises. Its type name is unknown to JMESPath, so
    functions that check argument types reject it, loudly, naming this object.
    """

    __slots__ = ("marker", "step")

    def __init__(self, step: str, marker: dict[str, Any]) -> None:
        # Holding the marker's items keeps C fast paths that read the dict's storage
        # directly (json's "empty dict" shortcut) from seeing an empty object.
        super().__init__(marker)
        self.step = step
        self.marker = marker

    def _refuse(self, *_: Any, **__: Any) -> NoReturn:
        size = self.marker[REF_KEY]["size"]
        raise ReferenceAccessError(
            f"output of step {self.step!r} is stored by reference ({size} bytes); pass it whole"
        )

    get = keys = values = items = __getitem__ = __contains__ = _refuse
    __iter__ = __len__ = __eq__ = __ne__ = _refuse

    def __repr__(self) -> str:
        size = self.marker[REF_KEY]["size"]
        return (
            f"<output of step {self.step!r} is stored by reference ({size} bytes); pass it whole>"
        )

    __str__ = __repr__


def stand_in(step: str, output: Any) -> Any:
    """What the render context holds for a step's output: the output itself, or the
    guarding stand-in when it is stored by reference."""
    return _StoredOutput(step, output) if is_ref(output) else output


def reveal(value: Any) -> Any:
    """`value` with every stand-in replaced by the marker it stands for."""
    return _rebuild(value, lambda v: v.marker if isinstance(v, _StoredOutput) else _KEEP)


# ------------------------------------------------------------------- internals

_KEEP: Final = object()  # "leave this value as it is and look inside it"


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _walk_refs(value: Any) -> Iterator[PayloadRef]:
    if is_ref(value):
        yield ref_of(value)
    elif isinstance(value, dict) and not isinstance(value, _StoredOutput):
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
    if isinstance(value, dict) and not isinstance(value, _StoredOutput):
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
