"""Both payload stores against the real thing: files on disk, and Azure Blob on Azurite.

Each contract test runs for both stores: round trips from 1 byte to 50 MB, typed
errors for missing and tampered payloads, delete_prefix, key rules. Azure-only
tests cover the container (created when asked, a clear error when not), SAS URLs
and the translation of SDK errors.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from azure.core.exceptions import AzureError
from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
from azure.storage.blob.aio import ContainerClient
from azurite import ACCOUNT, ACCOUNT_KEY, Azurite

from sagaflow.adapters.payloads import PayloadStoreError
from sagaflow.adapters.payloads.azure_blob import AzureBlobPayloadStore
from sagaflow.adapters.payloads.local import LocalPayloadStore
from sagaflow.core.ports import (
    PayloadIntegrityError,
    PayloadMissingError,
    PayloadRef,
    PayloadStore,
)

# The first Azure test may install Azurite from npm (about 15 s, more on a slow link).
pytestmark = pytest.mark.timeout(300)

MB = 1024 * 1024
THRESHOLD = 64 * 1024  # SAGAFLOW_PAYLOAD_THRESHOLD_BYTES' default
SIZES = {"1B": 1, "threshold": THRESHOLD, "5MB": 5 * MB, "50MB": 50 * MB}


@dataclass
class Harness:
    """A store plus a way around it, to damage what it stored as an intruder would."""

    kind: str
    store: PayloadStore
    overwrite: Callable[[str, bytes], Awaitable[None]]


def payload(size: int) -> bytes:
    # Not one repeated byte: a store that mixed up chunks would still hash differently.
    block = hashlib.sha256(str(size).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def unique_container() -> str:
    return f"t{uuid.uuid4().hex[:20]}"


@pytest.fixture(params=["local", "azureblob"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "local":
        root = tmp_path / "payloads"

        async def overwrite_file(key: str, data: bytes) -> None:
            (root / key).write_bytes(data)

        yield Harness("local", LocalPayloadStore(root), overwrite_file)
        return
    azurite: Azurite = request.getfixturevalue("azurite")
    name = unique_container()
    store = AzureBlobPayloadStore.from_connection_string(
        azurite.connection_string, name, create_container=True
    )
    raw = ContainerClient.from_connection_string(azurite.connection_string, name)

    async def overwrite_blob(key: str, data: bytes) -> None:
        await raw.upload_blob(key, data, overwrite=True)  # no sha256 metadata

    try:
        yield Harness("azureblob", store, overwrite_blob)
    finally:
        await raw.close()
        await store.close()


# ---------------------------------------------------------------- both stores


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_round_trip(harness: Harness, size: int) -> None:
    data = payload(size)
    started = time.perf_counter()
    ref = await harness.store.put(f"exec-1/step/1/size-{size}", data)
    stored = time.perf_counter()
    back = await harness.store.get(ref)
    done = time.perf_counter()
    assert back == data
    assert ref.size == size and ref.sha256 == hashlib.sha256(data).hexdigest()
    # Shown with `pytest -s`: what a round trip costs on this machine.
    print(
        f"\n{harness.kind} {size} B: put {stored - started:.3f}s, get {done - stored:.3f}s",
        end="",
    )


async def test_a_reference_names_the_payload_and_a_rewrite_replaces_it(
    harness: Harness,
) -> None:
    first = await harness.store.put("exec-1/a/1/output", b'{"v":1}')
    second = await harness.store.put("exec-1/a/1/output", b'{"v":22}')
    assert first.uri == second.uri  # one key, one place
    assert urlsplit(first.uri).scheme == ("file" if harness.kind == "local" else "http")
    assert unquote(first.uri).endswith("/exec-1/a/1/output")
    assert await harness.store.get(second) == b'{"v":22}'
    with pytest.raises(PayloadIntegrityError):  # the old reference no longer matches
        await harness.store.get(first)


async def test_a_missing_payload_is_payload_missing_naming_the_uri(harness: Harness) -> None:
    ref = await harness.store.put("exec-2/s/1/output", b"x")
    assert await harness.store.delete_prefix("exec-2/") == 1
    with pytest.raises(PayloadMissingError, match=f"payload {ref.uri} does not exist"):
        await harness.store.get(ref)


@pytest.mark.parametrize(
    "uri", ["file:///etc/passwd", "http://elsewhere.example/c/exec/s/1/output"]
)
async def test_a_reference_to_another_place_is_not_read(harness: Harness, uri: str) -> None:
    with pytest.raises(PayloadMissingError, match=r"not .*this store"):
        await harness.store.get(PayloadRef(uri, 10, "0" * 64))


async def test_a_reference_that_climbs_out_of_the_store_is_not_read(harness: Harness) -> None:
    ref = await harness.store.put("exec-3/s/1/output", b"x")
    sneaky = ref.uri.replace("exec-3/s/1/output", "exec-3/../../../etc/passwd")
    with pytest.raises(PayloadMissingError):
        await harness.store.get(PayloadRef(sneaky, ref.size, ref.sha256))


@pytest.mark.parametrize("damage", ["same size", "shorter", "longer"])
async def test_tampered_content_is_payload_integrity(harness: Harness, damage: str) -> None:
    data = payload(300_000)
    ref = await harness.store.put("exec-4/s/1/output", data)
    forged = {
        "same size": bytes([data[0] ^ 1]) + data[1:],
        "shorter": data[:-1],
        "longer": data + b"!",
    }[damage]
    await harness.overwrite("exec-4/s/1/output", forged)
    with pytest.raises(PayloadIntegrityError, match=ref.uri):
        await harness.store.get(ref)


async def test_delete_prefix_removes_exactly_the_keys_under_it(harness: Harness) -> None:
    keys = ["ex-1/a/1/input", "ex-1/a/1/output", "ex-1/b/2/output", "ex-10/a/1/output"]
    refs = {k: await harness.store.put(k, k.encode()) for k in keys}
    assert await harness.store.delete_prefix("ex-1/a/") == 2
    assert await harness.store.delete_prefix("ex-1/") == 1  # "ex-10" is not under "ex-1/"
    assert await harness.store.delete_prefix("ex-1/") == 0
    assert await harness.store.delete_prefix("nobody/") == 0
    for key in keys[:3]:
        with pytest.raises(PayloadMissingError):
            await harness.store.get(refs[key])
    assert await harness.store.get(refs["ex-10/a/1/output"]) == b"ex-10/a/1/output"


@pytest.mark.parametrize(
    "key", ["", "/abs/key", "../escape", "a/../b", "a/./b", "a//b", "a/.hidden", "a\\b", "a/"]
)
async def test_unsafe_keys_are_refused(harness: Harness, key: str) -> None:
    with pytest.raises(ValueError, match="invalid payload key"):
        await harness.store.put(key, b"x")


@pytest.mark.parametrize("prefix", ["", "/", "../", "a//"])
async def test_unsafe_prefixes_are_refused(harness: Harness, prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid payload prefix"):
        await harness.store.delete_prefix(prefix)


# ---------------------------------------------------------------- local files


async def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = LocalPayloadStore(tmp_path / "p")
    for n in range(3):
        await store.put("e/s/1/output", payload(1000 * (n + 1)))
    assert sorted(os.listdir(tmp_path / "p" / "e" / "s" / "1")) == ["output"]


async def test_local_store_errors_are_typed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = LocalPayloadStore(blocker)
    with pytest.raises(PayloadStoreError, match="writing payload") as caught:
        await store.put("e/s/1/output", b"x")
    assert isinstance(caught.value.__cause__, OSError)


# ---------------------------------------------------------------- Azure Blob


async def test_the_container_is_created_when_asked(azurite: Azurite) -> None:
    name = unique_container()
    store = AzureBlobPayloadStore.from_connection_string(
        azurite.connection_string, name, create_container=True
    )
    raw = ContainerClient.from_connection_string(azurite.connection_string, name)
    try:
        assert not await raw.exists()
        ref = await store.put("e/s/1/output", b"hello")
        assert await raw.exists()
        assert await store.get(ref) == b"hello"
        props = await raw.get_blob_client("e/s/1/output").get_blob_properties()
        assert props.metadata["sha256"] == ref.sha256  # checkable with the blob alone
    finally:
        await raw.close()
        await store.close()


async def test_a_missing_container_is_a_clear_error_when_not_asked_to_create(
    azurite: Azurite,
) -> None:
    name = unique_container()
    store = AzureBlobPayloadStore.from_connection_string(azurite.connection_string, name)
    try:
        with pytest.raises(PayloadStoreError) as caught:
            await store.put("e/s/1/output", b"hello")
        message = str(caught.value)
        assert f"container {name!r} does not exist" in message
        assert "SAGAFLOW_BLOB_CREATE_CONTAINER=true" in message
        assert isinstance(caught.value.__cause__, AzureError)
        ref = PayloadRef(f"{store.base_url}e/s/1/output", 5, "0" * 64)
        with pytest.raises(PayloadMissingError, match="container is missing"):
            await store.get(ref)
        assert await store.delete_prefix("e/") == 0
    finally:
        await store.close()


async def test_forged_metadata_does_not_pass_for_the_content(azurite: Azurite) -> None:
    name = unique_container()
    store = AzureBlobPayloadStore.from_connection_string(
        azurite.connection_string, name, create_container=True
    )
    raw = ContainerClient.from_connection_string(azurite.connection_string, name)
    try:
        ref = await store.put("e/s/1/output", b"genuine")
        await raw.upload_blob(
            "e/s/1/output", b"forgery", overwrite=True, metadata={"sha256": ref.sha256}
        )
        with pytest.raises(PayloadIntegrityError, match="content does not match"):
            await store.get(ref)
    finally:
        await raw.close()
        await store.close()


async def test_an_account_url_with_a_sas_token(azurite: Azurite) -> None:
    sas = generate_account_sas(
        ACCOUNT,
        ACCOUNT_KEY,
        resource_types=ResourceTypes(container=True, object=True),
        permission=AccountSasPermissions(
            read=True, write=True, delete=True, list=True, create=True
        ),
        expiry=time.time() + 3600,  # type: ignore[arg-type]
    )
    store = AzureBlobPayloadStore.from_account_url(
        f"{azurite.account_url}?{sas}", unique_container(), create_container=True
    )
    try:
        ref = await store.put("e/s/1/output", payload(9 * MB))  # past one PUT: blocks
        assert "sig=" not in ref.uri  # the secret never lands in state or status
        assert await store.get(ref) == payload(9 * MB)
        assert await store.delete_prefix("e/") == 1
    finally:
        await store.close()


async def test_an_account_url_without_a_token_uses_the_default_credential() -> None:
    store = AzureBlobPayloadStore.from_account_url(
        "https://example.blob.core.windows.net", "payloads"
    )
    owned = store._owned
    assert [type(o).__name__ for o in owned] == ["BlobServiceClient", "DefaultAzureCredential"]
    assert store.base_url == "https://example.blob.core.windows.net/payloads/"
    await store.close()  # closes the credential it made, without any request


async def test_sdk_errors_are_translated_with_their_cause(azurite: Azurite) -> None:
    # Nothing listens on this endpoint; no SDK retries, so the error comes at once.
    closed = azurite.connection_string.replace(str(azurite.port), "1")
    container = ContainerClient.from_connection_string(closed, "c", retry_total=0)
    store = AzureBlobPayloadStore(container)
    try:
        with pytest.raises(PayloadStoreError, match="storing payload 'e/s/1/output' failed"):
            await store.put("e/s/1/output", b"x")
        with pytest.raises(PayloadStoreError, match="reading payload") as caught:
            await store.get(PayloadRef(f"{store.base_url}e/s/1/output", 1, "0" * 64))
        assert isinstance(caught.value.__cause__, AzureError)
        with pytest.raises(PayloadStoreError, match="deleting payloads"):
            await store.delete_prefix("e/")
    finally:
        await store.close()
