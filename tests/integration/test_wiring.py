"""Adapters are chosen by settings alone."""

from __future__ import annotations

import asyncpg
import pytest

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.adapters.servicebus.bus import ServiceBusBus
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.settings import Settings, SettingsError, load_settings
from sagaflow.wiring.buses import make_bus

pytestmark = pytest.mark.timeout(30)

FAKE_CONNECTION = (
    "Endpoint=sb://example.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0"
)


async def test_postgres_is_the_default_and_transactional(pg_pool: asyncpg.Pool) -> None:
    bus = make_bus(Settings(), pg_pool)
    assert isinstance(bus, PostgresBus)
    assert Orchestrator(PostgresStore(pg_pool), bus).transactional
    await bus.close()


async def test_servicebus_from_settings_goes_through_the_outbox(pg_pool: asyncpg.Pool) -> None:
    settings = Settings(bus="servicebus", servicebus_connection_string=FAKE_CONNECTION)
    bus = make_bus(settings, None)  # no network until it is used
    assert isinstance(bus, ServiceBusBus)
    assert not Orchestrator(PostgresStore(pg_pool), bus).transactional
    await bus.close()


def test_a_missing_servicebus_credential_names_the_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGAFLOW_BUS", "servicebus")
    with pytest.raises(SettingsError, match="SAGAFLOW_SERVICEBUS_CONNECTION_STRING"):
        load_settings()
    monkeypatch.setenv("SAGAFLOW_BUS", "kafka")
    with pytest.raises(SettingsError, match="SAGAFLOW_BUS: Input should be 'postgres'"):
        load_settings()


async def test_the_topology_command_creates_events_and_one_queue_per_prefix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sagaflow.local.topology import run_topology

    asked: dict[str, object] = {}

    async def ensure(queues: list[str], **options: object) -> list[str]:
        asked.update(options, queues=queues)
        return ["steps.payments"]

    settings = Settings(servicebus_connection_string=FAKE_CONNECTION, max_delivery_count=5)
    assert await run_topology(["payments", "inventory"], settings, ensure) == 0
    assert asked["queues"] == ["sagaflow.events", "steps.inventory", "steps.payments"]
    assert asked["connection_string"] == FAKE_CONNECTION
    assert asked["max_delivery_count"] == 5
    out = capsys.readouterr().out
    assert "steps.payments: created" in out
    assert "sagaflow.events: already there" in out
    assert await run_topology(["payments"], Settings(), ensure) == 2
    assert "SAGAFLOW_SERVICEBUS_CONNECTION_STRING" in capsys.readouterr().err
