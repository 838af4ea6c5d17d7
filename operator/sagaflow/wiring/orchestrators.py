"""An orchestrator on the state of a state dir (or SAGAFLOW_DATABASE_URL), from settings.

What `sagaflow run` and the control verbs both need: the migrated database, the bus
and the claim check the settings name, the store, and their teardown in the right
order (bus and outage watch before the pool, the payload store last).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.ports import Bus
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.settings import Settings
from sagaflow.wiring.buses import make_bus
from sagaflow.wiring.database import Database, open_database
from sagaflow.wiring.payloads import make_claim_check


@dataclass(frozen=True)
class Wired:
    orchestrator: Orchestrator
    bus: Bus
    db: Database
    claim_check: ClaimCheck


@asynccontextmanager
async def open_orchestrator(
    settings: Settings,
    state_dir: Path,
    *,
    pool_size: int = 8,
    give_up: asyncio.Event | None = None,
) -> AsyncIterator[Wired]:
    """The orchestrator and what it runs on; GaveUpWaiting as `open_database` says."""
    claim_check = make_claim_check(settings, state_dir)
    try:
        async with open_database(settings, state_dir, pool_size, give_up) as db:
            bus = make_bus(settings, db.pool)
            orchestrator = Orchestrator(
                PostgresStore(db.pool),
                bus,
                batch_size=settings.batch_size,
                claim_check=claim_check,
                gauge_interval=settings.metrics_interval,
            )
            try:
                yield Wired(orchestrator, bus, db, claim_check)
            finally:
                await bus.close()
                await orchestrator.outages.close()
    finally:
        await claim_check.close()
