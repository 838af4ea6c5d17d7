"""`LocalPayloadStore`: claim-checked payloads as files in one directory.

The store for local mode (the default, `payloads/` in the state dir) and for tests.
Every process that resolves references must see the same directory: the
orchestrator writes step inputs, runners write outputs and read inputs. With
separate machines that means a shared volume, or the Azure Blob store instead.

A payload is the file `directory/<key>`, written to a temporary file beside it,
flushed to disk and renamed into place, so a reader never sees half a payload and
a crash leaves no torn file under a key. Reads check size and SHA-256 against the
reference. File I/O runs in a worker thread: payloads can be tens of megabytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sagaflow.adapters.payloads import PayloadStoreError, check_key, check_prefix, sha256_hex
from sagaflow.core.ports import (
    PayloadIntegrityError,
    PayloadMissingError,
    PayloadRef,
)

_TEMP_PREFIX = "."  # keys never start a segment with '.', so temp names cannot collide


class LocalPayloadStore:
    def __init__(self, directory: Path) -> None:
        # Absolute once, so a reference's file:// URI stays valid whatever the cwd.
        self.directory = directory.absolute()

    async def put(self, key: str, data: bytes) -> PayloadRef:
        path = self.directory / check_key(key)
        try:
            digest = await asyncio.to_thread(_write_atomically, path, data)
        except OSError as exc:
            raise PayloadStoreError(f"writing payload {key!r} to {path} failed: {exc}") from exc
        return PayloadRef(uri=path.as_uri(), size=len(data), sha256=digest)

    async def get(self, ref: PayloadRef) -> bytes:
        path = self._path_of(ref.uri)
        try:
            data = await asyncio.to_thread(_read, path, ref.size)
        except FileNotFoundError as exc:
            raise PayloadMissingError(f"payload {ref.uri} does not exist") from exc
        except OSError as exc:
            raise PayloadStoreError(f"reading payload {ref.uri} failed: {exc}") from exc
        if data is None or len(data) != ref.size:
            raise PayloadIntegrityError(
                f"payload {ref.uri}: size differs from the reference's {ref.size} bytes"
            )
        if sha256_hex(data) != ref.sha256:
            raise PayloadIntegrityError(
                f"payload {ref.uri}: content does not match the reference's SHA-256"
            )
        return data

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        try:
            return await asyncio.to_thread(_delete_prefix, self.directory, prefix)
        except OSError as exc:
            raise PayloadStoreError(f"deleting payloads {prefix!r}* failed: {exc}") from exc

    async def close(self) -> None:
        return None

    def _path_of(self, uri: str) -> Path:
        """The file a reference names; only files inside this store's directory.

        References arrive in messages; one naming any other file (another store, or a
        forged `file:///etc/...`) is treated as not being here.
        """
        parts = urlsplit(uri)
        path = Path(unquote(parts.path))
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise PayloadMissingError(f"payload {uri} is not a file of this store")
        try:
            key = path.relative_to(self.directory).as_posix()
            check_key(key)
        except ValueError as exc:
            raise PayloadMissingError(
                f"payload {uri} is not in this store ({self.directory})"
            ) from exc
        return path


def _write_atomically(path: Path, data: bytes) -> str:
    digest = sha256_hex(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TEMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            # The reference is about to be committed to Postgres or sent on: the
            # bytes must survive a crash of this machine before that happens.
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return digest


def _read(path: Path, expected: int) -> bytes | None:
    """The file's bytes, or None when its size already differs (no need to read it)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size != expected:
            return None
        return handle.read()


def _delete_prefix(root: Path, prefix: str) -> int:
    # Only the folder that holds the prefix's last segment needs walking.
    base = root / prefix.rpartition("/")[0] if "/" in prefix else root
    if not base.is_dir():
        return 0
    deleted = 0
    for folder, dirs, files in os.walk(base, topdown=False):
        here = Path(folder)
        for name in files:
            key = (here / name).relative_to(root).as_posix()
            if name.startswith(_TEMP_PREFIX) or not key.startswith(prefix):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted concurrently
                (here / name).unlink()
                deleted += 1
        # Folders left empty under the prefix go too; others are not ours to touch
        # (a concurrent put may have just created one).
        for name in dirs:
            sub = here / name
            if f"{sub.relative_to(root).as_posix()}/".startswith(prefix):
                with contextlib.suppress(OSError):  # not empty, or already gone
                    sub.rmdir()
    if base != root and f"{base.relative_to(root).as_posix()}/".startswith(prefix):
        with contextlib.suppress(OSError):
            base.rmdir()
    return deleted
