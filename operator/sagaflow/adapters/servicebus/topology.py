"""Creating the Service Bus queues sagaflow needs: only on request, never at run time.

Plain (session-less) queues with duplicate detection on the message id:
`sagaflow.events` and one `steps.<prefix>` per step-type prefix (see docs/servicebus.md
and, for why no sessions, docs/design.md).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING

from azure.core.exceptions import ResourceNotFoundError

from sagaflow.adapters.servicebus.client import TopologyError

if TYPE_CHECKING:
    from azure.servicebus.aio.management import ServiceBusAdministrationClient


async def create_topology(
    admin: ServiceBusAdministrationClient,
    queues: Iterable[str],
    *,
    lock_duration: float = 30.0,
    max_delivery_count: int = 10,
    duplicate_detection_window: timedelta = timedelta(minutes=10),
    session_queues: Collection[str] = (),
) -> list[str]:
    """Make every queue in `queues` exist as sagaflow needs it; return those created.

    New queues have duplicate detection on the message id, and sessions only if named
    in `session_queues`. An existing queue must agree on sessions (the setting cannot be changed
    after creation: TopologyError otherwise); its lock duration and max delivery count
    are set to the values given. Called by an operator on request, never at run time."""
    if not 0 < lock_duration <= 300 or max_delivery_count < 1:
        raise ValueError("lock_duration must be in (0, 300] s and max_delivery_count >= 1")
    lock = timedelta(seconds=lock_duration)
    created: list[str] = []
    for name in queues:
        sessions = name in session_queues
        try:
            queue = await admin.get_queue(name)
        except ResourceNotFoundError:
            await admin.create_queue(
                name,
                requires_session=sessions,
                lock_duration=lock,
                max_delivery_count=max_delivery_count,
                requires_duplicate_detection=True,
                duplicate_detection_history_time_window=duplicate_detection_window,
            )
            created.append(name)
            continue
        if bool(queue.requires_session) != sessions:
            have, need = ("with", "without") if queue.requires_session else ("without", "with")
            raise TopologyError(
                f"queue {name!r} exists {have} sessions and sagaflow needs it {need}; the "
                "setting cannot be changed after creation: delete the queue (once it is "
                "drained) and run the topology command again"
            )
        if queue.lock_duration != lock or queue.max_delivery_count != max_delivery_count:
            queue.lock_duration = lock
            queue.max_delivery_count = max_delivery_count
            await admin.update_queue(queue)
    return created


async def ensure_topology(
    queues: Iterable[str],
    *,
    connection_string: str | None,
    namespace: str | None,
    lock_duration: float,
    max_delivery_count: int,
    session_queues: Collection[str] = (),
) -> list[str]:
    """Open an administration client (connection string, or azure-identity on the
    namespace), create what `queues` lack with `create_topology`, and close it."""
    from azure.servicebus.aio.management import ServiceBusAdministrationClient

    if connection_string:
        admin = ServiceBusAdministrationClient.from_connection_string(connection_string)
        credential = None
    elif namespace:
        from azure.identity.aio import DefaultAzureCredential

        credential = DefaultAzureCredential()
        admin = ServiceBusAdministrationClient(namespace, credential=credential)
    else:
        raise ValueError("a connection string or a namespace is needed")
    try:
        async with admin:
            return await create_topology(
                admin,
                queues,
                lock_duration=lock_duration,
                max_delivery_count=max_delivery_count,
                session_queues=session_queues,
            )
    finally:
        if credential is not None:
            await credential.close()
