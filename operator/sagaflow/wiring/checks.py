"""What a runner host checks received commands against, where it shares the state.

With the Postgres bus the runner can read the state: an attempt the state never
dispatched is not run, one already settled is completed unrun (`RunnerWorker`).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sagaflow.adapters.postgres import reads
from sagaflow.runtime.worker import AttemptCheck


def attempt_check(pool: asyncpg.Pool) -> AttemptCheck:
    """The runner's check of received commands against the state in `pool`'s database."""

    async def check(attempt_ids: Sequence[str]) -> dict[str, str]:
        async with pool.acquire() as conn:
            return await reads.attempt_statuses(conn, attempt_ids)

    return check
