"""`sagaflow operator` and `sagaflow runner` as subprocesses, as a cluster runs them.

The operator process logs into the in-memory API server through a kubeconfig and
keeps its state in the test's Postgres database; the runner process serves step
types from a module. Both run until stopped; `kill()` is SIGKILL, for crash tests.
Their output goes to a log file that a failing test prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(dsn: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAFLOW_", "KUBE"))}
    env.update(
        SAGAFLOW_DATABASE_URL=dsn,
        SAGAFLOW_PAYLOAD_DIR=str(tmp / "payloads"),
        SAGAFLOW_LOG_LEVEL="INFO",
        # No API unless a test asks for one: processes side by side need no port each.
        SAGAFLOW_API_PORT="0",
        HOME=str(tmp),
    )
    env.update(extra)
    return env


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"--- start {self.name}\n".encode())
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sagaflow.cli",
                *self.args,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, sig: int = signal.SIGTERM, within: float = 20) -> int | None:
        if self.proc is None:
            return None
        began = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), within)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        with self.log.open("a") as out:
            took = time.monotonic() - began
            out.write(f"--- {self.name} exited with {code} in {took:.2f}s\n")
        return code

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.asynccontextmanager
async def running(*processes: Process) -> AsyncIterator[None]:
    """Start the processes; stop them at the end, printing their logs if the block failed."""
    try:
        for p in processes:
            await p.start()
        yield
    except BaseException:
        for p in processes:
            print(f"===== {p.name} log =====\n{p.output()[-20000:]}")
        raise
    finally:
        for p in processes:
            await p.stop()
