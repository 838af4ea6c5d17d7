"""A receiving PostgresBus's lease, and the reaping of receivers that died.

Every bus that receives registers once (`bus_receivers`, see migration 0004) and
renews a lease on the database's clock every `interval` seconds; its session locks
name it. On every renewal (and at registration, which is how a restarted process
recovers its predecessor's work at once) it reaps the receivers that died:

- on its own host (same boot and pid namespace) by asking the kernel: a process that
  is gone, or whose pid now belongs to a later process, is dead at once;
- anywhere, by lease: one not renewed for `lease_seconds` is taken for dead. Only
  by a reaper that has itself been healthy that long: after an outage of the
  database everyone's lease has run out, and the live ones need one renewal to
  show it.

Reaping releases what the dead one held and counts a crash on each message (see
`bus_reap`). A live process's locks are never touched: that is what replaced
"release every lock at start", which let a restarted `sagaflow run` take the
commands a live `sagaflow runner` was running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import asyncpg

from sagaflow.adapters.postgres.processes import still_running, this_process

log = logging.getLogger("sagaflow.bus")

_REGISTER = """
INSERT INTO bus_receivers (receiver, host, hostname, pid, pid_started, started_at, lease_until)
VALUES ($1, $2, $3, $4, $5, now(), now() + make_interval(secs => $6))
ON CONFLICT (receiver) DO UPDATE SET lease_until = excluded.lease_until
"""
_RENEW = """
UPDATE bus_receivers SET lease_until = now() + make_interval(secs => $2) WHERE receiver = $1
"""
_NEIGHBOURS = """
SELECT receiver, pid, pid_started FROM bus_receivers WHERE host = $1 AND receiver <> $2
"""
_REAP = "SELECT * FROM bus_reap($1::uuid[], $2)"
# Leaving cleanly: what is still held goes back as if abandoned (no crash is counted).
_LEAVE = """
WITH gone AS (
    DELETE FROM bus_sessions WHERE receiver = $1 RETURNING queue, session_id, lock_token
), released AS (
    UPDATE bus_messages m SET lock_token = NULL, locked_until = NULL FROM gone g
    WHERE m.queue = g.queue AND m.session_id = g.session_id AND m.lock_token = g.lock_token
    RETURNING m.queue
), me AS (
    DELETE FROM bus_receivers WHERE receiver = $1
)
SELECT pg_notify('sagaflow_bus', d.queue) FROM (SELECT DISTINCT queue FROM released) AS d
"""


class ReceiverLease:
    def __init__(
        self, pool: asyncpg.Pool, *, lease_seconds: float = 10.0, interval: float = 2.0
    ) -> None:
        if not 0 < interval < lease_seconds:
            raise ValueError("the renewal interval must be shorter than the lease")
        self.id = uuid.uuid4()
        self._pool = pool
        self._lease = lease_seconds
        self._interval = interval
        self._registered = False
        self._register_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Monotonic time since when renewals have succeeded without a break; -inf until
        # the first failure (a new process may judge leases at once).
        self._healthy_since = float("-inf")

    async def ensure(self) -> None:
        """Register (and recover dead receivers' work) before the first receive."""
        if self._registered:
            return
        async with self._register_lock:
            if self._registered:
                return
            async with self._pool.acquire() as conn:
                await self._register(conn)
                await self._reap(conn)
            self._registered = True
            self._task = asyncio.create_task(self._renew_loop(), name="bus receiver lease")

    async def _register(self, conn: asyncpg.Connection) -> None:
        me = this_process()
        await conn.execute(
            _REGISTER, self.id, me.host, me.hostname, me.pid, me.started, self._lease
        )

    async def reap(self) -> int:
        """Reap dead receivers now; how many were reaped."""
        async with self._pool.acquire() as conn:
            return await self._reap(conn)

    async def _reap(self, conn: asyncpg.Connection) -> int:
        me = this_process()
        neighbours = await conn.fetch(_NEIGHBOURS, me.host, self.id)
        dead = [r["receiver"] for r in neighbours if not still_running(r["pid"], r["pid_started"])]
        judge_leases = time.monotonic() - self._healthy_since >= self._lease
        reaped = await conn.fetch(_REAP, dead, judge_leases)
        for row in reaped:
            log.warning(
                "receiver %s (pid %s on %s) is gone: released its %d session(s) and %d "
                "message(s) for redelivery, counted as a crash",
                row["receiver"],
                row["pid"],
                row["hostname"],
                row["sessions"],
                row["messages"],
            )
        return len(reaped)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                async with self._pool.acquire() as conn:
                    if await conn.execute(_RENEW, self.id, self._lease) == "UPDATE 0":
                        log.warning(
                            "this process's bus lease ran out and another process released "
                            "its locks; commands it is running may be delivered elsewhere too"
                        )
                        await self._register(conn)
                    if self._healthy_since == float("inf"):
                        self._healthy_since = time.monotonic()
                    await self._reap(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The loops report outages; the lease only remembers that it had one.
                self._healthy_since = float("inf")
                log.debug("renewing the bus lease failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._registered:
            self._registered = False
            with contextlib.suppress(Exception):
                async with self._pool.acquire() as conn:
                    await conn.execute(_LEAVE, self.id)
