"""Write Postgres state back to the Execution objects: status, Events, TTL deletion.

Postgres is authoritative; an object's `status` is a bounded view of it and its
Events are its history, as far as the mirror has got. The mirror is a loop beside
kopf, woken by the store's notification on every committed transition:

- It takes the object-backed executions whose revision is ahead of what their
  object shows, locking their mirror rows (`SKIP LOCKED`: replicas share the work).
- It posts the history rows not yet posted as Events (named after the row, so a
  repeat after a crash is "already exists"), then writes the status: an object
  that shows a phase has the Events that led there, so `kubectl wait` followed by
  `kubectl get events` sees the whole story.
- A status write never goes backwards: it is skipped when the object already shows
  this revision or a later one, and it is a merge patch conditioned on the
  resourceVersion just read, so a concurrent writer makes it retry, not clobber.
- Only after both succeeded does the mirror row advance; a failure is retried on
  the next pass.

Child executions of object-backed parents get objects of their own
(`kube/children.py`), created on the same pass, then mirrored like the others.

The TTL collector deletes objects whose execution finished more than their
`ttlSecondsAfterFinished` ago; the delete handler then releases the name.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg

from sagaflow.adapters.postgres import mirror_rows
from sagaflow.adapters.postgres.mirror_rows import HistoryRow, Pending
from sagaflow.adapters.postgres.notify import Notifications
from sagaflow.adapters.postgres.store import EXECUTIONS_CHANNEL
from sagaflow.core.ports import Clock, utc_now
from sagaflow.core.status import bounded_status, execution_status, keep_transition_times
from sagaflow.kube.api import EXECUTIONS, ConflictError, KubeApi, execution_id_of
from sagaflow.kube.children import materialize_once
from sagaflow.kube.events import event_for
from sagaflow.runtime.outages import OutageWatch

log = logging.getLogger("sagaflow.mirror")
T = TypeVar("T")

# The conditions the state projects (`execution_status`); others belong to the handlers.
MIRRORED_CONDITIONS = frozenset({"Succeeded", "Ready", "Request"})
_WRITE_TRIES = 3  # conflicts in a row before the execution waits for the next pass


def status_patch(pending: Pending, obj: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings `obj`'s status to `pending`'s state; None if stale.

    Keys the new status no longer has are removed (null), conditions keep their
    transition time while their status holds, conditions of other types (the
    handlers' `SpecAccepted`) stay as they are, and the patch carries the object's
    resourceVersion so the API server refuses it if the object changed meanwhile.
    """
    current = obj.get("status") or {}
    shown = current.get("revision")
    if isinstance(shown, int) and shown >= pending.state.revision:
        return None
    status = bounded_status(execution_status(pending.state))
    before = current.get("conditions")
    before = [c for c in before if isinstance(c, dict)] if isinstance(before, list) else []
    status["conditions"] = keep_transition_times(status["conditions"], before) + [
        c for c in before if c.get("type") not in MIRRORED_CONDITIONS
    ]
    generation = obj.get("metadata", {}).get("generation")
    if isinstance(generation, int):
        status["observedGeneration"] = generation
    removed = {key: None for key in current if key not in status}
    return {
        "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
        "status": {**removed, **status},
    }


