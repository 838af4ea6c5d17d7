"""Execution spec changes as control requests: the cluster's side of suspend, resume,
cancel, redrive and skipCompensation.

The control fields of an Execution's spec say what a person wants; the engine takes
requests (`sagaflow.runtime.control`). `plan_change` compares the spec kopf handled
last with the new one and says which requests to make, which changes are invalid
(a lowered or negative `redrive`, a `skipCompensation` name that is no step of the
run) and which cannot take effect (input, workflowRef, a cancel set back to false).
`plan_start` does the same for the spec an Execution is created with: `suspend` is
passed to the start itself and `redrive` is the baseline, nothing to redrive.

kopf hands over the spec handled last, lowered values included, so the highest
`redrive` handled is kept in an annotation (`REDRIVE_SEEN`): lowering it and then
putting the old value back asks for nothing, as the error message promises.

`carry_out` makes the requests, each under an id made of the object's uid, the field
and the generation: kopf may run a handler again, and the same id makes the repeat
a no-op. Within one change the order is skips first (neither a redrive nor a cancel
made with them undoes a step just listed), then a redrive, a resume, a cancel, and a
suspend last (a cancel made together with a suspend is held, as the spec says).

A refused request is reported once, by the engine: its `RequestRefused` history row
becomes a Warning Event and the `Request` condition says why. What this module finds
wrong the handlers report: a Warning Event each, and the `SpecAccepted` condition,
which only the handlers write (the status mirror keeps it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import kopf
from pydantic import ValidationError

from sagaflow.core.facts import Cancel, Control, Redrive, Resume, SkipCompensation, Suspend
from sagaflow.core.manifests import ExecutionSpec
from sagaflow.core.state import ExecutionState
from sagaflow.core.status import condition
from sagaflow.kube.api import execution_id_of
from sagaflow.runtime.orchestrator import Orchestrator

SPEC_CONDITION = "SpecAccepted"
REDRIVE_SEEN = "sagaflow.io/redrive-seen"
CANCEL_REASON = "spec.cancel set"
# Fields a started run cannot take on: it keeps the input and workflow it began with.
_FIXED = {"input": "spec.input", "workflowRef": "spec.workflowRef"}


@dataclass(frozen=True, slots=True)
class Ask:
    """One request to make: the spec field that asks for it, and the fact."""

    field: str
    fact: Control


@dataclass(frozen=True, slots=True)
class Plan:
    """What a spec (change) asks for; the problems (each names its field); the
    changes that are ignored."""

    asks: tuple[Ask, ...] = ()
    problems: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    redrive_seen: int = 0  # the highest spec.redrive handled, this one included


def parse_spec(raw: Mapping[str, Any] | None) -> ExecutionSpec | list[str]:
    """The spec as the model reads it, or every problem with its field path."""
    try:
        return ExecutionSpec.model_validate(dict(raw or {}), by_alias=True, by_name=False)
    except ValidationError as exc:
        return [
            f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        ]


@dataclass(frozen=True, slots=True)
class _Was:
    """The control fields of the spec handled last, read leniently: it may have been
    invalid itself (then it was reported, and counts as the defaults)."""

    suspend: bool
    cancel: bool
    redrive: int
    skip: frozenset[str]

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> _Was:
        redrive = raw.get("redrive")
        if not isinstance(redrive, int) or isinstance(redrive, bool) or redrive < 0:
            redrive = 0
        listed = raw.get("skipCompensation")
        listed = listed if isinstance(listed, list) else []
        return cls(
            suspend=raw.get("suspend") is True,
            cancel=raw.get("cancel") is True,
            redrive=redrive,
            skip=frozenset(n for n in listed if isinstance(n, str)),
        )


def plan_start(spec: ExecutionSpec, state: ExecutionState) -> Plan:
    """The requests an Execution is created with, once its run has started."""
    asks, problems = _skips(spec.skip_compensation, frozenset(), state)
    if spec.cancel:
        asks.append(Ask("spec.cancel", Cancel(CANCEL_REASON)))
    return Plan(tuple(asks), tuple(problems), redrive_seen=spec.redrive)


def plan_change(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    spec: ExecutionSpec | list[str],
    state: ExecutionState,
    redrive_seen: int = 0,
) -> Plan:
    """The requests, problems and ignored changes of a spec going from `old` to `new`
    (`spec` is `new` parsed, or its problems: an invalid spec asks for nothing);
    `redrive_seen` is the highest spec.redrive handled before."""
    was = _Was.of(old)
    seen = max(was.redrive, redrive_seen)
    if isinstance(spec, list):
        return Plan(problems=tuple(spec), redrive_seen=seen)
    asks, problems = _skips(spec.skip_compensation, was.skip, state)
    ignored = []
    if spec.redrive > seen:
        asks.append(Ask("spec.redrive", Redrive(spec.redrive, spec.redrive_to_latest)))
    elif spec.redrive < seen and spec.redrive != was.redrive:
        problems.append(
            f"spec.redrive: must not decrease (was {seen}, now {spec.redrive}); "
            f"nothing was redriven: set it back to {seen}, or above to ask for a redrive"
        )
    if was.suspend and not spec.suspend:
        asks.append(Ask("spec.suspend", Resume()))
    if spec.cancel and not was.cancel:
        asks.append(Ask("spec.cancel", Cancel(CANCEL_REASON)))
    elif was.cancel and not spec.cancel:
        ignored.append(
            "spec.cancel: a cancel cannot be undone; setting it to false changes nothing"
        )
    if spec.suspend and not was.suspend:
        asks.append(Ask("spec.suspend", Suspend()))
    fixed = [path for key, path in _FIXED.items() if (old.get(key) or {}) != (new.get(key) or {})]
    if fixed:
        ignored.append(
            f"{', '.join(fixed)}: changes after the start are ignored: "
            "the run keeps its input and workflow"
        )
    return Plan(tuple(asks), tuple(problems), tuple(ignored), max(seen, spec.redrive))


def _skips(
    listed: tuple[str, ...], before: frozenset[str], state: ExecutionState
) -> tuple[list[Ask], list[str]]:
    """A SkipCompensation of every known name listed, if the list gained any; a problem
    for each name gained that is no step of the run (the engine would refuse them all)."""
    if not set(listed) - before:
        return [], []
    steps = state.steps
    problems = [
        f"spec.skipCompensation[{i}]: {name!r} is not a step of this execution "
        f"(workflow {state.workflow} v{state.version} has {', '.join(steps)})"
        for i, name in enumerate(listed)
        if name not in steps and name not in before
    ]
    known = tuple(dict.fromkeys(n for n in listed if n in steps))
    asks = [Ask("spec.skipCompensation", SkipCompensation(known))] if known else []
    return asks, problems


def redrive_seen(meta: Mapping[str, Any]) -> int:
    """The highest spec.redrive handled for this object, from its annotation (0 if none)."""
    value = (meta.get("annotations") or {}).get(REDRIVE_SEEN, "")
    return int(value) if value.isdigit() else 0


def request_id(uid: str, field: str, generation: Any) -> str:
    """The id of the request a spec change makes: the same for a repeat of the change."""
    return f"{uid}/{field}/{generation}"


async def carry_out(
    orchestrator: Orchestrator,
    meta: Mapping[str, Any],
    asks: tuple[Ask, ...],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """Make the requests in order. A refusal is the engine's to report (history, Event,
    the `Request` condition); here it is logged only."""
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    for ask in asks:
        outcome = await orchestrator.control(
            namespace,
            name,
            ask.fact,
            request_id(uid, ask.field, meta.get("generation")),
            execution_id=execution_id_of(meta),
        )
        if outcome is None:
            logger.warning(f"{ask.field}: no run of this object to ask")
            return
        said = f": {outcome.message}" if outcome.message else ""
        level = logging.WARNING if outcome.result == "refused" else logging.INFO
        logger.log(level, f"{ask.field}: {type(ask.fact).__name__} {outcome.result}{said}")


def spec_condition(
    problems: tuple[str, ...], generation: Any, at: datetime
) -> Callable[[kopf.RawBody], None]:
    """A kopf patch function setting `SpecAccepted` on the object as it is when written.

    False naming the problems, or True once a later change has none (only if the
    condition is there: a spec never found wrong does not carry it). A function, not a
    merge patch of the list, so the conditions the mirror wrote meanwhile are kept:
    kopf applies it to the current object under its resourceVersion.
    """
    if problems:
        message = f"generation {generation}: {'; '.join(problems)}"
        new = condition(SPEC_CONDITION, "False", "InvalidSpec", message, at)
    else:
        new = condition(SPEC_CONDITION, "True", "Accepted", f"generation {generation}", at)

    def apply(body: kopf.RawBody) -> None:
        status = body.get("status") or {}
        conditions = list(status.get("conditions") or ())
        for i, old in enumerate(conditions):
            if isinstance(old, dict) and old.get("type") == SPEC_CONDITION:
                if old.get("status") == new["status"]:
                    conditions[i] = {**new, "lastTransitionTime": old.get("lastTransitionTime")}
                else:
                    conditions[i] = new
                break
        else:
            if not problems:
                return
            conditions.append(new)
        body["status"] = {**status, "conditions": conditions}

    return apply
