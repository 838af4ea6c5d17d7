"""Webhook secrets from Kubernetes Secrets (a Trigger's `hmacSecretRef`/`bearerSecretRef`).

Read when a webhook request arrives, so a rotated Secret applies at once; a value is
kept for a short while (`TTL_SECONDS`) so a burst of requests does not become a burst
of API calls. The operator needs `get` on secrets in the namespaces it serves.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes

from sagaflow.core.trigger_specs import SecretKeyRef
from sagaflow.runtime.triggers import SecretNotFoundError

TTL_SECONDS = 30.0


class KubeSecrets:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        *,
        ttl: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._core = kubernetes.client.CoreV1Api(client)
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="kube-secrets")
        self._ttl, self._clock = ttl, clock
        self._kept: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}

    async def _data(self, namespace: str, name: str) -> dict[str, Any]:
        kept = self._kept.get((namespace, name))
        if kept is not None and kept[1] > self._clock():
            return kept[0]
        call = functools.partial(
            self._core.read_namespaced_secret, name, namespace, _preload_content=False
        )
        try:
            response: Any = await asyncio.get_running_loop().run_in_executor(self._threads, call)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                raise SecretNotFoundError(f"no Secret {namespace}/{name}") from None
            raise
        data: dict[str, Any] = json.loads(response.data).get("data") or {}
        self._kept[(namespace, name)] = (data, self._clock() + self._ttl)
        return data

    async def secret(self, namespace: str, ref: SecretKeyRef) -> bytes:
        value = (await self._data(namespace, ref.name)).get(ref.key)
        if value is None:
            raise SecretNotFoundError(f"no key {ref.key!r} in Secret {namespace}/{ref.name}")
        return base64.b64decode(value)
