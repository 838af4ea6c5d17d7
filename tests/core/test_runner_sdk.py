"""The step runner SDK: registration, errors, module loading and the step context."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sagaflow_runner import (
    PermanentError,
    Registry,
    RetryableError,
    StepContext,
    default_registry,
    is_async_handler,
    load_module,
    step,
)

pytestmark = pytest.mark.timeout(30)


async def _ok(input: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
    return None


def _unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


# -- registration ---------------------------------------------------------------------------


def test_step_registers_in_the_given_registry() -> None:
    registry = Registry()

    @step("inventory.reserve", registry=registry)
    async def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"reserved": True}

    assert registry.handler("inventory.reserve") is reserve
    assert registry.handler("inventory.release") is None
    assert "inventory.reserve" not in default_registry.types()


def test_step_registers_in_the_default_registry() -> None:
    step_type = f"{_unique_prefix()}.charge"

    @step(step_type)
    async def charge(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    assert default_registry.handler(step_type) is charge


def test_types_and_prefixes() -> None:
    registry = Registry()
    for step_type in ("payments.refund", "inventory.reserve", "payments.charge", "a.b.c"):
        registry.register(step_type, _ok)
    assert registry.types() == ["a.b.c", "inventory.reserve", "payments.charge", "payments.refund"]
    assert registry.prefixes() == {"a", "inventory", "payments"}


def test_a_plain_function_is_accepted_and_marked_for_a_thread() -> None:
    registry = Registry()

    @step("inventory.reserve", registry=registry)
    def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {}

    assert registry.handler("inventory.reserve") is reserve
    assert not is_async_handler(reserve)
    assert is_async_handler(_ok)


def test_something_not_callable_is_rejected() -> None:
    registry = Registry()
    with pytest.raises(TypeError, match=r"inventory\.reserve.*a function taking"):
        registry.register("inventory.reserve", "not a function")  # type: ignore[arg-type]
    assert registry.types() == []


def test_a_callable_object_with_async_call_is_accepted() -> None:
    class Handler:
        async def __call__(self, input: dict[str, Any], ctx: StepContext) -> None:
            return None

    registry = Registry()
    handler = Handler()
    registry.register("objects.call", handler)
    assert registry.handler("objects.call") is handler


def test_a_duplicate_step_type_is_rejected() -> None:
    registry = Registry()

    @step("inventory.reserve", registry=registry)
    async def first(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    async def second(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    with pytest.raises(ValueError, match=r"'inventory\.reserve' is already registered by .*first"):
        step("inventory.reserve", registry=registry)(second)
    assert registry.handler("inventory.reserve") is first


def test_registering_the_same_function_again_is_not_a_conflict() -> None:
    registry = Registry()
    registry.register("inventory.reserve", _ok)
    registry.register("inventory.reserve", _ok)
    assert registry.types() == ["inventory.reserve"]


@pytest.mark.parametrize(
    "step_type", ["reserve", ".reserve", "inventory.", "inventory..reserve", "1nv.reserve", "a b.c"]
)
def test_a_step_type_must_look_like_prefix_dot_name(step_type: str) -> None:
    with pytest.raises(ValueError, match=r"prefix\.name"):
        Registry().register(step_type, _ok)


def test_the_sagaflow_prefix_is_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Registry().register("sagaflow.pass", _ok)


# -- errors ---------------------------------------------------------------------------------


def test_error_type_defaults_to_the_class_name() -> None:
    assert RetryableError("busy").type == "RetryableError"
    assert PermanentError("bad input").type == "PermanentError"

    class OutOfStock(PermanentError):
        pass

    assert OutOfStock("none left").type == "OutOfStock"


def test_error_type_can_be_overridden() -> None:
    exc = PermanentError("no widgets left", type="OutOfStock")
    assert exc.type == "OutOfStock"
    assert exc.retryable is False
    assert str(exc) == "no widgets left"
    assert RetryableError("later", type="Throttled").retryable is True


# -- context --------------------------------------------------------------------------------


def _context(**overrides: Any) -> StepContext:
    fields: dict[str, Any] = {
        "execution": "shop/order-1",
        "execution_id": "e-123",
        "step": "reserve",
        "attempt": 2,
    }
    fields.update(overrides)
    return StepContext(**fields)


def test_context_attributes_and_idempotency_key() -> None:
    deadline = datetime(2030, 1, 1, tzinfo=UTC)
    ctx = _context(deadline=deadline)
    assert ctx.execution == "shop/order-1"
    assert ctx.execution_id == "e-123"
    assert ctx.step == "reserve"
    assert ctx.attempt == 2
    assert ctx.deadline == deadline
    assert ctx.idempotency_key == "e-123/reserve/2"
    assert _context().deadline is None


def test_context_rejects_a_zero_attempt() -> None:
    with pytest.raises(ValueError, match="1-based"):
        _context(attempt=0)


async def test_heartbeat_calls_the_host_callback() -> None:
    beats: list[dict[str, Any] | None] = []

    async def record(details: dict[str, Any] | None) -> None:
        beats.append(details)

    ctx = _context(heartbeat=record)
    await ctx.heartbeat({"progress": 0.5})
    await ctx.heartbeat()
    assert beats == [{"progress": 0.5}, None]


async def test_heartbeat_without_a_host_is_a_no_op() -> None:
    await _context().heartbeat({"progress": 1})


# -- load_module ----------------------------------------------------------------------------


def _write_steps(path: Path, step_type: str) -> None:
    path.write_text(
        textwrap.dedent(
            f"""
            from sagaflow_runner import step

            @step({step_type!r})
            async def handler(input, ctx):
                return {{"loaded": True}}
            """
        )
    )


def test_load_module_from_a_file_runs_its_step_decorators(tmp_path: Path) -> None:
    step_type = f"{_unique_prefix()}.run"
    path = tmp_path / "my_steps.py"
    _write_steps(path, step_type)

    module = load_module(str(path))

    handler = default_registry.handler(step_type)
    assert handler is not None
    assert handler is module.handler
    # Loading the same file again returns the same module and does not re-register.
    assert load_module(path) is module


def test_load_module_from_a_file_can_import_its_siblings(tmp_path: Path) -> None:
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("VALUE = 42\n")
    step_type = f"{_unique_prefix()}.sibling"
    path = tmp_path / "steps_with_helper.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from sagaflow_runner import step
            from {helper} import VALUE

            @step({step_type!r})
            async def handler(input, ctx):
                return {{"value": VALUE}}
            """
        )
    )
    assert load_module(path).VALUE == 42


