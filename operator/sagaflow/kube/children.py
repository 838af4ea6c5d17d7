"""Execution objects for child executions, so `kubectl get executions` shows them.

A child execution (a `workflowRef` step's attempt) starts in Postgres, in its
parent's transaction. When the parent has an object, this pass creates one for the
child: same namespace, the child's name, `spec.workflowRef` and `spec.input` as it
started, labels naming the parent and the workflow, and an owner reference to the
parent's object, so deleting the parent deletes its children and `kubectl tree`
style tools show the family. The annotation `sagaflow.io/execution-id` names the
execution the object shows (its uid cannot be the execution id, as for objects
people create): the create handler then only tracks it, and every handler and the
mirror key it by the annotation (`api.execution_id_of`).
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from sagaflow.adapters.postgres import mirror_rows
from sagaflow.core.manifests import API_VERSION
from sagaflow.kube.api import EXECUTION_ID, EXECUTIONS, KubeApi

log = logging.getLogger("sagaflow.mirror")

PARENT_LABEL = "sagaflow.io/parent"
WORKFLOW_LABEL = "sagaflow.io/workflow"


def child_object(child: mirror_rows.Child, parent_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Execution",
        "metadata": {
            "name": child.name,
            "namespace": child.namespace,
            "labels": {PARENT_LABEL: child.parent_name[:63], WORKFLOW_LABEL: child.workflow},
            "annotations": {EXECUTION_ID: child.execution_id},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "Execution",
                    "name": child.parent_name,
                    "uid": parent_uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {"workflowRef": {"name": child.workflow}, "input": child.input},
    }


async def materialize_once(pool: asyncpg.Pool, api: KubeApi, batch_size: int) -> int:
    """Create the objects of up to `batch_size` children; how many were handled."""
    async with pool.acquire() as conn:
        children = await mirror_rows.unmaterialized_children(conn, batch_size)
    for child in children:
        parent = await api.get(EXECUTIONS, child.namespace, child.parent_name)
        if parent is None:
            continue  # the parent's object is being deleted: its children go with it
        await api.create(
            EXECUTIONS, child.namespace, child_object(child, parent["metadata"]["uid"])
        )
        async with pool.acquire() as conn, conn.transaction():
            # Mirrored like any object-backed run; owned by the parent, so no TTL of its own.
            await mirror_rows.track(conn, child.execution_id, child.namespace, child.name, None)
            await mirror_rows.materialized(conn, child.execution_id)
        log.info(
            "created Execution %s/%s for a child of %s",
            child.namespace,
            child.name,
            child.parent_name,
        )
    return len(children)
