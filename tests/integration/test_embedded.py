"""The embedded Postgres: start, restart, sharing between processes and recovery
after its owner was killed with -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from pg import RUNTIME_DIR, server_dir

from sagaflow.adapters.postgres.embedded import (
    EmbeddedPostgres,
    pg_bin_dir,
    pid_alive,
    postmaster_pid,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

# Starts the server in another process, prints its DSN, and lets go when stdin closes.
_OWNER = """
import sys
import time
from pathlib import Path
from sagaflow.adapters.postgres.embedded import EmbeddedPostgres
server = EmbeddedPostgres(Path(sys.argv[1]), runtime_dir=Path(sys.argv[2]))
print(server.start(), flush=True)
sys.stdin.read()
server.stop()
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with server_dir() as path:
        yield path
        _force_stop(path / "pgdata")


def _force_stop(pgdata: Path) -> None:
    """Stop a server a failed test left behind, as the tests' notes advise."""
    if postmaster_pid(pgdata) is None:
        return
    subprocess.run(
        [str(pg_bin_dir() / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "immediate", "-w"],
        user="pgserver" if os.geteuid() == 0 else None,
        check=False,
        capture_output=True,
    )


def _start_owner(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(data_dir), str(RUNTIME_DIR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    return owner, owner.stdout.readline().strip()


def _wait_for_exit(pid: int) -> None:
    while pid_alive(pid):
        time.sleep(0.02)


async def _query(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_start_and_stop(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir, runtime_dir=RUNTIME_DIR)
    dsn = server.start()
    assert server.start() == dsn
    assert await _query(dsn, "SELECT 1") == 1
    pid = postmaster_pid(server.pgdata)
    assert pid is not None
    server.stop()
    assert not pid_alive(pid)
    with pytest.raises(RuntimeError):
        _ = server.dsn


async def test_restart_keeps_the_data(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir, runtime_dir=RUNTIME_DIR) as server:
        await _query(server.dsn, "CREATE TABLE kept AS SELECT 42 AS answer")
    with EmbeddedPostgres(data_dir, runtime_dir=RUNTIME_DIR) as server:
        assert await _query(server.dsn, "SELECT answer FROM kept") == 42


async def test_processes_share_the_server_until_the_last_lets_go(data_dir: Path) -> None:
    owner, dsn = _start_owner(data_dir)
    pid = postmaster_pid(data_dir / "pgdata")
    try:
        with EmbeddedPostgres(data_dir, runtime_dir=RUNTIME_DIR) as server:
            assert postmaster_pid(server.pgdata) == pid
            assert await _query(server.dsn, "SELECT 1") == 1
        assert pid is not None
        assert pid_alive(pid), "stopped while the owner still holds it"
        assert await _query(dsn, "SELECT 1") == 1
        # Attaching again from this process counts it as a holder again.
        with EmbeddedPostgres(data_dir, runtime_dir=RUNTIME_DIR) as server:
            handles = json.loads((server.pgdata / ".handle_pids.json").read_text())
            assert sorted(handles) == sorted([owner.pid, os.getpid()])
    finally:
        owner.communicate("", timeout=30)
    assert not pid_alive(pid)


async def test_recovers_after_the_owner_was_killed(data_dir: Path) -> None:
    owner, _ = _start_owner(data_dir)
    pid = postmaster_pid(data_dir / "pgdata")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    # The server outlives its owner, whose pid stays in pgserver's list of holders.
    assert pid is not None
    assert pid_alive(pid)
    handles = data_dir / "pgdata" / ".handle_pids.json"
    assert owner.pid in json.loads(handles.read_text())

    server = EmbeddedPostgres(data_dir, runtime_dir=RUNTIME_DIR)
    dsn = server.start()
    assert await _query(dsn, "SELECT 1") == 1
    assert json.loads(handles.read_text()) == [os.getpid()]
    server.stop()
    assert not pid_alive(pid), "the server left by the killed owner was not stopped"


async def test_starts_again_after_owner_and_server_were_killed(data_dir: Path) -> None:
    owner, _ = _start_owner(data_dir)
    pid = postmaster_pid(data_dir / "pgdata")
    assert pid is not None
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    os.kill(pid, signal.SIGKILL)  # a crash: postmaster.pid stays behind
    _wait_for_exit(pid)  # the signal is delivered asynchronously

    with EmbeddedPostgres(data_dir, runtime_dir=RUNTIME_DIR) as server:
        assert await _query(server.dsn, "SELECT 1") == 1
        assert postmaster_pid(server.pgdata) != pid
