"""The claim check field by field: an output over the threshold keeps its small fields
inline and stores its large values by reference one by one, largest first, at any
depth of nested objects, until the rest fits; else it is stored whole, as before.

The planning is tested pure (`plan_fields`, `field_key`); storing against the local
file store in `tmp_path`; the wiring through a real `RunnerWorker` (the runner's
output) and a real `Orchestrator` (step inputs rendered from such an output: a field
passed whole, a small field read, a projection that is itself large and travels by
reference again), over the real Postgres bus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sagaflow.adapters.payloads import MAX_KEY_LENGTH, PayloadStoreError, check_key
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
from sagaflow.core.payload_refs import is_ref, ref_of
from sagaflow.core.ports import OutgoingMessage, PayloadRef
from sagaflow.runtime.claimcheck import (
    MAX_FIELD_REFS,
    ClaimCheck,
    Field,
    encode,
    field_key,
    marker_size,
    plan_fields,
)
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.worker import RunnerWorker
from sagaflow_runner import Registry, StepContext

pytestmark = pytest.mark.timeout(60)

LIMIT = 4096  # bytes: room for a few markers (about 250 bytes each) beside small fields
KEY = "e1/make/1/output"
SHA = "5e3a" * 16


class CountingStore(LocalPayloadStore):
    """The local store, counting writes and able to refuse them."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.puts: list[str] = []
        self.down = False

    async def put(self, key: str, data: bytes) -> PayloadRef:
        self.puts.append(key)
        if self.down:
            raise PayloadStoreError(f"writing payload {key!r} failed: the store is down")
        return await super().put(key, data)

    def files(self) -> set[str]:
        return {
            p.relative_to(self.directory).as_posix()
            for p in self.directory.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        }


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "payloads")


@pytest.fixture
def cc(store: CountingStore) -> ClaimCheck:
    return ClaimCheck(store, LIMIT)


def text(size: int, char: str = "x") -> str:
    return char * size


def markers_in(value: Any, path: str = "") -> dict[str, PayloadRef]:
    """Field path -> reference, for every marker inside `value`."""
    if is_ref(value):
        return {path: ref_of(value)}
    found: dict[str, PayloadRef] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found |= markers_in(item, f"{path}.{key}" if path else key)
    return found


def read_json(uri: str) -> Any:
    return json.loads(Path(uri.removeprefix("file://")).read_bytes())


# ---------------------------------------------------------------- planning, pure


def test_only_what_must_go_goes_largest_first_and_the_rest_fits() -> None:
    value = {"a": text(6000), "b": text(3000), "c": text(500), "sha": SHA}
    plan = plan_fields(value, len(encode(value)), KEY, LIMIT)
    assert [f.path for f in plan] == [("a",)]  # without `a` the rest fits already
    value = {"small": text(900), "mid": text(3000), "big": text(3500), "sha": SHA}
    plan = plan_fields(value, len(encode(value)), KEY, LIMIT)
    assert [f.path for f in plan] == [("big",), ("mid",)]  # largest first, until it fits
    assert plan[0].key == f"{KEY}.big" and plan[0].data == encode(text(3500))


def test_nested_objects_are_opened_and_lists_and_strings_kept_whole() -> None:
    value = {"meta": {"blob": text(9000), "n": 3, "deep": {"rows": [text(50)] * 200}}}
    plan = plan_fields(value, len(encode(value)), KEY, LIMIT)
    assert {f.path: f.key for f in plan} == {
        ("meta", "deep", "rows"): f"{KEY}.meta.deep.rows",
        ("meta", "blob"): f"{KEY}.meta.blob",
    }


@pytest.mark.parametrize(
    "case",
    ["thousands of small fields", "every field large", "only references left", "too many"],
)
def test_a_value_that_cannot_be_split_is_planned_whole(case: str) -> None:
    value: dict[str, Any] = {
        "thousands of small fields": {f"k{i}": i for i in range(2000)},
        "every field large": {"data": text(9000), "more": {"blob": text(9000)}},
        "only references left": {"data": text(9000), "ref": {"$sagaflowRef": REF_BODY}},
        # 18 fields of 2000 bytes: the rest fits only once 17 are stored, and at most
        # MAX_FIELD_REFS (16) may be.
        "too many": {f"f{i:02}": text(2000) for i in range(18)} | {"sha": SHA},
    }[case]
    if case == "too many":
        assert MAX_FIELD_REFS == 16
        fields = [Field((k,), encode(v), field_key(KEY, (k,))) for k, v in value.items()]
        rest = len(encode(value)) - sum(len(f.data) - marker_size(f) for f in fields[:17])
        assert rest <= 8192 < rest + len(fields[16].data) - marker_size(fields[16])
        assert plan_fields(value, len(encode(value)), KEY, 8192) == []
    else:
        assert plan_fields(value, len(encode(value)), KEY, LIMIT) == []


REF_BODY = {"uri": "file:///p/e0/x/1/output", "size": 9000, "sha256": "ab" * 32}


