"""Kubernetes Events from an execution's history: what a person debugging wants to see.

Every applied transition is a history row in Postgres; each becomes one core/v1
Event on the Execution object (`kubectl describe` lists them). Ignored messages
stay in the history only: they are noise to a person and evidence to a debugger.

An Event's name is derived from the execution and the history row, so posting it
again after a crash is answered "already exists" and the Event appears once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sagaflow.adapters.postgres.mirror_rows import HistoryRow
from sagaflow.core.manifests import API_VERSION
from sagaflow.core.status import clip

COMPONENT = "sagaflow-operator"
# History kinds that are not Events.
# A forEach step's items go in history one line each, but a Kubernetes Event each
# would flood the namespace: only their failures become Events.
# A Transition row is the replay record of the lines after it (`core/replay.py`).
QUIET = frozenset(
    {
        "MessageIgnored",
        "Transition",
        "ItemDispatched",
        "ItemSucceeded",
        "ItemCompensating",
        "ItemCompensated",
    }
)
# Kinds that mean something went wrong or needs a person (type Warning); the rest,
# the saga's ordinary course (compensations going as designed, suspend, resume,
# redrive), are Normal. A run that ended undone did not succeed: a Warning, as a
# failed or cancelled one. A refused request is posted from its history row only:
# the handler that made the request does not post it again.
WARNINGS = frozenset(
    {
        "StepFailed",
        "StepRetrying",
        "ItemFailed",
        "ItemRetrying",
        "ItemTimedOut",
        "ItemCompensationRetrying",
        "ItemCompensationFailed",
        "SignalRefused",
        "FinallyFailed",
        "StepTimedOut",
        "StepInDoubt",
        "StepCompensationRetrying",
        "StepCompensationTimedOut",
        "StepCompensationFailed",
        "ExecutionFailed",
        "ExecutionTimedOut",
        "ExecutionCancelled",
        "ExecutionCompensated",
        "ExecutionCompensationFailed",
        "RequestRefused",
    }
)
_MAX_NAME_PREFIX = 200  # object names run to 253 characters; the suffix needs room


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def event_name(name: str, execution_id: str, seq: int) -> str:
    return f"{name[:_MAX_NAME_PREFIX]}.{execution_id[:8]}.{seq}"


def event_for(
    row: HistoryRow,
    *,
    namespace: str,
    name: str,
    execution_id: str,
    instance: str,
) -> dict[str, Any] | None:
    """The Event for one history row of an execution, or None if the row is not one."""
    if row.kind in QUIET:
        return None
    at = _ts(row.at)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(name, execution_id, row.seq), "namespace": namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": "Execution",
            "name": name,
            "namespace": namespace,
            "uid": execution_id,
        },
        "reason": row.kind,
        "message": clip(row.message),
        "type": "Warning" if row.kind in WARNINGS else "Normal",
        "count": 1,
        "firstTimestamp": at,
        "lastTimestamp": at,
        "source": {"component": COMPONENT},
        "reportingComponent": f"sagaflow.io/{COMPONENT}",
        "reportingInstance": instance,
    }
