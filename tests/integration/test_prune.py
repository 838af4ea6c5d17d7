"""`sagaflow prune`: old finished executions go with their rows and payloads; running
and recently finished ones stay.

The executions are made by the real orchestrator on a fake clock set ten days back
(and then moved to now), so "finished long ago" needs no waiting. Prune itself runs
as the CLI subprocess against the same database and payload folder.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from pg import FakeClock

from sagaflow.adapters.payloads.local import LocalPayloadStore
from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import EVENTS_QUEUE, StepResult, commands_queue, decode_command
from sagaflow.core.ports import OutgoingMessage
from sagaflow.local.prune import run_prune
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.settings import Settings

pytestmark = pytest.mark.timeout(120)

SPEC = WorkflowSpec.model_validate(
    {"steps": [{"name": "a", "type": "svc.a", "timeout": "1h", "input": {"n": 1}}]}
)
TABLES = (
    "sagaflow_executions",
    "sagaflow_history",
    "sagaflow_step_attempts",
    "sagaflow_inbox",
    "sagaflow_timers",
)


class World:
    def __init__(self, pool: asyncpg.Pool, clock: FakeClock, payloads: Path) -> None:
        self.pool, self.clock = pool, clock
        self.bus = PostgresBus(pool, clock=clock)
        self.orchestrator = Orchestrator(PostgresStore(pool), self.bus, clock=clock)
        self.payloads = LocalPayloadStore(payloads)

    async def start(self, name: str) -> str:
        state, _ = await self.orchestrator.start("default", name, "w", {})
        await self.payloads.put(f"{state.execution_id}/a/1/input", b"{}")
        return state.execution_id

    async def complete(self, execution_id: str) -> None:
        """Answer the execution's command, as a runner would, and apply the result."""
        for msg in await self.bus.receive(commands_queue("svc.a"), max_wait=0):
            cmd = decode_command(msg.body)
            if cmd.execution_id != execution_id:
                await self.bus.abandon([msg])
                continue
            await self.payloads.put(f"{cmd.attempt_id}/output", b'{"big":true}')
            result = StepResult("StepCompleted", cmd.execution_id, cmd.step, cmd.attempt, {})
            body = result.encode()
            event = OutgoingMessage(EVENTS_QUEUE, result.message_id, cmd.execution_id, body)
            await self.bus.reply([msg], [event])
        while await self.orchestrator.consume_once(max_wait=0):
            pass

    async def rows(self, execution_id: str) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            return {
                t: await conn.fetchval(
                    f"SELECT count(*) FROM {t} WHERE execution_id = $1", execution_id
                )
                for t in TABLES
            }

    def payload_files(self, execution_id: str) -> list[str]:
        folder = self.payloads.directory / execution_id
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
async def world(pg_pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[World]:
    clock = FakeClock(datetime.now(UTC) - timedelta(days=10))
    w = World(pg_pool, clock, tmp_path / "payloads")
    await w.orchestrator.apply_workflow("default", "w", SPEC)
    yield w
    await w.bus.close()


async def prune_cli(dsn: str, payloads: Path, older_than: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env.update(SAGAFLOW_DATABASE_URL=dsn, SAGAFLOW_PAYLOAD_DIR=str(payloads))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaflow.cli",
        "prune",
        "--older-than",
        older_than,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_prune_removes_old_finished_executions_and_keeps_the_rest(
    world: World, pg_database: str
) -> None:
    old = await world.start("old")  # completes ten days ago
    await world.complete(old)
    cancelled = await world.start("cancelled")  # cancelled ten days ago
    await world.orchestrator.cancel("default", "cancelled", "no longer needed")
    running = await world.start("running")  # started ten days ago, still running
    world.clock.now = datetime.now(UTC)
    recent = await world.start("recent")  # finished just now
    await world.complete(recent)
    async with world.pool.acquire() as conn:  # a timer left behind by a late writer
        await conn.execute(
            "INSERT INTO sagaflow_timers VALUES ($1, 'stray', 'retry', 'a', 2, $2)",
            old,
            world.clock.now,
        )
    async with world.pool.acquire() as conn:
        phases = dict(await conn.fetch("SELECT name, phase FROM sagaflow_executions"))
    assert phases == {
        "old": "Completed",
        "cancelled": "Cancelled",
        "running": "Running",
        "recent": "Completed",
    }
    before = {eid: await world.rows(eid) for eid in (old, cancelled, running, recent)}
    assert all(before[old].values())  # every kind of row exists for the old one
    assert before[running]["sagaflow_timers"] == 1  # its step timeout
    assert world.payload_files(old) == ["a/1/input", "a/1/output"]

    code, out, err = await prune_cli(pg_database, world.payloads.directory, "1d")
    assert code == 0, err
    assert out.startswith("pruned 2 executions finished before ")
    assert out.rstrip().endswith(", 3 payloads")  # old: input and output; cancelled: input

    for eid in (old, cancelled):
        assert set((await world.rows(eid)).values()) == {0}
        assert not (world.payloads.directory / eid).exists()
    for eid in (running, recent):
        assert await world.rows(eid) == before[eid]
        assert world.payload_files(eid)

    code, out, _ = await prune_cli(pg_database, world.payloads.directory, "1d")
    assert code == 0 and out.startswith("pruned 0 executions")


async def test_prune_refuses_a_bad_duration_and_skips_a_state_dir_without_state(
    tmp_path: Path,
) -> None:
    err, out = io.StringIO(), io.StringIO()
    settings = Settings(database_url=None, payloads="local")
    assert await run_prune("soon", tmp_path, settings, out=out, err=err) == 2
    assert "--older-than soon: invalid duration" in err.getvalue()
    assert await run_prune("7d", tmp_path / "none", settings, out=out, err=err) == 0
    assert "nothing to prune" in out.getvalue()
    assert not (tmp_path / "none").exists()  # no embedded database was created for it
