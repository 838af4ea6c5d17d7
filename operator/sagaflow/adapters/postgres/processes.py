"""Processes as the embedded server and the bus's receivers see them: alive or not.

Both need to know whether a process that registered itself somewhere (a pid in
pgserver's handle file, a receiver row of the bus) still runs. A pid alone is not
enough: pids are reused, and in containers each pid namespace counts from 1. So a
process is named by where its pid means something (the kernel's boot id and its pid
namespace), its pid, and its start time; only a process with the same `host` can
judge the others, and a pid that now belongs to a later process counts as gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None (no /proc, gone)."""
    with contextlib.suppress(OSError, IndexError):
        # The state follows the parenthesised command name, which may hold spaces.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return None


def process_state(pid: int) -> str | None:
    """None when gone, "Z" for a zombie (dead, not yet reaped), else another letter."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    fields = _stat_fields(pid)
    return fields[0] if fields else "?"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    return process_state(pid) not in (None, "Z")


def _start_ticks(pid: int | str) -> int:
    """When the process started, in clock ticks since boot (0 where /proc is missing)."""
    fields = _stat_fields(pid)
    # Field 22 of stat; fields[0] here is field 3 (the state).
    return int(fields[19]) if fields and len(fields) > 19 else 0


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    host: str  # boot id + pid namespace: where `pid` can be checked
    hostname: str  # for people reading logs
    pid: int
    started: int


@cache
def this_process() -> ProcessIdentity:
    return ProcessIdentity(_host(), socket.gethostname(), os.getpid(), _start_ticks("self"))


def _host() -> str:
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")
    if not boot or not namespace:
        # Without /proc there is no safe way to judge another process: a host of its own.
        return f"unknown:{socket.gethostname()}:{os.getpid()}"
    return f"{boot}/{namespace}"


def still_running(pid: int, started: int) -> bool:
    """Whether the process `pid` that started at `started` (ticks) runs on this host."""
    if not pid_alive(pid):
        return False
    return started == 0 or _start_ticks(pid) in (0, started)
