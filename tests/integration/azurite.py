"""Azurite, the Azure Storage emulator, for tests of the Azure Blob payload store.

Installed from npm once into `.cache/azurite` at the repository root (git-ignored;
AZURITE_CACHE_DIR overrides it), under a file lock so parallel test sessions share
one install, then started per test session on a port the OS picks, in memory.
Kept out of `conftest.py` so tests can import the helpers; `conftest.py` turns
`running_azurite` into the session fixture `azurite`.

Flags (see shared/TESTING-NOTES.md): `--skipApiVersionCheck`, or the current SDK's
requests fail with 400; `--inMemoryPersistence`, so nothing is written to disk;
`--blobPort 0`, and the port is read from the line Azurite prints once it listens,
so readiness is an event, not a sleep.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("AZURITE_CACHE_DIR", ROOT / ".cache" / "azurite"))
PACKAGE = "azurite@3"
# The emulator's fixed development account, published in Azurite's documentation:
# it opens nothing but a local emulator.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
NPM_QUIET = ("--no-audit", "--no-fund", "--loglevel=error")
AZURITE_FLAGS = (
    "--inMemoryPersistence",
    "--disableTelemetry",
    "--skipApiVersionCheck",
    "--loose",
    "--silent",
)
_LISTENING = re.compile(r"successfully listens on https?://[^:]+:(\d+)")


@dataclass(frozen=True)
class Azurite:
    port: int

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.account_url};"
        )


def missing_tools() -> str | None:
    """Why Azurite cannot be installed here, or None when it can."""
    absent = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    return f"{' and '.join(absent)} not on PATH: cannot install Azurite" if absent else None


def install(cache: Path = CACHE_DIR, timeout: float = 600) -> Path:
    """The path of `azurite-blob`, installing Azurite into `cache` if it is not there."""
    entry = cache / "node_modules" / ".bin" / "azurite-blob"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache.parent / f"{cache.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing right now
        if not entry.exists():
            result = subprocess.run(
                ["npm", "install", "--prefix", str(cache), PACKAGE, *NPM_QUIET],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0 or not entry.exists():
                raise RuntimeError(
                    f"npm install {PACKAGE} failed ({result.returncode}): {result.stderr[-2000:]}"
                )
    return entry


@contextmanager
def running_azurite(entry: Path, start_timeout: float = 60) -> Iterator[Azurite]:
    """Start Azurite's blob service; stop it afterwards."""
    process = subprocess.Popen(
        ["node", str(entry), "--blobHost", "127.0.0.1", "--blobPort", "0", *AZURITE_FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,  # unbuffered: select() must see every byte that is waiting
    )
    assert process.stdout is not None
    try:
        port = _wait_for_port(process, start_timeout)
        # Keep reading what it prints, so a full pipe can never block the emulator.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield Azurite(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_for_port(process: subprocess.Popen[bytes], timeout: float) -> int:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        chunk = os.read(fd, 65536)
        if not chunk:  # it exited
            break
        seen += chunk
        if match := _LISTENING.search(seen.decode(errors="replace")):
            return int(match.group(1))
    text = seen.decode(errors="replace")[-2000:]
    raise RuntimeError(f"Azurite did not start (rc={process.poll()}): {text}")
