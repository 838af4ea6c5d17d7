"""The embedded Postgres server: a real PostgreSQL from the `pgserver` wheel.

Local runs and the tests need a real Postgres without Docker or an install, so this
module owns starting, attaching to and stopping the server that lives in one data
directory. Layout under `data_dir`: `pgdata/` (the cluster, also its unix-socket
folder) and `run/` (pgserver's runtime folder with its inter-process lock, unless
another `runtime_dir` is given: processes sharing a data directory must share it).

pgserver counts the processes holding a server in `pgdata/.handle_pids.json` and
stops the server when the last one lets go. A process killed with -9 never lets go:
its postgres keeps running and its pid stays in that file, so no later owner would
ever stop the server. `start()` therefore drops dead pids before attaching.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from sagaflow.adapters.postgres.processes import pid_alive, process_state

__all__ = ["EmbeddedPostgres", "pg_bin_dir", "pid_alive", "postmaster_pid"]

_HANDLE_FILE = ".handle_pids.json"
_REAP_TIMEOUT = 10.0


def pg_bin_dir() -> Path:
    """The wheel's folder of Postgres programs (pg_ctl, pgbench, psql, ...)."""
    # Found without importing pgserver: importing it fixes its runtime folder for
    # the whole process, which only EmbeddedPostgres should decide.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _import_pgserver(runtime_dir: Path) -> Any:
    """Import pgserver with XDG_RUNTIME_DIR pointing at `runtime_dir`.

    pgserver reads the variable once, at import, to place its lock file; it is set
    only around the import so the rest of the process keeps its environment. Later
    instances in the same process share the first one's runtime folder.
    """
    if "pgserver" in sys.modules:
        return sys.modules["pgserver"]
    runtime_dir.mkdir(parents=True, exist_ok=True)
    # platformdirs ignores a runtime folder others can read (XDG spec: mode 0700).
    runtime_dir.chmod(0o700)
    previous = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)
    try:
        import pgserver

        return pgserver
    except ImportError as exc:
        raise RuntimeError(
            "the embedded Postgres (pgserver) is not installed on this platform: "
            "set SAGAFLOW_DATABASE_URL to an external Postgres"
        ) from exc
    finally:
        if previous is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = previous


def _postmaster_file_pid(pgdata: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    return None


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid in `postmaster.pid` when that process is alive, else None."""
    pid = _postmaster_file_pid(pgdata)
    return pid if pid is not None and pid_alive(pid) else None


def _wait_for_reaping(pgdata: Path, timeout: float = _REAP_TIMEOUT) -> None:
    """A crashed server stays a zombie until init reaps it, and both pgserver and
    postgres take a zombie in `postmaster.pid` for a running server: wait it out."""
    pid = _postmaster_file_pid(pgdata)
    deadline = time.monotonic() + timeout
    while pid is not None and process_state(pid) == "Z" and time.monotonic() < deadline:
        time.sleep(0.05)


def _drop_dead_handles(pgdata: Path) -> None:
    """Forget holders that died without letting go (kill -9), so the last live
    holder stops the server again."""
    path = pgdata / _HANDLE_FILE
    if not path.exists():
        return
    pids = json.loads(path.read_text() or "[]")
    alive = [pid for pid in pids if pid_alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _forget_released(pgserver: Any, pgdata: Path) -> None:
    """pgserver caches one handle per data directory and process, and hands the cached
    one out again even after this process let go of it (while another process kept
    the server): then this process would not count as a holder. Drop such a handle."""
    cached = pgserver.PostgresServer._instances.get(pgdata)
    if cached is not None and os.getpid() not in cached.global_process_id_list.get():
        del pgserver.PostgresServer._instances[pgdata]


class EmbeddedPostgres:
    """One Postgres server in `data_dir`, started on demand and shared by processes.

    `start()` attaches to a server already running in the data directory (one left
    by a killed owner included) or starts one; `stop()` stops it unless another live
    process still holds it. Use one instance per data directory in a process.
    """

    def __init__(self, data_dir: Path, *, runtime_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.runtime_dir = runtime_dir or self.data_dir / "run"
        self._server: Any = None
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return self._dsn

    def start(self) -> str:
        """Start or attach; return an asyncpg DSN (unix socket, user postgres)."""
        if self._dsn is not None:
            return self._dsn
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pgserver = _import_pgserver(self.runtime_dir)
        # Under pgserver's own inter-process lock, so a concurrent start in another
        # process cannot register itself between our read and our write.
        with pgserver.PostgresServer._lock:
            _drop_dead_handles(self.pgdata)
            _wait_for_reaping(self.pgdata)
            _forget_released(pgserver, self.pgdata)
            # pgserver creates the folder with "exists? then mkdir": made here first, that
            # cannot fail with FileExistsError when two starts meet.
            self.pgdata.mkdir(exist_ok=True)
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self._dsn = str(self._server.get_uri())
        return self._dsn

    def stop(self) -> None:
        """Let go of the server; it stops when no other live process holds it."""
        if self._server is None:
            return
        server, self._server, self._dsn = self._server, None, None
        server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
