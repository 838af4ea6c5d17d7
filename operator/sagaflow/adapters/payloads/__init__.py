"""Payload stores: where claim-checked payloads live (the `PayloadStore` port).

`local.LocalPayloadStore` keeps files in a directory (local mode, tests, a shared
volume); `azure_blob.AzureBlobPayloadStore` keeps blobs in an Azure Storage
container. Both name a payload by its key, verify size and SHA-256 on every read
and report problems with the port's typed errors, so callers never handle an OS or
SDK exception. This package owns what the two share: the key rules and the error
for a store that failed (as opposed to a payload that is missing or corrupt).

The implementations are imported from their modules, not from here, so a process
that uses only local files never imports the Azure SDK.
"""

from __future__ import annotations

import hashlib

from sagaflow.core.ports import PayloadError

# Azure's limit on blob names; files get the same, so a key works in either store.
MAX_KEY_LENGTH = 1024


class PayloadStoreError(PayloadError):
    """The store itself failed (unreachable, refused, misconfigured).

    Unlike PayloadMissingError and PayloadIntegrityError this says nothing about the
    payload: trying again (or fixing the configuration) may well succeed.
    """


def check_key(key: str) -> str:
    """Return `key` if it is a safe payload key, else raise ValueError.

    Keys are relative, `/`-separated paths (`<execution>/<step>/<attempt>/output`):
    no empty segment, no segment starting with '.' (which also rules out `.` and
    `..`, and keeps the local store's temporary files out of the key space), no
    backslash or control character. The same key then means the same thing as a file
    path and as a blob name, and cannot escape the store's directory.
    """
    _check(key, "key")
    if key.endswith("/"):
        raise ValueError(f"invalid payload key {key!r}: must not end with '/'")
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is a safe, non-empty key prefix (for delete_prefix)."""
    # An empty prefix would delete every payload: never what a caller means.
    _check(prefix.removesuffix("/"), "prefix")
    return prefix


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(text: str, what: str) -> None:
    if not isinstance(text, str) or not text:
        raise ValueError(f"invalid payload {what}: must be a non-empty string")
    if len(text) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid payload {what}: longer than {MAX_KEY_LENGTH} characters")
    if "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"invalid payload {what} {text!r}: no backslashes or control characters")
    for segment in text.split("/"):
        if not segment:
            raise ValueError(
                f"invalid payload {what} {text!r}: relative path without empty segments "
                "(no leading '/', no '//')"
            )
        if segment.startswith("."):
            raise ValueError(
                f"invalid payload {what} {text!r}: no segment may start with '.' (no '.' or '..')"
            )
