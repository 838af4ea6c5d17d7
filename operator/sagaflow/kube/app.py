"""`sagaflow operator`: kopf handlers, the orchestrator loops, the status mirror, probes.

One process runs everything on one event loop:

- kopf watches Workflow and Execution objects and runs `sagaflow.kube.handlers`;
- the orchestrator consumes step results, fires timers and relays the outbox;
- the status mirror writes state, Events and TTL deletions back to the objects;
- the probe server answers the kubelet.

State lives in Postgres (SAGAFLOW_DATABASE_URL, required here: there is no
embedded database in a cluster), so a restarted or rescheduled operator resumes
everything: kopf's resume handlers re-find every object, the loops re-read the
database. Several replicas are safe: starts are keyed by object uid, transitions
by row locks, mirror rows by SKIP LOCKED; a kopf peering object
(SAGAFLOW_PEERING_NAME) additionally keeps handlers on one replica at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from pathlib import Path
from typing import Any

import kopf

from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.api.auth import TokensFileError
from sagaflow.api.contract import Started
from sagaflow.api.hosting import Hosted, Serving, host
from sagaflow.api.server import ServeError
from sagaflow.kube import leader
from sagaflow.kube.api import EXECUTIONS, ClientKubeApi, load_client_config
from sagaflow.kube.auth import ClientReviews, KubeAuthorizer, Reviews
from sagaflow.kube.handlers import HandlerContext, build_registry
from sagaflow.kube.health import HealthServer, loops_alive
from sagaflow.kube.launcher import KubeLauncher, LauncherApi
from sagaflow.kube.mirror import StatusMirror
from sagaflow.kube.secrets import KubeSecrets
from sagaflow.kube.sources import register_sources, report_event, sync_statuses
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.startpath import StartCall
from sagaflow.runtime.triggers import SecretResolver
from sagaflow.settings import Settings
from sagaflow.wiring.buses import make_bus
from sagaflow.wiring.database import open_database
from sagaflow.wiring.payloads import make_claim_check
from sagaflow.wiring.problems import InvalidInputError

# kopf's own bookkeeping goes to annotations under our group, not into `status`
# (whose schema is ours) and not under kopf's default names.
_PREFIX = "sagaflow.io"


def kopf_settings(settings: Settings) -> kopf.OperatorSettings:
    config = kopf.OperatorSettings()
    config.persistence.finalizer = f"{_PREFIX}/finalizer"
    config.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=_PREFIX)
    config.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=_PREFIX, key="last-handled-configuration"
    )
    # Our Events come from the history (see `sagaflow.kube.events`) and from the
    # handlers' explicit warnings (invalid specs); kopf's "handler succeeded" log
    # lines stay in the log (`posting.loggers` is off by default).
    config.posting.level = logging.WARNING
    # The resources are fixed and installed before the operator (Helm installs CRDs
    # first): no need to watch CRDs or list namespaces, nor the RBAC for it.
    config.scanning.disabled = True
    return config


def _priority(settings: Settings) -> int:
    if settings.peering_priority is not None:
        return settings.peering_priority
    # Not for security: distinct numbers so replicas can rank themselves.
    return random.randint(1, 2**31 - 1)  # noqa: S311


async def run_operator(
    settings: Settings,
    api: LauncherApi | None = None,
    *,
    reviews: Reviews | None = None,
    secrets: SecretResolver | None = None,
) -> int:
    if not settings.database_url:
        print(
            "error: SAGAFLOW_DATABASE_URL: the operator needs an external Postgres",
            file=sys.stderr,
        )
        return 2
    try:
        claim_check = make_claim_check(settings, Path(".sagaflow"))
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        async with open_database(settings, Path(".sagaflow"), pool_size=12) as db:
            bus = make_bus(settings, db.pool)
            try:
                orchestrator = Orchestrator(
                    PostgresStore(db.pool),
                    bus,
                    batch_size=settings.batch_size,
                    claim_check=claim_check,
                    gauge_interval=settings.metrics_interval,
                )
                kube = api or ClientKubeApi(load_client_config())
                mirror = StatusMirror(
                    db.pool,
                    kube,
                    poll_seconds=settings.mirror_poll_seconds,
                    outages=orchestrator.outages,
                )
                context = HandlerContext(orchestrator, db.pool, settings.workflow_wait_seconds)
                hosting = _hosting(orchestrator, kube, settings, reviews, secrets)
                try:
                    async with hosting as serving:
                        await _serve(settings, db.dsn, orchestrator, mirror, context, serving)
                except (ServeError, TokensFileError) as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
            finally:
                await bus.close()
                await orchestrator.outages.close()
    finally:
        await claim_check.close()
    return 0


def _hosting(
    orchestrator: Orchestrator,
    kube: LauncherApi,
    settings: Settings,
    reviews: Reviews | None,
    secrets: SecretResolver | None,
) -> contextlib.AbstractAsyncContextManager[Serving]:
    """The API, schedules and triggers, starting runs as Execution objects: the API's
    callers are authenticated by TokenReview and authorised by SubjectAccessReview."""
    launcher = KubeLauncher(kube)

    async def start(call: StartCall) -> Started:
        name, created = await launcher.start(call)
        found = await kube.get(EXECUTIONS, call.namespace, name)
        return Started(found or {"metadata": {"name": name, "namespace": call.namespace}}, created)

    if reviews is None or secrets is None:
        client = load_client_config()
        reviews = reviews or ClientReviews(client)
        secrets = secrets or KubeSecrets(client)
    return host(
        orchestrator,
        launcher,
        Hosted(),
        settings,
        authorizer=KubeAuthorizer(reviews),
        secrets=secrets,
        starter=start,
        report=lambda ns, name, kind, reason, message: report_event(
            kube, ns, name, kind, reason, message
        ),
    )


async def _serve(
    settings: Settings,
    dsn: str,
    orchestrator: Orchestrator,
    mirror: StatusMirror,
    context: HandlerContext,
    serving: Serving,
) -> None:
    stop = asyncio.Event()
    ready = asyncio.Event()
    priority = _priority(settings)
    fetch = None
    if settings.peering_name and isinstance(mirror.api, ClientKubeApi):
        where = settings.namespaces[0] if settings.namespaces else None
        client_api = mirror.api

        async def fetch() -> dict[str, Any] | None:
            return await client_api.get_peering(where, settings.peering_name)

    tasks = [
        asyncio.create_task(orchestrator.run(stop, dsn), name="orchestrator"),
        asyncio.create_task(
            leader.watch(fetch, priority, stop, interval=settings.metrics_interval),
            name="leader gauge",
        ),
        asyncio.create_task(mirror.run(stop, dsn), name="status mirror"),
        asyncio.create_task(sync_statuses(mirror.api, serving, stop), name="source statuses"),
    ]

    async def database_answers() -> str | None:
        if not ready.is_set():
            return "kopf is starting"
        async with context.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        return None

    health = HealthServer(
        settings.health_port, live=loops_alive(lambda: tasks), ready=database_answers
    )
    if settings.health_port:
        await health.start()
    registry = build_registry(context)
    register_sources(registry, serving)

    @kopf.on.cleanup(registry=registry)
    async def stop_loops(**_: Any) -> None:
        # kopf waits for every task started after it (our loops' inner tasks too)
        # before it returns: stop them here, so a shutdown takes no longer than that.
        # The bus has tasks of its own (a receiver's lease renewal); no handler runs
        # after cleanup, so it closes here too (closing it again later is a no-op).
        stop.set()
        await serving.stop()
        await asyncio.wait(tasks, timeout=10)
        await orchestrator.bus.close()

    namespaces = settings.namespaces
    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings(settings),
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=not settings.peering_name,
            peering_name=settings.peering_name or None,
            priority=priority,
            ready_flag=ready,
        )
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=10)
        await health.stop()
