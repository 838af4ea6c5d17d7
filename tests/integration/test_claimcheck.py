"""The claim check: thresholds, resolving references, and its wiring into the runner
worker and the orchestrator (over the real Postgres bus, with the local file store).

Thresholds are tested below, at and above the limit, in bytes of compact UTF-8 JSON.
The wiring tests run one command through a real `RunnerWorker` and read its result
event, and one dispatch through a real `Orchestrator` and read its command.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sagaflow.adapters.payloads import PayloadStoreError
from sagaflow.adapters.payloads.local import LocalPayloadStore
from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import (
    EVENTS_QUEUE,
    ExecuteStep,
    StepResult,
    commands_queue,
    decode_command,
    decode_result,
)
from sagaflow.core.payload_refs import ref_of
from sagaflow.core.ports import (
    OutgoingMessage,
    PayloadIntegrityError,
    PayloadMissingError,
    PayloadRef,
)
from sagaflow.runtime.claimcheck import MAX_DEPTH, ClaimCheck, encode
from sagaflow.runtime.handlers import MAX_ERROR_MESSAGE
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.worker import RunnerWorker
from sagaflow_runner import PermanentError, Registry, StepContext

pytestmark = pytest.mark.timeout(60)

LIMIT = 100  # bytes


class CountingStore(LocalPayloadStore):
    """The local store, counting reads and able to pretend it is down."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gets = 0
        self.down = False

    async def get(self, ref: PayloadRef) -> bytes:
        self.gets += 1
        if self.down:
            raise PayloadStoreError(f"reading payload {ref.uri} failed: the store is down")
        return await super().get(ref)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "payloads")


@pytest.fixture
def cc(store: CountingStore) -> ClaimCheck:
    return ClaimCheck(store, LIMIT)


