"""Helpers the chart tests share: merging values as Helm does, reading a container's env."""

from __future__ import annotations

import copy
from typing import Any


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Values layered as Helm layers them: maps merge key by key, anything else replaces."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out

    result: dict[str, Any] = {}
    for layer in layers:
        result = merge(result, layer)
    return result


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container["env"]}
