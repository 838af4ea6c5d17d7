"""Read-only queries the API and the CLI list with: pages of executions, workflows.

Pages are keyset-paginated on (created_at, execution_id): a page costs the same
however deep it is, and runs started while someone pages never shift the pages
already read. The continue token is that position, opaque to callers.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import asyncpg

from sagaflow.core.state import ExecutionState


class BadContinueTokenError(ValueError):
    pass


def encode_position(created_at: datetime, execution_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), execution_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_position(token: str) -> tuple[datetime, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        at, execution_id = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(at), str(execution_id)
    except (ValueError, TypeError) as exc:
        raise BadContinueTokenError("not a continue token this server gave out") from exc


async def execution_page(
    conn: asyncpg.Connection,
    namespace: str,
    *,
    workflow: str | None,
    phase: str | None,
    limit: int,
    after: tuple[datetime, str] | None,
) -> tuple[list[ExecutionState], str | None]:
    """Up to `limit` executions, oldest first, and the token of the next page (or None)."""
    after_at, after_id = after if after is not None else (None, "")
    rows = await conn.fetch(
        "SELECT state, created_at, execution_id FROM sagaflow_executions "
        "WHERE namespace = $1 AND released_at IS NULL "
        "AND ($2::text IS NULL OR workflow = $2) AND ($3::text IS NULL OR phase = $3) "
        "AND ($4::timestamptz IS NULL OR (created_at, execution_id) > ($4, $5)) "
        "ORDER BY created_at, execution_id LIMIT $6",
        namespace,
        workflow,
        phase,
        after_at,
        after_id,
        limit + 1,
    )
    states = [ExecutionState.from_json(json.loads(r["state"])) for r in rows[:limit]]
    if len(rows) <= limit:
        return states, None
    last = rows[limit - 1]
    return states, encode_position(last["created_at"], last["execution_id"])


async def workflow_version(
    conn: asyncpg.Connection, namespace: str, name: str, version: int
) -> dict[str, Any] | None:
    """One stored version of a workflow: its spec, and when it was stored."""
    row = await conn.fetchrow(
        "SELECT spec, created_at FROM sagaflow_workflow_versions "
        "WHERE namespace = $1 AND name = $2 AND version = $3",
        namespace,
        name,
        version,
    )
    if row is None:
        return None
    return {"spec": json.loads(row["spec"]), "createdAt": row["created_at"]}


async def workflows(conn: asyncpg.Connection, namespace: str) -> list[dict[str, Any]]:
    """Each current workflow of the namespace with its spec, version and run counts."""
    rows = await conn.fetch(
        "SELECT w.name, w.current_version, w.updated_at, v.spec, "
        "(SELECT coalesce(jsonb_object_agg(phase, n), '{}'::jsonb) FROM "
        "(SELECT phase, count(*) AS n FROM sagaflow_executions e "
        "WHERE e.namespace = w.namespace AND e.workflow = w.name GROUP BY phase) c) AS phases "
        "FROM sagaflow_workflows w JOIN sagaflow_workflow_versions v "
        "ON v.namespace = w.namespace AND v.name = w.name AND v.version = w.current_version "
        "WHERE w.namespace = $1 ORDER BY w.name",
        namespace,
    )
    return [
        {
            "name": r["name"],
            "version": r["current_version"],
            "updatedAt": r["updated_at"],
            "spec": json.loads(r["spec"]),
            "executions": json.loads(r["phases"]),
        }
        for r in rows
    ]
