"""The `sagaflow_leader` gauge: whether this replica holds the kopf peering lead.

kopf elects by priority: every replica writes `{priority, lifetime, lastseen}` under
its id in the peering object's status, and a replica pauses its handlers while a live
peer has a higher priority. kopf does not tell its operator which way that went, so
this reads the same status on the same rule every `interval` seconds. A replica
without peering (`SAGAFLOW_PEERING_NAME` unset) always runs its handlers: 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sagaflow.core.ports import Clock, utc_now
from sagaflow.telemetry import metrics

log = logging.getLogger("sagaflow.operator")

Fetch = Callable[[], Awaitable[dict[str, Any] | None]]


def leads(peering: dict[str, Any] | None, priority: int, now: datetime) -> bool:
    """Whether a replica of `priority` runs the handlers, by the peering object's status:
    no live peer ranks above it (peers of the same priority all run, as kopf has it)."""
    if peering is None:
        return False  # kopf keeps every replica paused until the object exists
    for peer in (peering.get("status") or {}).values():
        if not isinstance(peer, dict):
            continue
        try:
            seen = datetime.fromisoformat(str(peer["lastseen"]))
            alive = seen + timedelta(seconds=float(peer.get("lifetime", 60))) > now
            higher = int(peer["priority"]) > priority
        except (KeyError, TypeError, ValueError):
            continue  # an entry kopf did not write
        if alive and higher:
            return False
    return True


async def watch(
    fetch: Fetch | None,
    priority: int,
    stop: asyncio.Event,
    *,
    interval: float,
    clock: Clock = utc_now,
) -> None:
    """Keep the gauge current until `stop`; `fetch` None: no peering, always the lead."""
    # Runs until `stop` even without peering: the liveness probe counts a finished loop.
    while not stop.is_set():
        try:
            lead = fetch is None or leads(await fetch(), priority, clock())
            metrics.LEADER.set(1 if lead else 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the API away: the last reading stands
            log.info("reading the peering object failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval or 15.0)