def test_load_module_by_dotted_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = f"pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    step_type = f"{_unique_prefix()}.dotted"
    _write_steps(tmp_path / package / "steps.py", step_type)
    monkeypatch.syspath_prepend(str(tmp_path))

    module = load_module(f"{package}.steps")

    assert module.__name__ == f"{package}.steps"
    assert default_registry.handler(step_type) is module.handler


def test_load_module_missing_file_names_the_spec(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ImportError, match=r"nope\.py"):
        load_module(missing)


def test_load_module_missing_dotted_name_names_the_spec() -> None:
    with pytest.raises(ImportError, match=r"'no_such_pkg_x\.steps' not found"):
        load_module("no_such_pkg_x.steps")


def test_load_module_keeps_the_error_of_a_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"steps_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import definitely_missing_dependency_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        load_module(name)
    assert info.value.name == "definitely_missing_dependency_x"


def test_load_module_failing_file_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "broken_steps.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        load_module(path)
    path.write_text("VALUE = 1\n")
    assert load_module(path).VALUE == 1


def test_load_module_rejects_an_empty_spec() -> None:
    with pytest.raises(ValueError, match="empty"):
        load_module("  ")


def test_the_sdk_does_not_import_the_orchestrator() -> None:
    code = (
        "import sys, sagaflow_runner\n"
        "bad = sorted(m for m in sys.modules if m == 'sagaflow' or m.startswith('sagaflow.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
