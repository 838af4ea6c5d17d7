"""The claim check: large values travel by reference, through a payload store.

Service Bus takes at most 256 KB a message, and execution state is rewritten on
every transition, so neither should carry a step's 50 MB output. `ClaimCheck` is
the one place that decides what is "large" (its threshold) and the only code that
moves payloads between messages and a `PayloadStore`:

- `offload(value, key)` returns the value unchanged when its compact JSON fits in
  the threshold. Otherwise it stores the value field by field where it can: its
  largest values (at any depth of nested objects; lists and strings are never cut)
  are stored one by one, largest first, each under `<key>.<field path>` and
  replaced by the reference marker `{"$sagaflowRef": {"uri", "size", "sha256"}}`,
  until what stays inline fits. Small fields stay readable where they were, so
  a later step's `${{ steps.X.output.sha }}` needs no payload. When that cannot fit
  (thousands of small fields, every field large, more than MAX_FIELD_REFS pieces),
  or nothing would stay inline, the whole value is stored under `key` and replaced
  by one marker, as for a value that is not an object;
- `resolve(value)` returns the value with every marker inside it (at any depth,
  also inside payloads it fetched) replaced by the stored value, fetching several
  at once; a payload that is missing or corrupt raises PayloadMissingError or
  PayloadIntegrityError, a store that fails raises its own error.

Which fields go is planned before anything is stored, with an allowance for the
store's URI prefix (`URI_ALLOWANCE`), so a value that cannot be split leaves no
field payloads behind. Should the real markers still not fit (a longer prefix), the
rest, markers and all, is stored whole under `key`: nothing stored is orphaned,
and resolving follows the markers inside it.

Who calls it: the orchestrator offloads each dispatched step's rendered input
(`<attempt>/input`); a runner resolves its command's input before the handler runs
and offloads the handler's output (`<attempt>/output`, fields as
`<attempt>/output.data`) and any long error message (`<attempt>/error`) before
replying. Keys derive from the attempt id and the field path, so a repeated attempt
overwrites its own payloads instead of leaking new ones, and
`delete_prefix("<execution>/")` removes everything of an execution. A field's key is
a sibling of the whole value's (`output.data` beside `output`), never below it: on
the local store one name cannot be both a file and a directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from sagaflow.adapters.payloads import MAX_KEY_LENGTH
from sagaflow.core.messages import output_problem
from sagaflow.core.payload_refs import find_refs, is_ref, ref_object, replace_refs
from sagaflow.core.ports import PayloadIntegrityError, PayloadRef, PayloadStore

# A stored payload may itself hold references (an offloaded input that passes an
# offloaded output on whole); deeper chains than this are a bug, not data.
MAX_DEPTH = 8
# Payloads fetched (or stored) at once by one resolve (or offload): each is already
# a parallel transfer.
FETCH_CONCURRENCY = 4
# Field payloads one value may be split into: each is a round trip to store and one
# to resolve, so a value that needs more is stored whole.
MAX_FIELD_REFS = 16
# Characters a marker's URI may add to its key (scheme, host, account, container or
# directory) when planning a split; a longer prefix is still correct (see above).
URI_ALLOWANCE = 160


class ClaimCheck:
    def __init__(self, store: PayloadStore, threshold: int) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1 byte, got {threshold}")
        self.store = store
        self.threshold = threshold

    @staticmethod
    def is_ref(value: Any) -> bool:
        """Whether `value` is a reference marker."""
        return is_ref(value)

    async def offload(self, value: dict[str, Any], key: str) -> dict[str, Any]:
        """`value` when its compact JSON fits in the threshold, else `value` with its
        large fields stored by reference, or a reference to all of it (see above).
        TypeError / ValueError when it is not storable JSON (NaN, NUL, ...): what is
        stored by reference obeys the same rules as what is not."""
        data = encode(value)
        if len(data) <= self.threshold:
            return value
        if (problem := output_problem(value, data)) is not None:
            raise ValueError(problem)
        fields = plan_fields(value, len(data), key, self.threshold)
        if not fields:
            return ref_object(await self.store.put(key, data))
        markers = await self._store_fields(fields)
        rest = substitute(value, {f.path: m for f, m in zip(fields, markers, strict=True)})
        rest_data = encode(rest)
        if len(rest_data) <= self.threshold:
            return rest
        # The store's URIs are longer than planned for: keep what is stored, and send
        # one reference to the rest (resolving follows the markers inside it).
        return ref_object(await self.store.put(key, rest_data))

    async def store_always(self, value: Any, key: str) -> dict[str, Any]:
        """Store `value` whatever its size and return its reference marker (for data
        kept aside on purpose, such as the full text of a truncated error message)."""
        return ref_object(await self.store.put(key, encode(value)))

    async def resolve(self, value: Any) -> Any:
        """`value` with every reference inside it replaced by the value it names."""
        return await self._resolve(value, 0, asyncio.Semaphore(FETCH_CONCURRENCY))

    async def close(self) -> None:
        await self.store.close()

    async def _store_fields(self, fields: list[Field]) -> list[dict[str, Any]]:
        limit = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def put(field: Field) -> dict[str, Any]:
            async with limit:
                return ref_object(await self.store.put(field.key, field.data))

        results = await asyncio.gather(*(put(f) for f in fields), return_exceptions=True)
        # Every put has finished: raise the first failure, typed as the store raised it.
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if not isinstance(r, BaseException)]

    async def _resolve(self, value: Any, depth: int, limit: asyncio.Semaphore) -> Any:
        refs = list(dict.fromkeys(find_refs(value)))  # each payload fetched once
        if not refs:
            return value
        if depth >= MAX_DEPTH:
            raise PayloadIntegrityError(
                f"payload references nest deeper than {MAX_DEPTH} levels ({refs[0].uri})"
            )
        results = await asyncio.gather(
            *(self._fetch(ref, depth, limit) for ref in refs), return_exceptions=True
        )
        # Every fetch has finished: raise the first failure, typed as the store raised it.
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return replace_refs(value, dict(zip(refs, results, strict=True)))

    async def _fetch(self, ref: PayloadRef, depth: int, limit: asyncio.Semaphore) -> Any:
        async with limit:
            data = await self.store.get(ref)
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # Its hash matched, so these are the bytes that were stored: not by us.
            raise PayloadIntegrityError(f"payload {ref.uri} is not JSON: {exc}") from exc
        return await self._resolve(value, depth + 1, limit)


def encode(value: Any) -> bytes:
    """Compact JSON, as messages are encoded, so sizes compare like for like."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# ------------------------------------------------------------------ field by field