def sized(total: int, char: str = "x") -> dict[str, Any]:
    """A value whose compact JSON is `total` bytes (`{"s":"..."}` is 8 + the string)."""
    value = {"s": char * ((total - 8) // len(char.encode()))}
    assert len(encode(value)) == total
    return value


def damage(path: Path, how: str) -> None:
    """Change a stored file behind the store's back (same size) or remove it."""
    if how == "delete":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(b"[" + data[1:])


def read_file(uri: str) -> bytes:
    return Path(uri.removeprefix("file://")).read_bytes()


# ---------------------------------------------------------------- offload


@pytest.mark.parametrize(("size", "offloaded"), [(99, False), (100, False), (101, True)])
async def test_offload_keeps_values_up_to_the_threshold_inline(
    cc: ClaimCheck, size: int, offloaded: bool
) -> None:
    value = sized(size)
    result = await cc.offload(value, "e/s/1/output")
    assert cc.is_ref(result) is offloaded
    if offloaded:
        assert ref_of(result).size == size
        assert await cc.resolve(result) == value
    else:
        assert result is value


@pytest.mark.parametrize(("size", "offloaded"), [(100, False), (102, True)])
async def test_the_threshold_counts_utf8_bytes_not_characters(
    cc: ClaimCheck, size: int, offloaded: bool
) -> None:
    assert cc.is_ref(await cc.offload(sized(size, "é"), "e/s/1/output")) is offloaded


async def test_offload_refuses_values_that_are_not_json(cc: ClaimCheck) -> None:
    with pytest.raises(TypeError):
        await cc.offload({"when": object()}, "e/s/1/output")


async def test_store_always_stores_even_a_small_value(cc: ClaimCheck) -> None:
    marker = await cc.store_always({"message": "short"}, "e/s/1/error")
    assert await cc.resolve(marker) == {"message": "short"}


# ---------------------------------------------------------------- resolve


async def test_resolve_leaves_values_without_references_untouched(cc: ClaimCheck) -> None:
    value = {"a": [1, {"b": None}], "c": "text"}
    assert await cc.resolve(value) is value


async def test_resolve_replaces_references_at_any_depth_fetching_each_once(
    cc: ClaimCheck, store: CountingStore
) -> None:
    big = sized(500)
    marker = await cc.offload(big, "e/a/1/output")
    other = await cc.offload(sized(300), "e/b/1/output")
    value = {"whole": marker, "list": [marker, {"deep": other}], "n": 1}
    assert await cc.resolve(value) == {
        "whole": big,
        "list": [big, {"deep": sized(300)}],
        "n": 1,
    }
    assert store.gets == 2


async def test_resolve_follows_references_inside_stored_payloads(cc: ClaimCheck) -> None:
    inner = await cc.offload(sized(500), "e/a/1/output")
    outer = await cc.offload({"data": inner, "pad": "y" * 200}, "e/b/1/input")
    assert await cc.resolve(outer) == {"data": sized(500), "pad": "y" * 200}


async def test_resolve_gives_up_on_endless_nesting(cc: ClaimCheck) -> None:
    value: dict[str, Any] = sized(200)
    for level in range(MAX_DEPTH + 1):
        value = await cc.store_always({"next": value}, f"e/chain/{level}/output")
    with pytest.raises(PayloadIntegrityError, match="nest deeper"):
        await cc.resolve(value)


async def test_resolve_raises_the_typed_errors(cc: ClaimCheck, store: CountingStore) -> None:
    marker = await cc.offload(sized(500), "e/a/1/output")
    damage(store.directory / "e/a/1/output", "tamper")
    with pytest.raises(PayloadIntegrityError):
        await cc.resolve({"in": marker})
    damage(store.directory / "e/a/1/output", "delete")
    with pytest.raises(PayloadMissingError):
        await cc.resolve({"in": marker})


async def test_a_stored_payload_that_is_not_json_is_an_integrity_error(
    cc: ClaimCheck, store: CountingStore
) -> None:
    ref = await store.put("e/a/1/output", b"\xff not json")
    with pytest.raises(PayloadIntegrityError, match="not JSON"):
        await cc.resolve({"$sagaflowRef": ref.to_json()})


# ---------------------------------------------------------------- the runner worker


async def run_command(
    pool: asyncpg.Pool, cc: ClaimCheck, handler: Any, input: dict[str, Any]
) -> StepResult:
    """Send one command, let a worker with the claim check run it, return its result."""
    registry = Registry()
    registry.register("bulk.work", handler)
    cmd = ExecuteStep("e1", "default/run-1", "work", 1, "bulk.work", input, None, None)
    bus = PostgresBus(pool)
    await bus.send(
        [OutgoingMessage(commands_queue(cmd.type), cmd.attempt_id, "e1/work", cmd.encode())]
    )
    stop = asyncio.Event()
    worker = asyncio.create_task(RunnerWorker(bus, registry, claim_check=cc).run(stop))
    try:
        events = await bus.receive(EVENTS_QUEUE, max_wait=30)
        assert len(events) == 1
        return decode_result(events[0].body)
    finally:
        stop.set()
        await worker
        await bus.close()


async def test_the_worker_resolves_the_input_and_offloads_the_output(
    pg_pool: asyncpg.Pool, cc: ClaimCheck
) -> None:
    seen: list[dict[str, Any]] = []

    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        seen.append(input)
        return {"echo": input["data"]["s"] * 2}

    data = await cc.offload(sized(500), "e0/make/1/output")
    result = await run_command(pg_pool, cc, work, {"data": data})
    assert seen == [{"data": sized(500)}]
    assert result.kind == "StepCompleted" and result.output is not None
    assert ref_of(result.output).uri.endswith("/e1/work/1/output")
    assert await cc.resolve(result.output) == {"echo": "x" * 984}


async def test_a_small_output_stays_inline(pg_pool: asyncpg.Pool, cc: ClaimCheck) -> None:
    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    result = await run_command(pg_pool, cc, work, {})
    assert result.output == {"ok": True}


@pytest.mark.parametrize(
    ("problem", "error_type", "retryable"),
    [
        ("delete", "PayloadMissing", False),
        ("tamper", "PayloadIntegrity", False),
        ("store down", "PayloadUnavailable", True),
    ],
)
async def test_an_unusable_input_fails_the_step_without_running_it(
    pg_pool: asyncpg.Pool,
    cc: ClaimCheck,
    store: CountingStore,
    problem: str,
    error_type: str,
    retryable: bool,
) -> None:
    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        raise AssertionError("the handler must not run")

    data = await cc.offload(sized(500), "e0/make/1/output")
    if problem == "store down":
        store.down = True
    else:
        damage(store.directory / "e0/make/1/output", problem)
    result = await run_command(pg_pool, cc, work, {"data": data})
    assert (result.kind, result.error_type, result.retryable) == (
        "StepFailed",
        error_type,
        retryable,
    )
    assert ref_of(data).uri in (result.error_message or "")


@pytest.mark.parametrize(
    ("error", "error_type", "retryable"),
    [
        (PermanentError("E" * 5000, type="OutOfStock"), "OutOfStock", False),
        (ValueError("E" * 5000), "ValueError", True),
    ],
)
async def test_a_long_error_message_is_kept_whole_by_reference(
    pg_pool: asyncpg.Pool,
    cc: ClaimCheck,
    error: Exception,
    error_type: str,
    retryable: bool,
) -> None:
    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        raise error

    result = await run_command(pg_pool, cc, work, {})
    assert (result.kind, result.error_type, result.retryable) == (
        "StepFailed",
        error_type,
        retryable,
    )
    message = result.error_message or ""
    assert len(message) <= MAX_ERROR_MESSAGE and message.startswith("EEEE")
    uri = message.rsplit(": ", 1)[1].rstrip("]")
    assert uri.endswith("/e1/work/1/error")
    stored = json.loads(read_file(uri))
    assert stored == {"message": "E" * 5000}


# ---------------------------------------------------------------- the orchestrator

SPEC = WorkflowSpec.model_validate(
    {"steps": [{"name": "work", "type": "bulk.work", "input": {"all": "${{ input }}"}}]}
)


@pytest.fixture
async def orchestrator(pg_pool: asyncpg.Pool, cc: ClaimCheck) -> AsyncIterator[Orchestrator]:
    bus = PostgresBus(pg_pool)
    orchestrator = Orchestrator(PostgresStore(pg_pool), bus, claim_check=cc)
    await orchestrator.apply_workflow("default", "bulk", SPEC)
    yield orchestrator
    await bus.close()


@pytest.mark.parametrize("size", [50, 5000])
async def test_the_orchestrator_offloads_a_large_rendered_input(
    orchestrator: Orchestrator, cc: ClaimCheck, size: int
) -> None:
    execution_input = {"blob": "z" * size}
    state, _ = await orchestrator.start("default", "run-1", "bulk", execution_input)
    got = await orchestrator.bus.receive(commands_queue("bulk.work"), max_wait=0)
    command = decode_command(got[0].body)
    if size < LIMIT:
        assert command.input == {"all": execution_input}
    else:
        assert ref_of(command.input).uri.endswith(f"/{state.execution_id}/work/1/input")
        assert await cc.resolve(command.input) == {"all": execution_input}


async def test_an_output_that_arrives_by_reference_is_kept_as_one(
    orchestrator: Orchestrator, cc: ClaimCheck
) -> None:
    state, _ = await orchestrator.start("default", "run-1", "bulk", {})
    marker = await cc.offload(sized(5000), f"{state.execution_id}/work/1/output")
    result = StepResult("StepCompleted", state.execution_id, "work", 1, output=marker)
    await orchestrator.bus.send(
        [OutgoingMessage(EVENTS_QUEUE, result.message_id, result.execution_id, result.encode())]
    )
    assert await orchestrator.consume_once(max_wait=5) == 1
    async with orchestrator.pool.acquire() as conn:
        stored = await orchestrator.store.get_execution(conn, "default", "run-1")
        size = await conn.fetchval("SELECT octet_length(state::text) FROM sagaflow_executions")
    assert stored is not None and stored.steps["work"].output == marker
    assert size < 2000  # the 5000-byte output is not in the row