class StatusMirror:
    def __init__(
        self,
        pool: asyncpg.Pool,
        api: KubeApi,
        *,
        clock: Clock = utc_now,
        batch_size: int = 64,
        events_per_pass: int = 200,
        poll_seconds: float = 2.0,
        concurrency: int = 16,
        instance: str | None = None,
        outages: OutageWatch | None = None,
    ) -> None:
        self.pool = pool
        self.api = api
        self.clock = clock
        self.batch_size = batch_size
        self.events_per_pass = events_per_pass
        self.poll_seconds = poll_seconds
        self.instance = instance or socket.gethostname()
        self._api_slots = asyncio.Semaphore(concurrency)
        self.outages = outages

    async def mirror_once(self) -> int:
        """Bring up to one batch of objects up to date; return how many now are.

        The database work is sequential on one connection; the batch's API calls run
        side by side (at most `concurrency` at once), since round trips to the API
        server, not the database, bound the mirror.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            pending = await mirror_rows.lock_pending(conn, self.batch_size)
            # One row past the pass's share tells whether more history is waiting.
            fetched = [
                await mirror_rows.history_after(
                    conn, item.execution_id, item.event_seq, self.events_per_pass + 1
                )
                for item in pending
            ]
            histories = [rows[: self.events_per_pass] for rows in fetched]
            outcomes = await asyncio.gather(
                *(
                    self._mirror(item, rows, more=len(all_rows) > len(rows))
                    for item, rows, all_rows in zip(pending, histories, fetched, strict=True)
                )
            )
            done = 0
            for item, rows, written in zip(pending, histories, outcomes, strict=True):
                if written is None:
                    continue  # all again next pass; posted Events answer "already exists"
                last_seq = rows[-1].seq if rows else item.event_seq
                # With Events still to post, or a status not written, the revision is
                # not recorded as mirrored: the execution comes back on the next pass.
                revision = item.state.revision if written else -1
                await mirror_rows.advance(conn, item.execution_id, revision, last_seq)
                done += written
        return done

    async def _mirror(self, item: Pending, rows: list[HistoryRow], *, more: bool) -> bool | None:
        """Post the Events, then write the status: whether it was written, None on error.

        The Events go side by side (each carries its own time; kubectl sorts by it).
        The status waits for them, and for the rest of a history longer than one
        pass, so it never shows a state whose Events are not there yet.
        """
        events = [
            event
            for row in rows
            if (
                event := event_for(
                    row,
                    namespace=item.namespace,
                    name=item.name,
                    execution_id=item.execution_id,
                    instance=self.instance,
                )
            )
            is not None
        ]
        try:
            await asyncio.gather(
                *(self._limited(self.api.create_event(item.namespace, e)) for e in events)
            )
            if more:
                return False  # more history to post first; back on the next pass
            written = await self._limited(self._write_status(item))
        except Exception:
            # One object's trouble (RBAC, a webhook, a network blip) must not stall
            # the others: its row stays behind and is retried next pass.
            log.exception("mirroring %s/%s failed", item.namespace, item.name)
            return None
        return bool(written)

    async def _limited(self, call: Awaitable[T]) -> T:
        async with self._api_slots:
            return await call

    async def _write_status(self, item: Pending) -> bool:
        for _ in range(_WRITE_TRIES):
            obj = await self.api.get(EXECUTIONS, item.namespace, item.name)
            if obj is None or execution_id_of(obj.get("metadata") or {}) != item.execution_id:
                # Gone, or the name now belongs to a newer object: nothing to write
                # (the delete handler releases this execution).
                return True
            patch = status_patch(item, obj)
            if patch is None:
                return True
            try:
                await self.api.patch_status(EXECUTIONS, item.namespace, item.name, patch)
                return True
            except ConflictError:
                continue
        return False

    async def collect_once(self) -> int:
        """Delete the objects of executions finished longer ago than their TTL."""
        async with self.pool.acquire() as conn:
            expired = await mirror_rows.expired(conn, self.clock(), self.batch_size)
        for row in expired:
            namespace, name, uid = row["namespace"], row["name"], row["execution_id"]
            log.info("deleting %s/%s: finished longer than its TTL ago", namespace, name)
            # The uid precondition: never delete a newer object that took the name.
            await self.api.delete(EXECUTIONS, namespace, name, uid=uid)
        return len(expired)

    async def run(self, stop: asyncio.Event, dsn: str) -> None:
        notes = Notifications(dsn, (EXECUTIONS_CHANNEL,))
        await notes.start()
        try:
            while not stop.is_set():
                try:
                    while await self.mirror_once() == self.batch_size:
                        pass
                    await materialize_once(self.pool, self.api, self.batch_size)
                    await self.collect_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self.outages is not None and await self.outages.retry(exc):
                        continue
                    log.exception("status mirror pass failed")
                await notes.wait(EXECUTIONS_CHANNEL, self.poll_seconds)
        finally:
            await notes.close()
