"""Triggers at run time: queue consumers and webhook deliveries that start or signal runs.

`Triggers` is the registry (fed by the operator's handlers and by `sagaflow server`'s
files through `put` / `remove`), acts on the core's verdict (`core/triggers.py`)
through a `Launcher` or a `Signaller`, and keeps the counts the Trigger's status shows
(`sagaflow_trigger_counts`). Two front ends share it:

- `QueueTriggers` consumes each queue Trigger's source queue: receive, decide, act,
  count, settle. A message is completed only after its start or signal committed
  (and was counted); a malformed or refused one is dead-lettered with why; anything
  transient (the database, an unknown workflow, which is not the message's fault)
  abandons it for redelivery, and that Trigger's consumer pauses before receiving
  again. A crash anywhere redelivers, and the idempotency key makes that a duplicate.
- `Webhooks.deliver` answers `POST /v1/namespaces/{ns}/webhooks/{path}`: the secret
  (`SecretResolver`) proves the sender, then the same verdict and action, answered
  with an HTTP status and a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sagaflow.adapters.postgres import triggers_sql
from sagaflow.core import triggers as core
from sagaflow.core.messages import SignalMessage
from sagaflow.core.ports import Bus, Clock, MessageLockLostError, ReceivedMessage, utc_now
from sagaflow.core.trigger_specs import SecretKeyRef, TriggerSpec, TriggerStatus
from sagaflow.core.triggers import Outcome
from sagaflow.core.webhooks import (
    WebhookRefused,
    answer,
    error,
    request_key,
    secret_document,
    verify,
)
from sagaflow.runtime.faults import SIGNAL_REFUSED
from sagaflow.runtime.outages import describe
from sagaflow.runtime.startpath import IdempotencyConflictError, Launcher, Source, StartCall
from sagaflow.runtime.starts import CorrelationKeyInUseError, NameInUseError
from sagaflow.telemetry import tracing

if TYPE_CHECKING:
    import asyncpg

    from sagaflow.runtime.signals import SignalOutcome

log = logging.getLogger("sagaflow.triggers")

MALFORMED = "MalformedMessage"  # dead-letter reason of a message the trigger cannot read
START_REFUSED = "StartRefused"  # ... of one whose start may not happen (a held key, ...)


class SecretNotFoundError(LookupError):
    """The Secret, or its key, does not exist."""


class SecretResolver(Protocol):
    async def secret(self, namespace: str, ref: SecretKeyRef) -> bytes:
        """The value of `ref`'s key; SecretNotFoundError when there is none."""
        ...


class Signaller(Protocol):
    """Delivers a signal (the orchestrator does)."""

    async def signal(self, signal: SignalMessage, signal_id: str) -> SignalOutcome: ...


class FileSecrets:
    """Secrets from `kind: Secret` documents (`data` base64, `stringData` plain text,
    which wins as in Kubernetes): what `sagaflow server` reads from its files."""

    def __init__(self, documents: Iterable[Mapping[str, Any]] = ()) -> None:
        self._secrets: dict[tuple[str, str], dict[str, bytes]] = {}
        for document in documents:
            if document.get("kind") == "Secret":
                self.put(document)

    def put(self, document: Mapping[str, Any]) -> None:
        """Add or replace one Secret document; ValueError naming what is wrong with it."""
        namespace, name, values = secret_document(document)
        self._secrets[(namespace, name)] = values

    async def secret(self, namespace: str, ref: SecretKeyRef) -> bytes:
        value = self._secrets.get((namespace, ref.name), {}).get(ref.key)
        if value is None:
            raise SecretNotFoundError(f"no key {ref.key!r} in Secret {namespace}/{ref.name}")
        return value


class WebhookPathInUseError(ValueError):
    """Another Trigger of the namespace already serves the webhook path."""


@dataclass(frozen=True, slots=True)
class Registered:
    ref: core.TriggerRef
    spec: TriggerSpec


