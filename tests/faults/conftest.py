"""The fault suite: `sagaflow run` and `sagaflow runner` as processes, killed, signalled
and starved of their database, with handlers that log every call (`fault_runners.py`).
Each test counts what happened: lost, stuck, applied twice, run twice at once."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.fault)