def test_field_keys_are_valid_and_distinct_whatever_the_names() -> None:
    names = ["a/b", ".hidden", "", "é ü", "x.y", "x%2Ey", "..", "a\\b\n", "UPPER"]
    keys = [field_key(KEY, (name,)) for name in names]
    assert len(set(keys)) == len(keys)
    assert all(check_key(k) == k and k.startswith(f"{KEY}.") and "/" not in k[len(KEY) :]
               for k in keys)  # fmt: skip
    assert field_key(KEY, ("meta", "blob")) == f"{KEY}.meta.blob"
    assert field_key(KEY, ("x.y",)) != field_key(KEY, ("x", "y"))
    long = field_key(KEY, ("n" * 2000,))  # too long for a blob name: a digest instead
    assert len(long) <= MAX_KEY_LENGTH and check_key(long) == long
    assert long == field_key(KEY, ("n" * 2000,))  # deterministic


# ---------------------------------------------------------------- storing


async def test_the_large_field_goes_by_reference_and_the_small_ones_stay(
    cc: ClaimCheck, store: CountingStore
) -> None:
    value = {"data": text(20_000), "sha": SHA, "meta": {"n": 3}}
    result = await cc.offload(value, KEY)
    assert result["sha"] == SHA and result["meta"] == {"n": 3}
    ref = ref_of(result["data"])
    assert ref.uri.endswith("/e1/make/1/output.data") and ref.size == 20_002
    assert ref.sha256 == hashlib.sha256(encode(text(20_000))).hexdigest()
    assert len(encode(result)) <= LIMIT
    assert store.files() == {"e1/make/1/output.data"}
    assert await cc.resolve(result) == value


async def test_nested_fields_go_at_their_own_keys(cc: ClaimCheck, store: CountingStore) -> None:
    value = {"meta": {"blob": text(9000), "n": 3}, "rows": [1, 2], "sha": SHA}
    result = await cc.offload(value, KEY)
    assert set(markers_in(result)) == {"meta.blob"}
    assert result["meta"]["n"] == 3 and result["rows"] == [1, 2]
    assert store.files() == {"e1/make/1/output.meta.blob"}
    assert await cc.resolve(result) == value


async def test_a_value_that_cannot_be_split_is_stored_whole_leaving_nothing_else(
    cc: ClaimCheck, store: CountingStore
) -> None:
    for value in ({f"k{i}": i for i in range(2000)}, {"data": text(20_000)}):
        store.puts.clear()
        result = await cc.offload(value, KEY)
        assert is_ref(result) and ref_of(result).uri.endswith("/e1/make/1/output")
        assert store.puts == [KEY]  # no field payload was written first
        assert await cc.resolve(result) == value
    assert store.files() == {KEY}


async def test_a_repeated_attempt_overwrites_its_own_payloads(
    cc: ClaimCheck, store: CountingStore
) -> None:
    first = await cc.offload({"data": text(20_000), "sha": SHA}, KEY)
    again = await cc.offload({"data": text(20_000), "sha": SHA}, KEY)
    assert again == first
    changed = await cc.offload({"data": text(20_000, "y"), "sha": SHA}, KEY)
    assert ref_of(changed["data"]).uri == ref_of(first["data"]).uri
    assert store.files() == {"e1/make/1/output.data"}
    assert await cc.resolve(changed) == {"data": text(20_000, "y"), "sha": SHA}


async def test_odd_field_names_round_trip(cc: ClaimCheck, store: CountingStore) -> None:
    value = {"a/b": text(5000), ".hidden": text(5000), "é ü": text(5000), "": text(5000)}
    value |= {"sha": SHA}
    result = await cc.offload(value, KEY)
    assert set(markers_in(result)) == {"a/b", ".hidden", "é ü", ""}
    assert len(store.files()) == 4 and all(f.startswith("e1/make/1/") for f in store.files())
    assert await cc.resolve(result) == value


async def test_markers_longer_than_planned_send_the_rest_whole_and_orphan_nothing(
    tmp_path: Path,
) -> None:
    # A store directory far longer than URI_ALLOWANCE: each real marker is ~200 bytes
    # larger than planned, so a rest planned to just fit does not.
    store = CountingStore(tmp_path / ("d" * 200) / ("e" * 200))
    cc = ClaimCheck(store, LIMIT)
    planned = {"data": text(20_000), "sha": SHA}
    field = Field(("data",), encode(text(20_000)), field_key(KEY, ("data",)))
    rest = len(encode(planned)) - len(field.data) + marker_size(field)
    value = planned | {"pad": text(LIMIT - rest - len(',"pad":""'))}
    assert len(encode(value)) - len(field.data) + marker_size(field) == LIMIT
    result = await cc.offload(value, KEY)
    assert is_ref(result) and ref_of(result).uri.endswith("/e1/make/1/output")
    assert store.puts == [f"{KEY}.data", KEY]
    stored = read_json(ref_of(result).uri)
    assert stored["pad"] == value["pad"] and is_ref(stored["data"])  # the field stays used
    assert await cc.resolve(result) == value


async def test_values_that_are_not_json_are_still_refused(cc: ClaimCheck) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        await cc.offload({"data": text(20_000), "x": float("nan")}, KEY)
    with pytest.raises(ValueError, match=r"cannot be stored: output\.x"):
        await cc.offload({"data": text(20_000), "x": "a\x00b"}, KEY)


