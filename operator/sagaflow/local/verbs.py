"""`sagaflow start|get|describe|history`, and the control and signal verbs with `--server`.

Every verb talks to Sagaflow through the one client interface (`api.contract`):
`--server URL` (or SAGAFLOW_SERVER) reaches a `sagaflow server` or an operator's
API over HTTP (`api.client`); otherwise the verb opens the state itself
(`--state-dir`, SAGAFLOW_DATABASE_URL) and calls `api.service.DirectService`. The
same documents come back either way, and are printed by `printing.py`.

Exit codes follow the other verbs: 0 done (for `start --wait`: the run Completed),
1 refused, not completed, or the server unreachable, 2 invalid input (a bad flag
value, an unknown workflow or execution).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

from sagaflow.api.contract import ApiError, Sagaflow
from sagaflow.api.service import DirectService
from sagaflow.core.jsonsafe import unstorable
from sagaflow.core.ports import utc_now
from sagaflow.core.replay import parse_instant
from sagaflow.local import printing, timeline
from sagaflow.runtime.startpath import Source, StartCall
from sagaflow.settings import Settings
from sagaflow.wiring.orchestrators import open_orchestrator
from sagaflow.wiring.problems import InvalidInputError

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
_POLL = 0.25  # seconds between looks while `start --wait` waits


@asynccontextmanager
async def open_client(
    server: str | None, token: str | None, state_dir: Path, settings: Settings
) -> AsyncIterator[Sagaflow]:
    """The client interface over a server, or over the state of `state_dir`."""
    if server:
        from sagaflow.api.client import HttpClient

        client = HttpClient(server, token=token)
        try:
            yield client
        finally:
            await client.close()
        return
    if not settings.database_url and not (state_dir / "postgres").exists():
        raise InvalidInputError(
            [f"--state-dir {state_dir}: no state here (nothing has run); or pass --server URL"]
        )
    async with open_orchestrator(settings, state_dir, pool_size=2) as wired:
        yield DirectService(wired.orchestrator)


def read_input(text: str | None) -> dict[str, Any]:
    """`--input JSON` or `--input @FILE` (JSON or YAML): an object."""
    if text is None:
        return {}
    where = "--input"
    if text.startswith("@"):
        path = Path(text[1:])
        where = f"--input {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError([f"{where}: cannot read: {exc.strerror}"]) from exc
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidInputError([f"{where}: not JSON or YAML: {exc}"]) from exc
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError([f"{where}: not JSON: {exc}"]) from exc
    if not isinstance(value, dict):
        raise InvalidInputError([f"{where}: must be an object, got {type(value).__name__}"])
    if (problem := unstorable(value, "--input")) is not None:
        raise InvalidInputError([problem])
    return value


def _exit_of(error: ApiError) -> int:
    return EXIT_INVALID if error.status in {400, 404, 413, 415} else EXIT_FAILED


def _print_error(error: ApiError, err: TextIO) -> int:
    field = f" ({error.field})" if error.field else ""
    print(f"error: {error.message}{field}", file=err)
    return _exit_of(error)


async def run_verb(
    verb: str,
    args: Any,
    settings: Settings,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run one verb of this module with its parsed arguments."""
    try:
        async with open_client(args.server, args.token, args.state_dir, settings) as client:
            return await _VERBS[verb](client, args, out, err)
    except InvalidInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=err)
        return EXIT_INVALID
    except ApiError as exc:
        return _print_error(exc, err)


async def _start(client: Sagaflow, args: Any, out: TextIO, err: TextIO) -> int:
    call = StartCall(
        args.namespace,
        args.workflow,
        read_input(args.input),
        idempotency_key=args.idempotency_key,
        name=args.name,
        correlation_key=args.correlation_key,
        source=Source("cli"),
    )
    started = await client.start(call)
    execution = started.execution
    name = execution["metadata"]["name"]
    key = f" (idempotency key {args.idempotency_key})" if args.idempotency_key else ""
    said = "started" if started.created else f"exists already{key}"
    if args.output == "name":
        print(f"execution/{name}", file=out)
    elif args.output == "table":
        print(f"execution {args.namespace}/{name} {said}", file=out)
    if args.wait is not None:
        deadline = asyncio.get_running_loop().time() + args.wait
        while not printing.at_rest(execution):
            if asyncio.get_running_loop().time() >= deadline:
                print(f"error: execution {name} is not at rest after {args.wait:g}s", file=err)
                return EXIT_FAILED
            await asyncio.sleep(_POLL)
            execution = await client.get_execution(args.namespace, name)
    if args.output in ("json", "yaml"):
        print(printing.dump(execution, args.output), file=out)
    phase = (execution.get("status") or {}).get("phase", "Pending")
    if args.wait is not None:
        if args.output == "table":
            print(f"execution {args.namespace}/{name}: {phase}", file=out)
        return EXIT_OK if phase == "Completed" else EXIT_FAILED
    return EXIT_OK