class Triggers:
    """The registry of Triggers, what acting on an event means, and their counts."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        launcher: Launcher,
        signaller: Signaller,
        *,
        clock: Clock = utc_now,
    ) -> None:
        self._pool, self._launcher, self._signaller, self.clock = pool, launcher, signaller, clock
        self._by_name: dict[tuple[str, str], Registered] = {}
        self._by_path: dict[tuple[str, str], tuple[str, str]] = {}
        self._missing: set[tuple[str, str, str]] = set()  # unknown workflows, logged once
        self._watchers: list[Callable[[], None]] = []  # told of every put and remove

    def put(self, namespace: str, name: str, uid: str, spec: TriggerSpec) -> None:
        """Add or replace a Trigger (a changed spec applies to the next event);
        WebhookPathInUseError when another Trigger of the namespace has its path."""
        http = spec.source.http
        if http is not None:
            holder = self._by_path.get((namespace, http.path))
            if holder is not None and holder != (namespace, name):
                raise WebhookPathInUseError(
                    f"webhook path {http.path!r} is served by Trigger {namespace}/{holder[1]}"
                )
        self._drop(namespace, name)
        self._by_name[(namespace, name)] = Registered(core.TriggerRef(namespace, name, uid), spec)
        if http is not None:
            self._by_path[(namespace, http.path)] = (namespace, name)
        self._tell()

    async def remove(self, namespace: str, name: str) -> None:
        """The Trigger was deleted: stop serving it and forget its counts."""
        gone = self._drop(namespace, name)
        self._tell()
        if gone is not None:
            await triggers_sql.forget(self._pool, namespace, name, gone.ref.uid)

    def _drop(self, namespace: str, name: str) -> Registered | None:
        gone = self._by_name.pop((namespace, name), None)
        if gone is not None and gone.spec.source.http is not None:
            self._by_path.pop((namespace, gone.spec.source.http.path), None)
        return gone

    def get(self, namespace: str, name: str) -> Registered | None:
        return self._by_name.get((namespace, name))

    def by_path(self, namespace: str, path: str) -> Registered | None:
        key = self._by_path.get((namespace, path))
        return None if key is None else self._by_name.get(key)

    def all(self) -> list[Registered]:
        return list(self._by_name.values())

    def watch(self, watcher: Callable[[], None], *, stop: bool = False) -> None:
        """Call `watcher` after every put and remove (`stop`: no longer)."""
        (self._watchers.remove if stop else self._watchers.append)(watcher)

    def _tell(self) -> None:
        for watcher in list(self._watchers):
            watcher()

    async def status(self, namespace: str, name: str) -> TriggerStatus | None:
        """The Trigger's counts (zeros before its first event); None if not registered."""
        entry = self.get(namespace, name)
        if entry is None:
            return None
        found = await triggers_sql.read(self._pool, [(namespace, name, entry.ref.uid)])
        return found.get((namespace, name), TriggerStatus())

    async def list_objects(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's Triggers as objects with their status, by name."""
        entries = sorted(
            (e for e in self.all() if e.ref.namespace == namespace), key=lambda e: e.ref.name
        )
        found = await triggers_sql.read(
            self._pool, [(namespace, e.ref.name, e.ref.uid) for e in entries]
        )
        return [
            core.trigger_object(e.ref, e.spec, found.get((namespace, e.ref.name), TriggerStatus()))
            for e in entries
        ]

    async def count(self, entry: Registered, outcomes: Mapping[str, int], *, queue: bool) -> None:
        """Add the outcomes to the Trigger's counts (malformed and refused: queues only)."""
        counts = core.tally(outcomes, queue=queue)
        if counts:
            ref = entry.ref
            await triggers_sql.add(
                self._pool, ref.namespace, ref.name, ref.uid, counts, self.clock()
            )

    async def act(self, entry: Registered, verdict: core.Verdict) -> Outcome:
        """Carry out `verdict`; never raises for an event (transient trouble: `retry`)."""
        if isinstance(verdict, core.Malformed):
            return Outcome("malformed", verdict.describe(), reason=MALFORMED, status=400)
        if isinstance(verdict, core.Filtered):
            return Outcome("filtered", verdict.reason, status=200)
        try:
            if isinstance(verdict, core.SignalOrder):
                return await self._signal(verdict)
            return await self._start(entry, verdict)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("trigger %s/%s: %s", entry.ref.namespace, entry.ref.name, describe(exc))
            return Outcome("retry", describe(exc), reason="Unavailable", status=503)

    async def _start(self, entry: Registered, order: core.StartOrder) -> Outcome:
        call = StartCall(
            order.namespace,
            order.workflow,
            order.input,
            idempotency_key=order.idempotency_key,
            correlation_key=order.correlation_key,
            source=Source(order.source_kind, order.source_name, order.source_uid),
        )
        missing = (order.namespace, entry.ref.name, order.workflow)
        try:
            name, created = await self._launcher.start(call)
        except LookupError as exc:
            if missing not in self._missing:  # not the event's fault: said once, retried
                self._missing.add(missing)
                log.warning("trigger %s/%s: %s; its events wait", missing[0], missing[1], exc)
            return Outcome("retry", str(exc), reason="WorkflowNotFound", status=503)
        except (IdempotencyConflictError, NameInUseError) as exc:
            return Outcome("refused", str(exc), reason=START_REFUSED, status=409)
        except CorrelationKeyInUseError as exc:
            return Outcome("refused", exc.reason, reason=START_REFUSED, status=409)
        self._missing.discard(missing)
        kind = "started" if created else "duplicate"
        return Outcome(kind, f"execution {order.namespace}/{name}", execution=name)

    async def _signal(self, order: core.SignalOrder) -> Outcome:
        outcome = await self._signaller.signal(order.message, order.signal_id)
        name = None if outcome.state is None else outcome.state.name
        if outcome.result in ("applied", "noop"):
            kind = "signalled" if outcome.result == "applied" else "duplicate"
            return Outcome(kind, outcome.message, execution=name, signal=True)
        status = 404 if outcome.result == "unknown" else 409
        return Outcome("refused", outcome.message, name, SIGNAL_REFUSED, status, signal=True)


class _Consumer:
    """One Trigger's consumer: stopped while it waits, never in the middle of a pass."""

    def __init__(self, queue: str) -> None:
        self.queue, self.busy, self.stopped = queue, False, False
        self.task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        self.stopped = True
        if not self.busy and self.task is not None:
            self.task.cancel()


class QueueTriggers:
    """Consumes the source queue of every queue Trigger in `triggers` (not suspended)."""

    def __init__(
        self,
        triggers: Triggers,
        bus: Bus,
        *,
        batch_size: int = 16,
        idle_wait: float = 5.0,
        retry_delay: float = 5.0,
    ) -> None:
        self._triggers, self._bus = triggers, bus
        self._batch_size, self._idle_wait, self._retry_delay = batch_size, idle_wait, retry_delay
        self._consumers: dict[tuple[str, str], _Consumer] = {}
        # Consumers taken off mid-pass: they settle what they received; `run` waits.
        self._retiring: list[_Consumer] = []

    def consuming(self) -> dict[tuple[str, str], str]:
        """The Triggers `run` consumes now, (namespace, name) -> queue."""
        return {key: c.queue for key, c in self._consumers.items()}

    async def consume_once(
        self, namespace: str, name: str, max_wait: float = 0.0, consumer: _Consumer | None = None
    ) -> Counter[str]:
        """One receive for one Trigger, acted on, counted and settled: the outcomes."""
        entry = self._triggers.get(namespace, name)
        queue = None if entry is None else entry.spec.source.queue
        if entry is None or queue is None or entry.spec.suspend:
            return Counter()
        received = await self._bus.receive(queue, max_messages=self._batch_size, max_wait=max_wait)
        if consumer is not None:
            consumer.busy = True  # what was received is settled before the consumer stops
        acted = []
        for message in received:
            incoming = core.Incoming(message.body, message.message_id)
            verdict = core.decide(entry.spec, entry.ref, incoming)
            with tracing.incoming(message.headers):  # the message's trace is the run's
                acted.append((message, await self._triggers.act(entry, verdict)))
        outcomes = Counter(outcome.kind for _, outcome in acted)
        try:
            await self._triggers.count(entry, outcomes, queue=True)
        except BaseException:
            await self._bus.abandon(received)  # counted nothing: all of them again
            raise
        await self._settle(acted)
        return outcomes

    async def _settle(self, acted: list[tuple[ReceivedMessage, Outcome]]) -> None:
        # A lock lost meanwhile means another receiver has the message: it sees a duplicate.
        for message, outcome in acted:
            if outcome.kind in ("malformed", "refused"):
                log.warning("dead-lettering message %s: %s", message.message_id, outcome.message)
                with contextlib.suppress(MessageLockLostError):
                    await self._bus.dead_letter(
                        message, reason=outcome.reason, description=outcome.message[:4000]
                    )
        with contextlib.suppress(MessageLockLostError):
            await self._bus.complete([m for m, o in acted if o.settled])
        await self._bus.abandon([m for m, o in acted if o.kind == "retry"])

    async def run(self, stop: asyncio.Event) -> None:
        """Consume every queue Trigger until `stop` is set, following put and remove."""
        self._triggers.watch(self._follow)
        self._follow()
        try:
            await stop.wait()
        finally:
            self._triggers.watch(self._follow, stop=True)
            consumers = [*self._consumers.values(), *self._retiring]
            self._consumers.clear()
            self._retiring.clear()
            for c in consumers:
                c.stop()
            await asyncio.gather(*(c.task for c in consumers if c.task), return_exceptions=True)

    def _follow(self) -> None:
        """One consumer per queue Trigger that is not suspended, on its current queue."""
        wanted = {
            (e.ref.namespace, e.ref.name): e.spec.source.queue
            for e in self._triggers.all()
            if e.spec.source.queue is not None and not e.spec.suspend
        }
        for key, c in list(self._consumers.items()):
            if wanted.get(key) != c.queue:
                c.stop()
                del self._consumers[key]
                self._retiring = [r for r in self._retiring if r.task and not r.task.done()]
                self._retiring.append(c)
        for key, queue in wanted.items():
            if key not in self._consumers:
                c = self._consumers[key] = _Consumer(queue)
                c.task = asyncio.create_task(self._loop(*key, c))

    async def _loop(self, namespace: str, name: str, c: _Consumer) -> None:
        failing = prepared = False
        while not c.stopped:
            try:
                if not prepared:
                    await self._bus.prepare(receive=[c.queue])
                    prepared = True
                outcomes = await self.consume_once(namespace, name, self._idle_wait, c)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per stretch of failures, not per retry
                    log.warning("trigger %s/%s on %s: %s", namespace, name, c.queue, describe(exc))
                failing = True
                outcomes = Counter({"retry": 1})
            finally:
                c.busy = False
            if not outcomes["retry"]:
                failing = False
            elif not c.stopped:
                await asyncio.sleep(self._retry_delay)  # redeliveries wait a little


class Webhooks:
    """Answers webhook requests for the HTTP-source Triggers in `triggers`."""

    def __init__(self, triggers: Triggers, secrets: SecretResolver) -> None:
        self._triggers, self._secrets = triggers, secrets

    async def deliver(
        self, namespace: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON body answering one request to the webhook."""
        entry = self._triggers.by_path(namespace, path)
        if entry is None or entry.spec.source.http is None:
            return error(404, "NotFound", f"no webhook {path!r} in namespace {namespace}")
        auth = entry.spec.source.http.auth
        ref = auth.hmac_secret_ref or auth.bearer_secret_ref
        assert ref is not None  # the model asks for one of the two
        try:
            secret = await self._secrets.secret(namespace, ref)
        except Exception as exc:
            log.error("webhook %s/%s: its secret: %s", namespace, path, describe(exc))
            return error(503, "SecretUnavailable", "the webhook's secret is not available")
        try:
            verify(auth, secret, headers, body, self._triggers.clock())
        except WebhookRefused as refused:
            return error(refused.status, refused.reason.value, refused.message)
        if entry.spec.suspend:
            return error(503, "Suspended", f"Trigger {entry.ref.name} is suspended")
        incoming = core.Incoming(body, request_key(headers, body), headers)
        with tracing.incoming(headers):  # a `traceparent` header: the run joins that trace
            outcome = await self._triggers.act(entry, core.decide(entry.spec, entry.ref, incoming))
        try:
            await self._triggers.count(entry, {outcome.kind: 1}, queue=False)
        except Exception as exc:  # what happened stands; only its count is lost
            log.warning("counting webhook %s/%s: %s", namespace, path, describe(exc))
        return answer(namespace, outcome)
