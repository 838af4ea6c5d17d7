"""Helpers for tests against a real Postgres: the embedded server, a fresh database
per test, and a clock the test moves by hand.

Kept out of `conftest.py` so test modules (and other suites' fixtures) can import
them; `tests/integration/conftest.py` turns them into fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from sagaflow.adapters.postgres.embedded import EmbeddedPostgres, pg_bin_dir, postmaster_pid
from sagaflow.adapters.postgres.migrate import migrate


@contextmanager
def server_dir(prefix: str = "sagaflow-pg-") -> Iterator[Path]:
    """A scratch folder for a server's data directory, removed afterwards.

    Not under pytest's tmp_path: as root, postgres runs as the `pgserver` user, which
    must traverse the parents of its data directory, and every pytest session that
    starts resets `/tmp/pytest-of-<user>` to mode 0700, so a concurrent pytest run
    would lock the server out of its own files.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# pgserver keeps its lock in the runtime folder of the first server a process starts
# and re-creates it at exit; a fixed folder keeps scratch folders removable.
RUNTIME_DIR = Path(tempfile.gettempdir()) / "sagaflow-pg-runtime"


@contextmanager
def embedded_server() -> Iterator[EmbeddedPostgres]:
    """A started embedded server in a scratch folder; stopped and removed afterwards."""
    with server_dir() as path, EmbeddedPostgres(path, runtime_dir=RUNTIME_DIR) as server:
        yield server


class FakeClock:
    """A `Clock` that only moves when told, so lock expiry and scheduled delivery
    are tested without sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def database_dsn(server_dsn: str, database: str) -> str:
    """The server's DSN pointed at another database (the path names the database)."""
    parts = urlsplit(server_dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(server_dsn: str, *, migrated: bool = True) -> str:
    """Create a uniquely named database (migrated unless told not to); return its DSN."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    server = await asyncpg.connect(server_dsn)
    try:
        await server.execute(f'CREATE DATABASE "{name}"')
    finally:
        await server.close()
    dsn = database_dsn(server_dsn, name)
    if migrated:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    return dsn


async def drop_database(server_dsn: str, dsn: str) -> None:
    # FORCE ends connections a failed test left open (a listener, a leaked pool).
    name = urlsplit(dsn).path.lstrip("/")
    server = await asyncpg.connect(server_dsn)
    try:
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await server.close()


@asynccontextmanager
async def fresh_database(server_dsn: str, *, migrated: bool = True) -> AsyncIterator[str]:
    """A database for one test, dropped afterwards; yields its DSN."""
    dsn = await create_database(server_dsn, migrated=migrated)
    try:
        yield dsn
    finally:
        await drop_database(server_dsn, dsn)


def pg_ctl(pgdata: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the bundled pg_ctl on a server's data directory, as the user postgres runs as
    (the tests' way to restart, stop and start a server under a running program). A
    server it starts logs to `pgdata/log`: it must not inherit pg_ctl's pipes."""
    return subprocess.run(
        [str(pg_bin_dir() / "pg_ctl"), *args, "-D", str(pgdata), "-w", "-l", str(pgdata / "log")],
        user="pgserver" if os.geteuid() == 0 else None,
        check=check,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextmanager
def private_server() -> Iterator[EmbeddedPostgres]:
    """A server of the test's own, which the test may restart or stop (the session's
    server is shared by every test)."""
    with server_dir("sagaflow-pg-own-") as path:
        server = EmbeddedPostgres(path, runtime_dir=RUNTIME_DIR)
        server.start()
        try:
            yield server
        finally:
            if postmaster_pid(server.pgdata) is not None:
                try:
                    server.stop()
                except Exception:
                    pg_ctl(server.pgdata, "stop", "-m", "immediate", check=False)