async def test_a_store_that_fails_while_storing_fields_raises_its_error(
    cc: ClaimCheck, store: CountingStore
) -> None:
    store.down = True
    with pytest.raises(PayloadStoreError, match="down"):
        await cc.offload({"a": text(9000), "b": text(9000), "sha": SHA}, KEY)


# ---------------------------------------------------------------- the runner worker


async def test_the_worker_sends_the_output_with_its_large_field_by_reference(
    pg_pool: asyncpg.Pool, cc: ClaimCheck
) -> None:
    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"data": text(50_000), "sha": SHA}

    registry = Registry()
    registry.register("bulk.work", work)
    cmd = ExecuteStep("e1", "default/run-1", "work", 1, "bulk.work", {}, None, None)
    bus = PostgresBus(pg_pool)
    await bus.send(
        [OutgoingMessage(commands_queue(cmd.type), cmd.attempt_id, "e1/work", cmd.encode())]
    )
    stop = asyncio.Event()
    worker = asyncio.create_task(RunnerWorker(bus, registry, claim_check=cc).run(stop))
    try:
        (event,) = await bus.receive(EVENTS_QUEUE, max_wait=30)
    finally:
        stop.set()
        await worker
        await bus.close()
    result = decode_result(event.body)
    assert result.kind == "StepCompleted" and result.output is not None
    assert result.output["sha"] == SHA
    assert ref_of(result.output["data"]).uri.endswith("/e1/work/1/output.data")
    assert len(event.body) < LIMIT + 1000
    assert await cc.resolve(result.output) == {"data": text(50_000), "sha": SHA}


# ---------------------------------------------------------------- the orchestrator

NOTE = text(2500, "n")  # inline in the output; two of them make an input over LIMIT
SPEC = WorkflowSpec.model_validate(
    {
        "steps": [
            {"name": "produce", "type": "bulk.produce"},
            {
                "name": "read-sha",
                "type": "bulk.sha",
                "dependsOn": ["produce"],
                "input": {"sha": "${{ steps.produce.output.sha }}"},
            },
            {
                "name": "take-data",
                "type": "bulk.data",
                "dependsOn": ["produce"],
                "input": {"data": "${{ steps.produce.output.data }}"},
            },
            {
                "name": "bundle",
                "type": "bulk.bundle",
                "dependsOn": ["produce"],
                "input": {
                    "a": "${{ steps.produce.output.note }}",
                    "b": "${{ steps.produce.output.note }}",
                },
            },
        ]
    }
)


@pytest.fixture
async def orchestrator(pg_pool: asyncpg.Pool, cc: ClaimCheck) -> AsyncIterator[Orchestrator]:
    bus = PostgresBus(pg_pool)
    orchestrator = Orchestrator(PostgresStore(pg_pool), bus, claim_check=cc)
    await orchestrator.apply_workflow("default", "bulk", SPEC)
    yield orchestrator
    await bus.close()


async def command_inputs(orchestrator: Orchestrator, count: int) -> dict[str, Any]:
    """Step name -> input of the next `count` commands (one queue: the `bulk.` prefix)."""
    got = await orchestrator.bus.receive(commands_queue("bulk.any"), max_wait=5)
    commands = [decode_command(m.body) for m in got]
    assert len(commands) == count, [c.step for c in commands]
    return {c.step: c.input for c in commands}


async def test_later_steps_read_small_fields_and_pass_large_ones_on(
    orchestrator: Orchestrator, cc: ClaimCheck
) -> None:
    state, _ = await orchestrator.start("default", "run-1", "bulk", {})
    eid = state.execution_id
    assert await command_inputs(orchestrator, 1) == {"produce": {}}
    produced = {"data": text(50_000), "sha": SHA, "note": NOTE}
    output = await cc.offload(produced, f"{eid}/produce/1/output")
    assert set(markers_in(output)) == {"data"} and output["note"] == NOTE
    result = StepResult("StepCompleted", eid, "produce", 1, output=output)
    await orchestrator.bus.send(
        [OutgoingMessage(EVENTS_QUEUE, result.message_id, eid, result.encode())]
    )
    assert await orchestrator.consume_once(max_wait=5) == 1

    inputs = await command_inputs(orchestrator, 3)
    assert inputs["read-sha"] == {"sha": SHA}
    taken = inputs["take-data"]
    assert taken == {"data": output["data"]}  # the very marker, passed on
    assert await cc.resolve(taken) == {"data": text(50_000)}
    # Two inline notes make an input over the threshold: it travels by reference again.
    bundle = inputs["bundle"]
    assert len(encode(bundle)) <= LIMIT
    assert ref_of(bundle["a"]).uri.endswith(f"/{eid}/bundle/1/input.a") and bundle["b"] == NOTE
    assert await cc.resolve(bundle) == {"a": NOTE, "b": NOTE}
    async with orchestrator.pool.acquire() as conn:
        size = await conn.fetchval("SELECT octet_length(state::text) FROM sagaflow_executions")
    assert size < 20_000  # the 50 KB field is not in the row
