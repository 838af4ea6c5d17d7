"""`sagaflow_leader`: read from kopf's peering status on kopf's own rule."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sagaflow.kube.leader import leads, watch
from sagaflow.telemetry.metrics import REGISTRY

pytestmark = pytest.mark.timeout(10)

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def peer(priority: int, seen_ago: float, lifetime: float = 60) -> dict[str, Any]:
    seen = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"me": peer(100, 1)}, True),
        ({"me": peer(100, 1), "other": peer(50, 1)}, True),
        ({"me": peer(50, 1), "other": peer(100, 1)}, False),
        ({"me": peer(50, 1), "other": peer(100, 120)}, True),  # the higher one is dead
        ({"me": peer(100, 1), "twin": peer(100, 1)}, True),  # same priority: both run
        ({"me": peer(50, 1), "junk": {"priority": "high"}}, True),
    ],
)
def test_the_lead_follows_kopfs_rule(status: dict[str, Any], expected: bool) -> None:
    assert leads({"status": status}, int(status["me"]["priority"]), NOW) is expected


def test_without_a_peering_object_no_replica_leads() -> None:
    assert leads(None, 100, NOW) is False


async def test_the_gauge_follows_the_peering_object() -> None:
    readings = [{"status": {"other": peer(200, 0)}}, {"status": {}}]
    stop = asyncio.Event()
    seen: list[float | None] = []

    async def fetch() -> dict[str, Any] | None:
        seen.append(REGISTRY.get_sample_value("sagaflow_leader"))
        if len(readings) == 0:
            stop.set()
            return {"status": {}}
        return readings.pop(0)

    await watch(fetch, 100, stop, interval=0.001, clock=lambda: NOW)
    # Before the 2nd fetch the gauge said 0 (a higher peer), before the 3rd 1.
    assert seen[1:3] == [0.0, 1.0]