@dataclass(frozen=True, slots=True)
class Field:
    """A value inside an object to store by reference: where it sits, its JSON, its key."""

    path: tuple[Any, ...]
    data: bytes
    key: str


def plan_fields(value: dict[str, Any], size: int, key: str, threshold: int) -> list[Field]:
    """The fields of `value` (compact JSON `size` bytes) to store by reference, largest
    first, so that the rest fits in `threshold`; empty when it cannot fit in at most
    MAX_FIELD_REFS pieces, or when nothing but references would stay inline."""
    candidates: list[Field] = []
    inline = 0  # values that are not already references
    for path, item in _leaves(value, ()):
        if is_ref(item):
            continue
        inline += 1
        data = encode(item)
        if len(data) > _MARKER_FLOOR:  # anything smaller is no larger than its marker
            field = Field(path, data, field_key(key, path))
            if len(data) > marker_size(field):
                candidates.append(field)
    candidates.sort(key=lambda f: len(f.data), reverse=True)  # stable: ties in order
    chosen: list[Field] = []
    for field in candidates[:MAX_FIELD_REFS]:
        if size <= threshold:
            break
        chosen.append(field)
        size += marker_size(field) - len(field.data)
    if size > threshold or len(chosen) >= inline:
        return []
    return chosen


def field_key(key: str, path: tuple[Any, ...]) -> str:
    """`<key>.<name>.<name>`, each name percent-encoded (also `.`), so any field name
    makes a valid, unambiguous key; a key too long for the stores becomes a digest of
    the path."""
    names = [quote(str(name), safe="").replace(".", "%2E") for name in path]
    full = ".".join([key, *names])
    if len(full) <= MAX_KEY_LENGTH:
        return full
    digest = hashlib.sha256(json.dumps([str(n) for n in path]).encode()).hexdigest()
    return f"{key}.{digest[:32]}"


def marker_size(field: Field) -> int:
    """The planned size of `field`'s marker: the stores quote `%` as `%25` in URIs and
    prefix them with their location (at most URI_ALLOWANCE characters, we assume)."""
    uri = "u" * URI_ALLOWANCE + field.key.replace("%", "%25")
    return len(encode(ref_object(PayloadRef(uri, len(field.data), "0" * 64))))


def substitute(value: dict[Any, Any], new: dict[tuple[Any, ...], Any]) -> dict[Any, Any]:
    """`value` with the value at each path replaced; objects copied along the paths only."""
    copy = dict(value)
    deeper: dict[Any, dict[tuple[Any, ...], Any]] = {}
    for path, item in new.items():
        if len(path) == 1:
            copy[path[0]] = item
        else:
            deeper.setdefault(path[0], {})[path[1:]] = item
    for name, inner in deeper.items():
        copy[name] = substitute(value[name], inner)
    return copy


def _leaves(value: dict[Any, Any], path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every value reached through nested objects, with its path: what may be split off."""
    for name, item in value.items():
        if isinstance(item, dict) and item and not is_ref(item):
            yield from _leaves(item, (*path, name))
        else:
            yield (*path, name), item


# The smallest marker there is: its fixed text and a 64-digit SHA-256.
_MARKER_FLOOR = len(encode(ref_object(PayloadRef("", 0, "0" * 64))))
