"""`sagaflow runner`: a step runner process serving the handlers of the given modules.

It attaches to the same database as the orchestrator (SAGAFLOW_DATABASE_URL, or
the embedded Postgres of a state dir) because the embedded bus lives there; then it
also checks each command against the state before running it, and rides out
database restarts and outages (one log line each). It stops cleanly on SIGINT /
SIGTERM and exits 0: running handlers get `SAGAFLOW_GRACE_PERIOD_SECONDS`, a second
signal cancels them at once; what was not finished is handed back for redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from sagaflow.local.drive import Interrupts, hurry_on
from sagaflow.local.inputs import InvalidInputError
from sagaflow.local.run import EXIT_INVALID, load_runners
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow.runtime.orchestrator import database_watch
from sagaflow.runtime.worker import RunnerWorker
from sagaflow.settings import Settings
from sagaflow.telemetry.metrics import MetricsServer
from sagaflow.wiring.buses import make_bus
from sagaflow.wiring.checks import attempt_check
from sagaflow.wiring.database import GaveUpWaiting, open_database
from sagaflow.wiring.payloads import make_claim_check
from sagaflow_runner import Registry


async def run_runner(modules: Sequence[str], state_dir: Path, settings: Settings) -> int:
    try:
        registry = load_runners(modules)
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID
    if not len(registry):
        print(
            f"error: --module {', '.join(modules)}: no @step handlers registered", file=sys.stderr
        )
        return EXIT_INVALID
    try:
        claim_check = make_claim_check(settings, state_dir)
    except InvalidInputError as exc:
        print(f"error: {exc.problems[0]}", file=sys.stderr)
        return EXIT_INVALID
    try:
        await _serve(registry, state_dir, settings, claim_check)
    finally:
        await claim_check.close()
    return 0


async def _serve(
    registry: Registry, state_dir: Path, settings: Settings, claim_check: ClaimCheck
) -> None:
    interrupts = Interrupts(sys.stderr, settings.grace_period_seconds)
    interrupts.install()
    try:
        async with contextlib.AsyncExitStack() as stack:
            pool = None
            if settings.bus == "postgres":  # the embedded bus lives in the state database
                opened = open_database(settings, state_dir, give_up=interrupts.stop)
                try:
                    pool = (await stack.enter_async_context(opened)).pool
                except GaveUpWaiting:
                    return  # stopped before the database ever answered: nothing to hand back
            if settings.metrics_port:
                served = MetricsServer(settings.metrics_port, settings.metrics_host)
                stack.callback(served.close)
            bus = make_bus(settings, pool)
            stack.push_async_callback(bus.close)
            outages = check = None
            if pool is not None:
                outages = database_watch(pool)
                stack.push_async_callback(outages.close)
                check = attempt_check(pool)
            worker = RunnerWorker(
                bus,
                registry,
                concurrency=settings.runner_concurrency,
                claim_check=claim_check,
                check_attempts=check,
                outages=outages,
                grace_period=settings.grace_period_seconds,
                loop_block_seconds=settings.loop_block_seconds,
                suspect_alone_seconds=settings.suspect_alone_seconds,
            )
            hurry = asyncio.create_task(hurry_on(interrupts, worker))
            try:
                await worker.run(interrupts.stop)
            finally:
                hurry.cancel()
    finally:
        interrupts.uninstall()
