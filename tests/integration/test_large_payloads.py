"""A 5 MB step output end to end through `sagaflow run`: stored by reference, passed on
whole to the next step, and shown in status as `outputRef`, never as the payload.

Once with the local file store (the default) and once with SAGAFLOW_PAYLOADS=azureblob
against Azurite. The next step reports the size and SHA-256 of what it received,
which must equal the reference's: the whole value arrived, byte for byte.
"""

from __future__ import annotations

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
from pg import server_dir

RUNNERS = Path(__file__).with_name("payload_runners.py")
SIZE = 5 * 1024 * 1024
MANIFEST = f"""
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {{name: bulk}}
spec:
  steps:
    - {{name: produce, type: bulk.produce, input: {{bytes: {SIZE}}}}}
    - name: measure
      type: bulk.measure
      dependsOn: [produce]
      input: {{data: "${{{{ steps.produce.output }}}}"}}
---
apiVersion: sagaflow.io/v1alpha1
kind: Execution
metadata: {{name: bulk-1}}
spec: {{workflowRef: {{name: bulk}}}}
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
    with server_dir("sagaflow-bulk-") as path:
        yield path / "state"


def run_bulk(state_dir: Path, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    manifest = tmp_path / "bulk.yaml"
    manifest.write_text(MANIFEST)
    run = sagaflow(
        "run", "-f", manifest, "--runners", RUNNERS, "--state-dir", state_dir, "-o", "json",
        env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(run.stdout) < 20_000  # the listing carries references, not 5 MB
    (item,) = json.loads(run.stdout)["items"]
    status = item["status"]
    assert status["phase"] == "Completed", status
    steps = {s["name"]: s for s in status["steps"]}
    produced, measured = steps["produce"], steps["measure"]
    assert "output" not in produced
    ref = produced["outputRef"]
    assert set(ref) == {"uri", "size", "sha256"} and ref["size"] > SIZE - 2000
    # The next step got the whole value through the reference.
    assert measured["output"]["bytes"] == ref["size"]
    assert measured["output"]["sha256"] == ref["sha256"]
    assert measured["output"]["items"] == SIZE // 1003
    assert status["output"] == {"measure": measured["output"]}
    return dict(ref)


@pytest.mark.timeout(300)
def test_a_5mb_output_travels_by_reference_with_the_local_store(
    state_dir: Path, tmp_path: Path
) -> None:
    ref = run_bulk(state_dir, tmp_path, {})
    payloads = (state_dir / "payloads").absolute()
    assert ref["uri"].startswith(payloads.as_uri() + "/")
    assert ref["uri"].endswith("/produce/1/output")
    assert Path(ref["uri"].removeprefix("file://")).stat().st_size == ref["size"]


@pytest.mark.timeout(300)
def test_a_5mb_output_travels_by_reference_through_azure_blob(
    state_dir: Path, tmp_path: Path, azurite: Any
) -> None:
    container = f"bulk{uuid.uuid4().hex[:16]}"
    env = {
        "SAGAFLOW_PAYLOADS": "azureblob",
        "SAGAFLOW_BLOB_CONNECTION_STRING": azurite.connection_string,
        "SAGAFLOW_BLOB_CONTAINER": container,
        "SAGAFLOW_BLOB_CREATE_CONTAINER": "true",
    }
    ref = run_bulk(state_dir, tmp_path, env)
    assert ref["uri"].startswith(f"{azurite.account_url}/{container}/")
    assert not (state_dir / "payloads").exists()  # nothing went to local files
    with ContainerClient.from_connection_string(azurite.connection_string, container) as client:
        blobs = {b.name: b.size for b in client.list_blobs()}
    (name,) = [n for n in blobs if n.endswith("/produce/1/output")]
    assert ref["uri"].endswith(name) and blobs[name] == ref["size"]
