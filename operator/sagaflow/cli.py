"""The `sagaflow` command: `run` (local mode), `server` (a long-running one), `operator`
(in a cluster), `runner`, `prune`; `start`, `get`, `describe`, `history`, `signal` and
the control verbs `suspend`, `resume`, `cancel`, `redrive`, `skip-compensation`.

Exit codes: 0 all executions completed (a control request took effect), 1 some did
not (the request was refused), 2 invalid input or configuration (nothing was done).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sagaflow.core.durations import parse_duration
from sagaflow.core.ports import BusSetupError
from sagaflow.settings import Settings, SettingsError, load_settings
from sagaflow.telemetry import logs, tracing

DEFAULT_STATE_DIR = Path(".sagaflow")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagaflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run Workflows and Executions from files, no cluster")
    run.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        type=Path,
        required=True,
        help="manifest file or folder (repeatable)",
    )
    run.add_argument(
        "--runners",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="module or .py file whose @step handlers run in-process (repeatable)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where the embedded Postgres keeps its data (default: .sagaflow)",
    )
    run.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    sub.add_parser(
        "operator",
        help="run the Kubernetes operator (SAGAFLOW_DATABASE_URL; kubeconfig or in-cluster)",
    )
    runner = sub.add_parser("runner", help="run step handlers against the bus")
    runner.add_argument(
        "--module",
        dest="modules",
        action="append",
        required=True,
        metavar="MODULE_OR_FILE",
        help="module or .py file with @step handlers",
    )
    runner.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="attach to the embedded Postgres of this state dir "
        "(ignored when SAGAFLOW_DATABASE_URL is set)",
    )
    prune = sub.add_parser(
        "prune", help="delete finished executions older than a duration, with their payloads"
    )
    prune.add_argument(
        "--older-than",
        required=True,
        metavar="DURATION",
        help="finished more than this long ago, e.g. 30d, 12h (units: ms, s, m, h, d)",
    )
    prune.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="the embedded Postgres and local payloads of this state dir "
        "(the database is ignored when SAGAFLOW_DATABASE_URL is set)",
    )
    _server_parser(sub)
    _control_parsers(sub)
    _signal_parser(sub)
    _client_parsers(sub)
    topology = sub.add_parser(
        "servicebus-topology",
        help="create the Service Bus queues (events, steps.<prefix>)",
    )
    topology.add_argument(
        "--prefix",
        dest="prefixes",
        action="append",
        default=[],
        metavar="PREFIX",
        help="a step-type prefix served by runners, e.g. inventory (repeatable)",
    )
    return parser


_CONTROL_HELP = {
    "suspend": "suspend an execution: nothing new is dispatched until it is resumed",
    "resume": "resume a suspended execution",
    "cancel": "cancel an execution: what it did is undone (the workflow's onCancel)",
    "redrive": "retry a Failed run from its failure (successes kept), or the failed "
    "compensations of a CompensationFailed one",
    "skip-compensation": "pass over a step's compensation (undone by hand), so the rest goes on",
}


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _client_options(parser: argparse.ArgumentParser) -> None:
    """Where a verb reaches Sagaflow: a server, or the state itself."""
    parser.add_argument(
        "--server",
        metavar="URL",
        help="a sagaflow server or operator API, e.g. http://127.0.0.1:8090 "
        "(default: SAGAFLOW_SERVER; unset: the state of --state-dir)",
    )
    parser.add_argument(
        "--token", help="bearer token for --server (default: SAGAFLOW_SERVER_TOKEN)"
    )
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="without --server: the state of `sagaflow run`/`server` "
        "(ignored when SAGAFLOW_DATABASE_URL is set)",
    )


def _server_parser(sub: Any) -> None:
    text = (
        "a long-running orchestrator that serves the API and runs the Schedules and "
        "Triggers of the files, until stopped"
    )
    server = sub.add_parser("server", help=text, description=text)
    server.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        type=Path,
        default=[],
        help="manifest file or folder: Workflows, Executions, Schedules, Triggers, Secrets",
    )
    server.add_argument(
        "--runners",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="module or .py file whose @step handlers run in-process (repeatable)",
    )
    server.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)


def _client_parsers(sub: Any) -> None:
    start = sub.add_parser("start", help="start a run of a workflow (once per idempotency key)")
    start.add_argument("workflow", metavar="WORKFLOW")
    start.add_argument("--input", metavar="JSON|@FILE", help="the run's input (an object)")
    start.add_argument("--idempotency-key", help="the same key always yields the same run")
    start.add_argument("--name", help="the run's name (default: derived from the key, or new)")
    start.add_argument("--correlation-key", help="the run's spec.correlationKey")
    start.add_argument(
        "--wait",
        type=_seconds,
        nargs="?",
        const=24 * 3600.0,
        default=None,
        metavar="DURATION",
        help="wait until the run is at rest (exit 0 if it Completed), at most DURATION",
    )
    start.add_argument("-o", "--output", choices=("table", "json", "yaml", "name"), default="table")
    _client_options(start)
    get = sub.add_parser("get", help="list executions, workflows or schedules")
    get.add_argument(
        "resource",
        choices=("executions", "execution", "workflows", "workflow", "schedules", "schedule"),
    )
    get.add_argument("name", nargs="?", metavar="NAME")
    get.add_argument("--workflow", help="executions of this workflow only")
    get.add_argument("--phase", help="executions in this phase only")
    get.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    _client_options(get)
    describe = sub.add_parser("describe", help="an execution's status, steps and latest history")
    describe.add_argument("resource", choices=("execution",))
    describe.add_argument("name", metavar="NAME")
    _client_options(describe)
    history = sub.add_parser("history", help="an execution's timeline, or its state at --at")
    history.add_argument("name", metavar="NAME")
    history.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    history.add_argument(
        "--at",
        metavar="TIME",
        help="the state at this instant (RFC 3339, e.g. 2024-05-01T12:00:00Z, or now)",
    )
    _client_options(history)


def _signal_parser(sub: Any) -> None:
    text = "send a signal to a run that waits for it (sagaflow.waitForSignal), or will"
    usage = (
        "sagaflow signal NAME SIGNAL [--data JSON] [--id ID] [-n NS] [--wait DURATION]\n"
        "       sagaflow signal --correlation-key KEY --workflow WF SIGNAL [--data JSON] ..."
    )
    parser = sub.add_parser("signal", help=text, description=text, usage=usage)
    parser.add_argument(
        "target",
        nargs="+",
        metavar="[NAME] SIGNAL",
        help="the execution's name and the signal's (only SIGNAL with --correlation-key)",
    )
    parser.add_argument("--data", help="the signal's data, JSON (default: null)")
    parser.add_argument("--id", dest="signal_id", help="once-only id (default: a new one)")
    parser.add_argument("--correlation-key", help="find the run by its spec.correlationKey")
    parser.add_argument("--workflow", help="with --correlation-key: the run's workflow")
    parser.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="DURATION",
        help="wait this long (e.g. 30s) for a run that does not exist yet",
    )
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    _server_options(parser)


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", help="a sagaflow server or operator API")
    parser.add_argument("--token", help="bearer token for --server")


def _control_parsers(sub: Any) -> None:
    for verb, help_text in _CONTROL_HELP.items():
        parser = sub.add_parser(verb, help=help_text, description=help_text)
        parser.add_argument("name", metavar="NAME", help="the execution's name")
        parser.add_argument("-n", "--namespace", default="default")
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help="the state of `sagaflow run` (ignored when SAGAFLOW_DATABASE_URL is set)",
        )
        _server_options(parser)
        if verb == "redrive":
            parser.add_argument(
                "--latest",
                action="store_true",
                help="move the run onto the workflow's current version (every step that "
                "succeeded must still exist in it)",
            )
            parser.add_argument(
                "-f",
                "--filename",
                dest="files",
                action="append",
                type=Path,
                default=[],
                help="store the Workflows of this file first (repeatable), e.g. a fixed one",
            )
        if verb == "skip-compensation":
            parser.add_argument(
                "--step", dest="steps", action="append", required=True, help="(repeatable)"
            )


# The long-running commands, whose spans go to `SAGAFLOW_OTLP_ENDPOINT` when it is set.
_TRACED = ("operator", "server", "run", "runner")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        return _dispatch(args, settings)
    except BusSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command in _TRACED:
        tracing.configure(settings)
    if hasattr(args, "server"):
        args.server = args.server or settings.server
        token = settings.server_token.get_secret_value() if settings.server_token else None
        args.token = args.token or token
    if args.command in ("start", "get", "describe", "history") or (
        getattr(args, "server", None) and args.command in (*_CONTROL_HELP, "signal")
    ):
        from sagaflow.local.verbs import run_verb

        verb = "control" if args.command in _CONTROL_HELP else args.command
        if verb == "control" and getattr(args, "files", None):
            print("error: -f stores Workflows in a state: not with --server", file=sys.stderr)
            return 2
        return asyncio.run(run_verb(verb, args, settings))
    if args.command == "server":
        from sagaflow.local.server import run_server

        return asyncio.run(run_server(args.files, args.runners, args.state_dir, settings))
    if args.command == "run":
        from sagaflow.local.run import run_local

        return asyncio.run(
            run_local(args.files, args.runners, args.state_dir, args.output, settings)
        )
    if args.command == "operator":
        from sagaflow.kube.app import run_operator

        return asyncio.run(run_operator(settings))
    if args.command == "servicebus-topology":
        from sagaflow.local.topology import run_topology

        return asyncio.run(run_topology(args.prefixes, settings))
    if args.command in _CONTROL_HELP:
        from sagaflow.local.control import run_control

        return asyncio.run(
            run_control(
                args.command,
                args.name,
                args.namespace,
                args.state_dir,
                settings,
                latest=getattr(args, "latest", False),
                steps=getattr(args, "steps", ()),
                files=getattr(args, "files", ()),
            )
        )
    if args.command == "signal":
        from sagaflow.local.control import run_signal

        return asyncio.run(
            run_signal(
                args.target,
                args.namespace,
                args.state_dir,
                settings,
                data=args.data,
                signal_id=args.signal_id,
                correlation_key=args.correlation_key,
                workflow=args.workflow,
                wait=args.wait,
            )
        )
    if args.command == "prune":
        from sagaflow.local.prune import run_prune

        return asyncio.run(run_prune(args.older_than, args.state_dir, settings))
    from sagaflow.local.runner import run_runner

    return asyncio.run(run_runner(args.modules, args.state_dir, settings))


if __name__ == "__main__":
    sys.exit(main())
