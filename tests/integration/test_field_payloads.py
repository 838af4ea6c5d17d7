"""A step output with one large field, end to end through `sagaflow run`: the field is
stored by reference, the small one stays inline, and later steps read the small one
(`${{ steps.produce.output.sha }}`), get the large one whole
(`${{ steps.produce.output.data }}`) or the whole output, and the run Completes.

Once with the local file store (the default) and once with SAGAFLOW_PAYLOADS=azureblob
against Azurite. The outputs are what the handlers returned: the step that got `data`
reports the length and SHA-256 of what arrived, which must equal what `produce` said.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import ContainerClient
from field_runners import make_data
from pg import server_dir

RUNNERS = Path(__file__).with_name("field_runners.py")
SIZE = 1024 * 1024  # characters of `data`: far over the default 64 KiB threshold
DATA_SHA = hashlib.sha256(make_data(SIZE).encode()).hexdigest()
MANIFEST = f"""
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {{name: fields}}
spec:
  steps:
    - {{name: produce, type: fields.produce, input: {{bytes: {SIZE}}}}}
    - name: check
      type: fields.check
      dependsOn: [produce]
      input: {{sha: "${{{{ steps.produce.output.sha }}}}"}}
    - name: measure
      type: fields.measure
      dependsOn: [produce]
      input: {{data: "${{{{ steps.produce.output.data }}}}"}}
    - name: whole
      type: fields.whole
      dependsOn: [produce]
      input: {{output: "${{{{ steps.produce.output }}}}"}}
---
apiVersion: sagaflow.io/v1alpha1
kind: Execution
metadata: {{name: fields-1}}
spec: {{workflowRef: {{name: fields}}}}
"""


def sagaflow(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, with only the SAGAFLOW_* settings given here."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "sagaflow.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**clean, **env},
        check=False,
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Outside tmp_path, as in test_local_mode: the embedded postgres runs as another user.
    with server_dir("sagaflow-fields-") as path:
        yield path / "state"


def run_fields(state_dir: Path, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run the workflow; check the run and every output; return `data`'s reference."""
    manifest = tmp_path / "fields.yaml"
    manifest.write_text(MANIFEST)
    run = sagaflow(
        "run", "-f", manifest, "--runners", RUNNERS, "--state-dir", state_dir, "-o", "json",
        env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(run.stdout) < 20_000  # the listing carries a reference, not 1 MB
    (item,) = json.loads(run.stdout)["items"]
    status = item["status"]
    assert status["phase"] == "Completed", status
    steps = {s["name"]: s for s in status["steps"]}
    produced = steps["produce"]
    assert "outputRef" not in produced  # only the field went by reference
    assert set(produced["output"]) == {"data", "sha"}
    assert produced["output"]["sha"] == DATA_SHA
    (ref_key,) = produced["output"]["data"]
    assert ref_key == "$sagaflowRef"
    ref = produced["output"]["data"][ref_key]
    assert ref["size"] == SIZE + 2  # the JSON string, quotes included
    assert ref["uri"].endswith("/produce/1/output.data")
    assert steps["check"]["output"] == {"sha": DATA_SHA}
    assert steps["measure"]["output"] == {"length": SIZE, "sha256": DATA_SHA}
    assert steps["whole"]["output"] == {"keys": ["data", "sha"], "matches": True}
    return dict(ref)


@pytest.mark.timeout(300)
def test_a_large_field_travels_by_reference_with_the_local_store(
    state_dir: Path, tmp_path: Path
) -> None:
    ref = run_fields(state_dir, tmp_path, {})
    payloads = (state_dir / "payloads").absolute()
    assert ref["uri"].startswith(payloads.as_uri() + "/")
    stored = Path(ref["uri"].removeprefix("file://"))
    assert stored.stat().st_size == ref["size"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == ref["sha256"]
    assert not stored.with_name("output").exists()  # the output itself was not stored


@pytest.mark.timeout(300)
def test_a_large_field_travels_by_reference_through_azure_blob(
    state_dir: Path, tmp_path: Path, azurite: Any
) -> None:
    container = f"fields{uuid.uuid4().hex[:16]}"
    env = {
        "SAGAFLOW_PAYLOADS": "azureblob",
        "SAGAFLOW_BLOB_CONNECTION_STRING": azurite.connection_string,
        "SAGAFLOW_BLOB_CONTAINER": container,
        "SAGAFLOW_BLOB_CREATE_CONTAINER": "true",
    }
    ref = run_fields(state_dir, tmp_path, env)
    assert ref["uri"].startswith(f"{azurite.account_url}/{container}/")
    assert not (state_dir / "payloads").exists()  # nothing went to local files
    with ContainerClient.from_connection_string(azurite.connection_string, container) as client:
        blobs = {b.name: b.size for b in client.list_blobs()}
    (name,) = [n for n in blobs if "/produce/" in n]  # the field, not the output
    assert name.endswith("/produce/1/output.data") and ref["uri"].endswith(name)
    assert blobs[name] == ref["size"]
