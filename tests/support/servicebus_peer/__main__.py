"""Run the peer as a process of its own: `python -m servicebus_peer --queue NAME ...`.

For benchmarks and end-to-end tests whose processes (orchestrator, runners) must not
share a Python interpreter, or a GIL, with the broker. Prints the connection string on
its first line of output once it listens, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .entities import QueueSpec
from .fixture import running_peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="servicebus_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--queue", action="append", default=[], help="a plain queue")
    parser.add_argument(
        "--session-queue", action="append", default=[], help="a queue with sessions on"
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lock-duration", type=float, default=30.0)
    parser.add_argument("--max-delivery-count", type=int, default=10)
    parser.add_argument(
        "--duplicate-detection", action="store_true", help="drop a repeated message id"
    )
    args = parser.parse_args(argv)

    def spec(sessions: bool) -> QueueSpec:
        return QueueSpec(
            requires_session=sessions,
            lock_duration=args.lock_duration,
            max_delivery_count=args.max_delivery_count,
            requires_duplicate_detection=args.duplicate_detection,
        )

    queues = {name: spec(False) for name in args.queue}
    queues.update({name: spec(True) for name in args.session_queue})
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with running_peer(queues, port=args.port) as peer:
        print(peer.connection_string, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
