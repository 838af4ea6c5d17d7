"""What the orchestrator does with messages it cannot apply, and with dead letters.

**A poisoned batch.** Events are applied many to a transaction; one event Postgres
or the engine cannot take would roll back all of them, again on every redelivery,
until the whole batch is dead-lettered. So a batch that fails (not for want of the
database) is applied again one event at a time. An event that fails alone is
*rejected*: in a transaction of its own its attempt fails permanently
(`ResultRejected`, naming the error), its inbox row says so and it is settled. Only
if even that fails is it dead-lettered (`ApplyFailed`).

**Dead letters are never silent.** A dead-lettered command (its runner could not
take it: delivered too often, an unknown step type, a receiver that kept dying) or
result means the step would wait forever. The orchestrator receives the dead letters
of the events queue and of every command queue its workflows use, and fails the
attempt they belong to permanently (`DeadLettered`, naming queue, reason and
description), which fails the run and shows in status, Events and `sagaflow run`'s
table. A dead letter for an attempt that is no longer running changes nothing (it is
recorded as ignored); heartbeats are advisory and only logged. Each dead letter goes
through the inbox under `<message id>#dead-letter`, so handling it twice is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sagaflow.adapters.postgres import reads
from sagaflow.core.facts import StepFailed
from sagaflow.core.messages import (
    EVENTS_QUEUE,
    MalformedMessageError,
    StepResult,
    decode_command,
    decode_result,
    parse_attempt_id,
)
from sagaflow.core.ports import MessageLockLostError, ReceivedDeadLetter, ReceivedMessage
from sagaflow.runtime.control import apply_one
from sagaflow.runtime.outages import describe
from sagaflow.telemetry import metrics

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator

log = logging.getLogger("sagaflow.orchestrator")

DEAD_LETTER_INBOX_SUFFIX = "#dead-letter"
SIGNAL_REFUSED = "SignalRefused"  # the dead-letter reason of a refused Signal message


async def isolate(o: Orchestrator, parsed: Sequence[tuple[ReceivedMessage, StepResult]]) -> None:
    """Apply the events of a failed batch one by one; reject the ones that fail alone."""
    for msg, result in parsed:
        try:
            await o.apply_batch([(msg, result)])
        except MessageLockLostError:
            continue  # somebody else has it now
        except Exception as exc:
            await _reject(o, msg, result, exc)


async def _reject(
    o: Orchestrator, msg: ReceivedMessage, result: StepResult, error: Exception
) -> None:
    reason = f"its {result.kind} event {msg.message_id} could not be applied: {describe(error)}"
    log.error("rejecting event %s: %s", msg.message_id, reason, exc_info=error)
    fact = StepFailed(
        result.step, result.attempt, "ResultRejected", reason, False, result.compensation
    )
    try:
        await _fail_attempt(o, result.execution_id, fact, msg.message_id, [msg])
    except Exception:
        log.exception("failing the step of event %s failed too; dead-lettering it", msg.message_id)
        await o.bus.dead_letter(msg, reason="ApplyFailed", description=reason[:4000])


async def _fail_attempt(
    o: Orchestrator,
    execution_id: str,
    fact: StepFailed,
    inbox_id: str,
    settle: Sequence[ReceivedMessage],
) -> bool:
    """Apply `fact` in a transaction of its own (`control.apply_one`); False when its
    inbox id was seen before."""
    _, fresh = await apply_one(o, execution_id, fact, inbox_id, settle)
    return fresh


async def handle_dead_letters(o: Orchestrator) -> int:
    """One pass over every dead-letter queue the orchestrator knows; how many handled."""
    async with o.pool.acquire() as conn:
        queues = [EVENTS_QUEUE, *await reads.command_queues(conn)]
    handled = 0
    for queue in queues:
        for letter in await o.bus.receive_dead_letters(queue, max_messages=o.batch_size):
            await _handle(o, letter)
            # Counted once settled: a pass that fails before that sees it again.
            metrics.DEAD_LETTERS.labels(queue, letter.letter.reason).inc()
            handled += 1
    return handled


async def _handle(o: Orchestrator, received: ReceivedDeadLetter) -> None:
    letter = received.letter
    what = _what(letter.queue, letter.body, letter.message_id)
    told = f"{letter.reason}: {letter.description}" if letter.description else letter.reason
    if what is None and letter.reason == SIGNAL_REFUSED:
        # Refused signals fail nothing: the refusal is in the run's history when the run
        # exists; the log keeps the message for whoever sent it.
        log.warning(
            "signal %s was refused (%s); its body began %.200r",
            letter.message_id,
            told,
            letter.body,
        )
        await o.bus.complete([received.message])
        return
    if what is None:
        # Settled as handled: the Postgres bus keeps the row, Service Bus removes the
        # message from the subqueue, so the log keeps what it held.
        log.warning(
            "dead letter %s on %s names no execution, or is not the message of the attempt "
            "it names (%s); nothing to fail, settled; its body began %.200r",
            letter.message_id,
            letter.queue,
            told,
            letter.body,
        )
        await o.bus.complete([received.message])
        return
    execution_id, step, attempt, undo, kind = what
    if kind == "StepHeartbeat":
        log.info(
            "heartbeat %s was dead-lettered (%s): heartbeats are advisory", letter.message_id, told
        )
        await o.bus.complete([received.message])
        return
    subject = "command" if kind == "ExecuteStep" else "result"
    reason = f"its {subject} {letter.message_id} was dead-lettered on {letter.queue}: {told}"
    log.warning(
        "step %s of execution %s attempt %d failed: %s", step, execution_id, attempt, reason
    )
    fact = StepFailed(step, attempt, "DeadLettered", reason, False, undo)
    try:
        await _fail_attempt(
            o, execution_id, fact, letter.message_id + DEAD_LETTER_INBOX_SUFFIX, [received.message]
        )
    except Exception as exc:
        if o.outages.failed(exc):
            raise  # handled again after the outage
        log.exception(
            "failing step %s of %s for dead letter %s failed", step, execution_id, letter.message_id
        )
        await o.bus.complete([received.message])


def _what(queue: str, body: bytes, message_id: str) -> tuple[str, str, int, bool, str] | None:
    """(execution id, step, attempt, compensation, message kind) of a dead letter, from
    its body, else from its message id (an attempt id, then `/result` or
    `/heartbeat/<n>` on the events queue); None when it names no execution, or its
    body names an attempt whose message id is not its own."""
    found_in_body: tuple[str, str, int, bool, str]
    try:
        if queue == EVENTS_QUEUE:
            r = decode_result(body)
            own_id = r.message_id
            found_in_body = r.execution_id, r.step, r.attempt, r.compensation, r.kind
        else:
            c = decode_command(body)
            own_id = c.attempt_id
            found_in_body = c.execution_id, c.step, c.attempt, c.compensation, "ExecuteStep"
    except MalformedMessageError:
        pass
    else:
        # A copy of a command or result under another message id (not one sagaflow
        # sent: its ids are the attempt's) says nothing of the attempt, whose own
        # message may be running or applied: failing the step for it would fail a
        # healthy run.
        return found_in_body if message_id == own_id else None
    found = parse_attempt_id(message_id)
    if found is None:
        return None
    kind = "ExecuteStep"
    if queue == EVENTS_QUEUE:
        kind = "StepHeartbeat" if "/heartbeat/" in message_id else "StepCompleted"
    return found.execution_id, found.step, found.attempt, found.compensation, kind
