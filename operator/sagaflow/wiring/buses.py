"""Choose the bus adapter from settings: the one place that knows both adapters.

`SAGAFLOW_BUS=postgres` (default) puts the queues in the state database, so the
orchestrator writes commands in its own transaction; `servicebus` uses Azure
Service Bus, and the orchestrator goes through its outbox and relay instead.
"""

from __future__ import annotations

import asyncpg

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.core.ports import Bus
from sagaflow.settings import Settings


def make_bus(settings: Settings, pool: asyncpg.Pool | None) -> Bus:
    if settings.bus == "servicebus":
        # Imported here: the SDK takes a sixth of a second to import, which a run on the
        # Postgres bus should not pay.
        from sagaflow.adapters.servicebus.bus import ServiceBusBus

        sessions = settings.session_queues
        if settings.servicebus_connection_string is not None:
            return ServiceBusBus.from_connection_string(
                settings.servicebus_connection_string.get_secret_value(), session_queues=sessions
            )
        assert settings.servicebus_namespace is not None  # the settings model checks this
        return ServiceBusBus.from_namespace(settings.servicebus_namespace, session_queues=sessions)
    if pool is None:
        raise ValueError("the Postgres bus needs the state database")
    return PostgresBus(
        pool,
        lock_duration=settings.lock_duration_seconds,
        max_delivery_count=settings.max_delivery_count,
        max_crash_count=settings.max_crash_count,
    )
