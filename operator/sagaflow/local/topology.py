"""`sagaflow servicebus-topology`: create the Service Bus queues sagaflow needs, on request.

Nothing creates queues at run time; a platform team runs this once (or declares the
same queues in its infrastructure code): `sagaflow.events` plus one
`steps.<prefix>` queue per step-type prefix.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence

from sagaflow.adapters.servicebus.bus import topology_queues
from sagaflow.adapters.servicebus.client import ServiceBusAdapterError
from sagaflow.adapters.servicebus.topology import ensure_topology
from sagaflow.settings import Settings


async def run_topology(
    prefixes: Sequence[str],
    settings: Settings,
    ensure: Callable[..., Awaitable[list[str]]] = ensure_topology,
) -> int:
    connection = settings.servicebus_connection_string
    if connection is None and not settings.servicebus_namespace:
        print(
            "error: set SAGAFLOW_SERVICEBUS_CONNECTION_STRING or SAGAFLOW_SERVICEBUS_NAMESPACE",
            file=sys.stderr,
        )
        return 2
    queues = topology_queues(prefixes)
    try:
        created = await ensure(
            queues,
            connection_string=connection.get_secret_value() if connection else None,
            namespace=settings.servicebus_namespace,
            lock_duration=settings.lock_duration_seconds,
            max_delivery_count=settings.max_delivery_count,
            session_queues=settings.session_queues,
        )
    except (ServiceBusAdapterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for queue in queues:
        print(f"{queue}: {'created' if queue in created else 'already there, settings aligned'}")
    return 0