async def _all_executions(client: Sagaflow, args: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = await client.list_executions(
            args.namespace,
            workflow=args.workflow,
            phase=args.phase,
            limit=500,
            continue_token=token,
        )
        items += page.items
        token = page.continue_token
        if token is None:
            return items


async def _get(client: Sagaflow, args: Any, out: TextIO, err: TextIO) -> int:
    resource = args.resource.rstrip("s")
    if args.name is not None and resource == "execution":
        items = [await client.get_execution(args.namespace, args.name)]
    elif resource == "execution":
        items = await _all_executions(client, args)
    elif resource == "workflow":
        items = await client.list_workflows(args.namespace)
    else:
        items = await client.list_schedules(args.namespace)
    if args.name is not None and resource != "execution":
        items = [i for i in items if i["metadata"]["name"] == args.name]
        if not items:
            print(f'error: {resource} "{args.name}" not found', file=err)
            return EXIT_INVALID
    if args.output in ("json", "yaml"):
        single = args.name is not None and len(items) == 1
        print(printing.dump(items[0] if single else printing.as_list(items), args.output), file=out)
        return EXIT_OK
    if not items:
        print(f"No resources found in {args.namespace} namespace.", file=err)
        return EXIT_OK
    render = {
        "execution": printing.executions_table,
        "workflow": printing.workflows_table,
        "schedule": printing.schedules_table,
    }[resource]
    print(render(items), file=out)
    return EXIT_OK


async def _describe(client: Sagaflow, args: Any, out: TextIO, err: TextIO) -> int:
    execution = await client.get_execution(args.namespace, args.name)
    history = await client.history(args.namespace, args.name)
    print(printing.describe_execution(execution, history), file=out)
    return EXIT_OK


async def _history(client: Sagaflow, args: Any, out: TextIO, err: TextIO) -> int:
    if getattr(args, "at", None) is not None:
        try:
            at = parse_instant(args.at, utc_now())
        except ValueError as exc:
            raise InvalidInputError([f"--at: {exc}"]) from None
        doc = await client.state_at(args.namespace, args.name, at)
        text = timeline.state_text(doc)
        print(text if args.output == "table" else printing.dump(doc, args.output), file=out)
        return EXIT_OK
    lines = timeline.timeline(await client.history(args.namespace, args.name))
    if args.output in ("json", "yaml"):
        print(printing.dump(lines, args.output), file=out)
    else:
        print(timeline.timeline_table(lines), file=out)
    return EXIT_OK


async def _control(client: Sagaflow, args: Any, out: TextIO, err: TextIO) -> int:
    steps: Sequence[str] = getattr(args, "steps", None) or ()
    latest = bool(getattr(args, "latest", False))
    outcome = await client.control(
        args.namespace, args.name, args.command, latest=latest, steps=steps
    )
    key = f"{args.namespace}/{args.name}"
    if outcome.result == "refused":
        print(f"error: {args.command} {key} refused: {outcome.message}", file=err)
        return EXIT_FAILED
    what = "nothing to do" if outcome.result == "noop" else "accepted"
    phase = (outcome.execution.get("status") or {}).get("phase")
    print(f"{args.command} {key}: {what}: {outcome.message}; the execution is {phase}", file=out)
    return EXIT_OK


async def _signal(client: Sagaflow, args: Any, out: TextIO, err: TextIO) -> int:
    if args.correlation_key is not None or len(args.target) != 2:
        raise InvalidInputError(["with --server: sagaflow signal NAME SIGNAL [--data JSON]"])
    name, signal = args.target
    try:
        data = None if args.data is None else json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise InvalidInputError([f"--data: not JSON: {exc}"]) from exc
    deadline = asyncio.get_running_loop().time() + args.wait
    while True:
        try:
            outcome = await client.signal(args.namespace, name, signal, data, args.signal_id)
            break
        except ApiError as exc:  # a run started a moment ago may not exist yet
            if exc.status != 404 or asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(_POLL)
    where = f"{signal} for execution {args.namespace}/{name}"
    if outcome.result == "refused":
        print(f"error: {where}: {outcome.message}", file=err)
        return EXIT_FAILED
    phase = (outcome.execution.get("status") or {}).get("phase")
    what = "nothing to do: " if outcome.result == "noop" else ""
    print(f"signal {where}: {what}{outcome.message}; the execution is {phase}", file=out)
    return EXIT_OK


_VERBS = {
    "start": _start,
    "get": _get,
    "describe": _describe,
    "history": _history,
    "control": _control,
    "signal": _signal,
}
