"""Build the payload store and the claim check from settings, for the local commands.

`SAGAFLOW_PAYLOADS=local` (the default) keeps payloads as files in
SAGAFLOW_PAYLOAD_DIR, else `payloads/` in the state dir; every process that runs
steps of the same executions must see that folder. `SAGAFLOW_PAYLOADS=azureblob`
uses SAGAFLOW_BLOB_CONTAINER through SAGAFLOW_BLOB_CONNECTION_STRING, or through
SAGAFLOW_BLOB_ACCOUNT_URL (with a SAS token in it, or azure-identity's default
credential). Composition only: `sagaflow run`, `sagaflow runner` and `sagaflow prune`
call this so they agree on where payloads live.
"""

from __future__ import annotations

from pathlib import Path

from sagaflow.adapters.payloads.local import LocalPayloadStore
from sagaflow.core.ports import PayloadStore
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow.settings import Settings
from sagaflow.wiring.problems import InvalidInputError


def make_payload_store(settings: Settings, state_dir: Path) -> PayloadStore:
    """The configured store; InvalidInputError (exit 2) for a value the SDK rejects."""
    if settings.payloads == "local":
        return LocalPayloadStore(settings.payload_dir or state_dir / "payloads")
    # Imported here: a local-files setup never loads the Azure SDK.
    from sagaflow.adapters.payloads.azure_blob import AzureBlobPayloadStore

    try:
        if settings.blob_connection_string is not None:
            return AzureBlobPayloadStore.from_connection_string(
                settings.blob_connection_string.get_secret_value(),
                settings.blob_container,
                create_container=settings.blob_create_container,
            )
        assert settings.blob_account_url is not None  # the settings validator ensures one
        return AzureBlobPayloadStore.from_account_url(
            settings.blob_account_url,
            settings.blob_container,
            create_container=settings.blob_create_container,
        )
    except ValueError as exc:
        # The SDK's message never includes the secret; the variable name says where.
        variable = (
            "SAGAFLOW_BLOB_CONNECTION_STRING"
            if settings.blob_connection_string is not None
            else "SAGAFLOW_BLOB_ACCOUNT_URL"
        )
        raise InvalidInputError([f"{variable}: {exc}"]) from exc


def make_claim_check(settings: Settings, state_dir: Path) -> ClaimCheck:
    """The claim check for this process: the configured store and threshold."""
    return ClaimCheck(make_payload_store(settings, state_dir), settings.payload_threshold_bytes)
