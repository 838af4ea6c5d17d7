"""An AMQP 1.0 peer that behaves like Azure Service Bus, for tests of the real SDK.

The unmodified `azure-servicebus` SDK (sync and `azure.servicebus.aio`) talks to it
with a connection string such as
`Endpoint=sb://127.0.0.1:PORT/;SharedAccessKeyName=test;SharedAccessKey=dGVzdA==;UseDevelopmentEmulator=true`
(the emulator flag turns TLS off and keeps the port)::

    with running_peer({"orders": QueueSpec(requires_session=True, lock_duration=5.0)}) as peer:
        client = ServiceBusClient.from_connection_string(peer.connection_string)
        ...
        peer.add_queue("events", QueueSpec())
        peer.counts("orders")    # messages by state, dead letters included
        peer.drop_connections()  # fault injection: every socket shut, no AMQP close
        peer.restart()           # stop listening, listen again on the same port

`running_peer` works with `with` and `async with`; the peer runs on its own thread.
`running_peer(..., speed=20)` runs the peer's clock 20 times as fast as real time (a
30 s lock ends after 1.5 s); everything the peer reports is in that clock, which
`peer.now()` reads (see `fixture`).

Layers, each its own module: `entities` (state and its indexes) under `broker` (the
queue rules, pure, injectable clock), with `lifecycle` (transitions several rules
share) and `sessions` (session locks); `codec` (message bytes in and out);
`management` (`$management` and `$cbs` requests); `consumers` (receiver links,
sessions on the wire, settlement); `amqp` (the proton event handler); `sasl`
(ANONYMOUS and PLAIN ahead of proton); `loop` (sockets and the one thread);
`fixture` (the handle tests hold).

Not implemented (an attach or request for these is refused or answered with an
error, never ignored): topics, subscriptions and rules; transactions; partitioned
entities (a partition key is carried, never used); auto-forwarding and the transfer
dead-letter queue; `get-message-sessions` (the session browser) and the rule
operations; the HTTP administration API (queues come from `running_peer` and
`add_queue`); TLS and WebSockets; quotas and server-busy throttling. CBS tokens are
accepted unchecked (PLAIN logins are checked against the key name and key), and there
are no Send/Listen claims. `absolute-expiry-time` is ignored (the header's ttl counts,
which the SDK sets in whole seconds). `com.microsoft:server-timeout` is ignored: every
request is answered at once.

Where the peer had to choose without a service to compare with: a released delivery
(the SDK's way of giving back a prefetched message) returns without raising the
delivery count; message locks of a closed or dropped non-session link stay until they
expire, while a session whose link goes away is released at once and its unsettled
messages come back with the count raised; dead letters keep their sequence number,
enqueue time and delivery count and never expire; `x-opt-deadletter-source` is set on
every dead letter; a next-available attach without `com.microsoft:timeout` waits 60 s.

SDK behaviour the peer cannot change: the SDK starts its own deadline for a
next-available accept before it connects, while the service's (and the peer's) wait
starts at the attach, so for short waits the SDK usually gives up first and raises its
own `OperationTimeoutError` ("Timed out waiting for the AMQP link to open") rather than
the one mapped from `com.microsoft:timeout`. The sync SDK's close of a sender or
receiver waits for its keep-alive thread, which sleeps in one-second steps, so each
handler costs up to a second to close. proton does not expose a delivery's
message-format, so SDK batches are recognised by shape (see `codec`).
"""

from .entities import QueueSpec
from .fixture import QueueCounts, ServiceBusPeer, running_peer

__all__ = ["QueueCounts", "QueueSpec", "ServiceBusPeer", "running_peer"]
