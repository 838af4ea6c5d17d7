"""The claim check: large values travel by reference, through a payload store.

Service Bus takes at most 256 KB a message, and execution state is rewritten on
every transition, so neither should carry a step's 50 MB output. `ClaimCheck` is
the one place that decides what is "large" (its threshold) and the only code that
moves payloads between messages and a `PayloadStore`:

- `offload(value, key)` returns the value unchanged when its compact JSON fits in
  the threshold, else stores that JSON under `key` and returns the reference
  marker `{"$sagaflowRef": {"uri", "size", "sha256"}}` in its place;
- `resolve(value)` returns the value with every marker inside it (at any depth,
  also inside payloads it fetched) replaced by the stored value, fetching several
  at once; a payload that is missing or corrupt raises PayloadMissingError or
  PayloadIntegrityError, a store that fails raises its own error.

Who calls it: the orchestrator offloads each dispatched step's rendered input
(`<attempt>/input`); a runner resolves its command's input before the handler runs
and offloads the handler's output (`<attempt>/output`) and any long error message
(`<attempt>/error`) before replying. Keys derive from the attempt id, so a repeated
attempt overwrites its own payloads instead of leaking new ones, and
`delete_prefix("<execution>/")` removes everything of an execution.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sagaflow.core.messages import output_problem
from sagaflow.core.payload_refs import find_refs, is_ref, ref_object, replace_refs
from sagaflow.core.ports import PayloadIntegrityError, PayloadRef, PayloadStore

# A stored payload may itself hold references (an offloaded input that passes an
# offloaded output on whole); deeper chains than this are a bug, not data.
MAX_DEPTH = 8
# Payloads fetched at once by one resolve: each is already a parallel download.
FETCH_CONCURRENCY = 4


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
        """`value`, or a reference to it once stored, when its compact JSON is larger
        than the threshold. TypeError / ValueError when it is not storable JSON (NaN,
        NUL, ...): what is stored by reference obeys the same rules as what is not."""
        data = encode(value)
        if len(data) <= self.threshold:
            return value
        if (problem := output_problem(value, data)) is not None:
            raise ValueError(problem)
        return ref_object(await self.store.put(key, data))

    async def store_always(self, value: Any, key: str) -> dict[str, Any]:
        """Store `value` whatever its size and return its reference marker (for data
        kept aside on purpose, such as the full text of a truncated error message)."""
        return ref_object(await self.store.put(key, encode(value)))

    async def resolve(self, value: Any) -> Any:
        """`value` with every reference inside it replaced by the value it names."""
        return await self._resolve(value, 0, asyncio.Semaphore(FETCH_CONCURRENCY))

    async def close(self) -> None:
        await self.store.close()

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
