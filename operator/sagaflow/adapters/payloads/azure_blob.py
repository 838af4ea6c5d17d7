"""`AzureBlobPayloadStore`: claim-checked payloads as blobs in one Azure Storage container.

The production store: the orchestrator and every runner reach the same container,
wherever they run. A payload is the block blob named by its key; its reference's
URI is the blob URL without any SAS query (state and status are read by people:
no secret may land there). The SHA-256 is kept in the blob's metadata too, so the
content can be checked with nothing but the blob, but a read always hashes what it
downloaded: metadata can be overwritten along with the content.

Three ways in, matching the settings: a connection string, an account URL with
`DefaultAzureCredential` (managed identity, workload identity, az login), or an
account URL carrying a SAS token. The container is created before the first write
only when `create_container` is set; otherwise a missing container is a clear
error, because creating storage is usually an operator's decision, not the app's.
(Before, not on failure: a multi-block upload into a missing container fails in
each of the SDK's parallel block tasks, and the ones nobody awaits are logged.)

Large payloads move in 4 MiB blocks, `max_concurrency` at a time, through the SDK's
chunked upload and download. Every SDK exception is translated here, its cause kept:
a missing blob is PayloadMissingError, anything else PayloadStoreError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.identity.aio import DefaultAzureCredential
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient, ExponentialRetry

from sagaflow.adapters.payloads import PayloadStoreError, check_key, check_prefix, sha256_hex
from sagaflow.core.ports import PayloadIntegrityError, PayloadMissingError, PayloadRef

log = logging.getLogger("sagaflow.payloads")

MiB = 1024 * 1024
# The SDK sends up to 64 MiB in one PUT and reads up to 32 MiB in one GET by
# default: one slow request that restarts from zero on a blip. Blocks of 4 MiB
# travel in parallel and are retried one by one.
_TRANSFER: dict[str, Any] = {
    "max_single_put_size": 8 * MiB,
    "max_block_size": 4 * MiB,
    "max_single_get_size": 8 * MiB,
    "max_chunk_get_size": 4 * MiB,
}
# The SDK's default backoff (15 s, then 18 s, 24 s) suits batch jobs; here a caller
# waits inside a step attempt or an orchestrator transaction, and both have their
# own retries (step retry policy, message redelivery). Fail within seconds instead.
_RETRY: dict[str, Any] = {"initial_backoff": 1, "increment_base": 2, "retry_total": 3}
_DELETE_CONCURRENCY = 16
_DELETE_PAGE = 256
# Hashing this much takes long enough to stall the event loop: do it in a thread.
_HASH_IN_THREAD = 1 * MiB


class AzureBlobPayloadStore:
    def __init__(
        self,
        container: ContainerClient,
        *,
        create_container: bool = False,
        max_concurrency: int = 4,
        owned: tuple[Any, ...] = (),
    ) -> None:
        """Use `container`; `owned` are clients and credentials `close` closes too."""
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._container = container
        self._create_container = create_container
        self._concurrency = max_concurrency
        self._owned = owned
        self._base = _without_query(container.url).rstrip("/") + "/"
        self._container_ready = not create_container  # nothing to prepare otherwise

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        container: str,
        *,
        create_container: bool = False,
        max_concurrency: int = 4,
    ) -> AzureBlobPayloadStore:
        service = BlobServiceClient.from_connection_string(
            connection_string, retry_policy=ExponentialRetry(**_RETRY), **_TRANSFER
        )
        return cls(
            service.get_container_client(container),
            create_container=create_container,
            max_concurrency=max_concurrency,
            owned=(service,),
        )

    @classmethod
    def from_account_url(
        cls,
        account_url: str,
        container: str,
        *,
        create_container: bool = False,
        max_concurrency: int = 4,
        credential: AsyncTokenCredential | None = None,
    ) -> AzureBlobPayloadStore:
        """An account URL with a SAS token in its query uses that token; without one,
        `credential`, or else a DefaultAzureCredential that `close` closes."""
        owned: list[Any] = []
        if credential is None and not _has_sas(account_url):
            credential = DefaultAzureCredential()
            owned.append(credential)
        service = BlobServiceClient(
            account_url,
            credential=credential,
            retry_policy=ExponentialRetry(**_RETRY),
            **_TRANSFER,
        )
        owned.insert(0, service)  # clients close before the credential they use
        return cls(
            service.get_container_client(container),
            create_container=create_container,
            max_concurrency=max_concurrency,
            owned=tuple(owned),
        )

    # -- the PayloadStore port -------------------------------------------------------
    async def put(self, key: str, data: bytes) -> PayloadRef:
        blob = self._container.get_blob_client(check_key(key))
        digest = await _sha256(data)
        if not self._container_ready:
            await self._prepare_container()
        try:
            await self._upload(blob, data, digest)
        except ResourceNotFoundError as exc:
            if _code(exc) != "ContainerNotFound":
                raise self._failed(f"storing payload {key!r}", exc) from exc
            if not self._create_container:
                raise PayloadStoreError(
                    f"container {self._container.container_name!r} does not exist at "
                    f"{self._base}: create it, or let sagaflow create it "
                    "(SAGAFLOW_BLOB_CREATE_CONTAINER=true)"
                ) from exc
            await self._translated(f"creating container at {self._base}", self._ensure_container)
            await self._translated(
                f"storing payload {key!r}", lambda: self._upload(blob, data, digest)
            )
        except AzureError as exc:
            raise self._failed(f"storing payload {key!r}", exc) from exc
        return PayloadRef(uri=_without_query(blob.url), size=len(data), sha256=digest)

    async def get(self, ref: PayloadRef) -> bytes:
        blob = self._container.get_blob_client(self._name_of(ref.uri))
        try:
            download = await blob.download_blob(max_concurrency=self._concurrency)
            # Both checks come from the first response: a blob of the wrong size or
            # with another recorded hash is not downloaded in full.
            if download.size != ref.size:
                raise PayloadIntegrityError(
                    f"payload {ref.uri}: {download.size} bytes stored, the reference "
                    f"says {ref.size}"
                )
            recorded = (download.properties.metadata or {}).get("sha256")
            if recorded is not None and recorded != ref.sha256:
                raise PayloadIntegrityError(
                    f"payload {ref.uri}: the blob records another SHA-256 than the reference"
                )
            data = await download.readall()
        except ResourceNotFoundError as exc:
            where = " (its container is missing)" if _code(exc) == "ContainerNotFound" else ""
            raise PayloadMissingError(f"payload {ref.uri} does not exist{where}") from exc
        except AzureError as exc:
            raise self._failed(f"reading payload {ref.uri}", exc) from exc
        if len(data) != ref.size or await _sha256(data) != ref.sha256:
            raise PayloadIntegrityError(
                f"payload {ref.uri}: content does not match the reference's SHA-256"
            )
        return data

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        deleted = 0
        page: list[str] = []
        try:
            async for name in self._container.list_blob_names(name_starts_with=prefix):
                page.append(name)
                if len(page) >= _DELETE_PAGE:
                    deleted += await self._delete(page)
                    page = []
            deleted += await self._delete(page)
        except ResourceNotFoundError as exc:
            if _code(exc) != "ContainerNotFound":
                raise self._failed(f"deleting payloads {prefix!r}*", exc) from exc
            # No container, no payloads.
        except AzureError as exc:
            raise self._failed(f"deleting payloads {prefix!r}*", exc) from exc
        return deleted

    async def close(self) -> None:
        await self._container.close()
        for resource in self._owned:
            await resource.close()

    # -- helpers ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The container's URL (no query) that every reference URI of this store starts with."""
        return self._base

    async def _upload(self, blob: BlobClient, data: bytes, digest: str) -> None:
        await blob.upload_blob(
            data,
            length=len(data),
            overwrite=True,  # a repeated attempt writes the same key: last one wins
            metadata={"sha256": digest},
            max_concurrency=self._concurrency,
        )

    async def _prepare_container(self) -> None:
        # Best effort: a credential allowed to write blobs but not to create
        # containers still works when the container exists; if it does not, the
        # upload's own error says so.
        try:
            await self._ensure_container()
        except AzureError as exc:
            log.debug("creating container %s failed, trying the upload: %s", self._base, exc)
        self._container_ready = True

    async def _ensure_container(self) -> None:
        # Created meanwhile by another process: just as good.
        with contextlib.suppress(ResourceExistsError):
            await self._container.create_container()

    async def _delete(self, names: list[str]) -> int:
        limit = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def one(name: str) -> int:
            async with limit:
                try:
                    await self._container.delete_blob(name, delete_snapshots="include")
                except ResourceNotFoundError:
                    return 0  # deleted concurrently: not ours to count
                return 1

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(r for r in results if isinstance(r, int))

    async def _translated(self, doing: str, call: Callable[[], Awaitable[None]]) -> None:
        try:
            await call()
        except AzureError as exc:
            raise self._failed(doing, exc) from exc

    def _failed(self, doing: str, exc: AzureError) -> PayloadStoreError:
        # The SDK's message can run to many lines (the whole XML error); the first
        # one names the problem, the full text stays on __cause__.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return PayloadStoreError(f"{doing} failed: {first}")

    def _name_of(self, uri: str) -> str:
        """The blob a reference names; only blobs of this store's container.

        References arrive in messages: one naming another account or container (a
        changed configuration, a forged URI) is treated as not being here.
        """
        if not uri.startswith(self._base):
            raise PayloadMissingError(f"payload {uri} is not in this store ({self._base})")
        try:
            return check_key(unquote(uri[len(self._base) :]))
        except ValueError as exc:
            raise PayloadMissingError(f"payload {uri} is not in this store: {exc}") from exc


async def _sha256(data: bytes) -> str:
    if len(data) >= _HASH_IN_THREAD:
        return await asyncio.to_thread(sha256_hex, data)
    return sha256_hex(data)


def _code(exc: AzureError) -> str | None:
    # The storage SDK attaches the service's error code (x-ms-error-code) at run time.
    code = getattr(exc, "error_code", None)
    return str(code) if code is not None else None


def _has_sas(url: str) -> bool:
    return "sig=" in urlsplit(url).query


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment=""))
