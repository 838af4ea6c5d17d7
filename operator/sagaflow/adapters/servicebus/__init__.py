"""The Azure Service Bus adapter: the production `Bus` (`ServiceBusBus`), the narrow
client interface it is written against (`SessionClient`) with its SDK implementation
(`AzureSessionClient`), and the topology helper an operator runs on request
(`create_topology`).

See `docs/servicebus.md` for the queues, sessions, auth and size limits.
"""

from sagaflow.adapters.servicebus.azure_client import AzureSessionClient
from sagaflow.adapters.servicebus.bus import (
    STANDARD_TIER_MAX_BYTES,
    BusOptions,
    ServiceBusBus,
    topology_queues,
)
from sagaflow.adapters.servicebus.client import (
    Delivery,
    MessageTooLargeError,
    QueueLink,
    RetryPolicy,
    ServiceBusAdapterError,
    ServiceBusTransientError,
    SessionClient,
    SessionReceiver,
    TopologyError,
    WireMessage,
)
from sagaflow.adapters.servicebus.topology import create_topology, ensure_topology

__all__ = [
    "STANDARD_TIER_MAX_BYTES",
    "AzureSessionClient",
    "BusOptions",
    "Delivery",
    "MessageTooLargeError",
    "QueueLink",
    "RetryPolicy",
    "ServiceBusAdapterError",
    "ServiceBusBus",
    "ServiceBusTransientError",
    "SessionClient",
    "SessionReceiver",
    "TopologyError",
    "WireMessage",
    "create_topology",
    "ensure_topology",
    "topology_queues",
]
