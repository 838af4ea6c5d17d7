"""`HttpClient`: the `Sagaflow` interface over the HTTP API (`--server URL`).

It sends what `app.py` reads and reads what it writes, so a caller gets the same
documents, `Outcome`s and `ApiError`s from a server as from `DirectService` on the
state itself: an error body becomes the `ApiError` it was made from, a refused
control request or signal (409 `Refused`) becomes the refused `Outcome` again, and
a server that cannot be reached is a 503 `Unavailable` naming the URL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from sagaflow.api.contract import ApiError, Outcome, Page, Started, bad_request
from sagaflow.api.openapi import CONTROL_ACTIONS
from sagaflow.runtime.startpath import StartCall

# A request that takes longer than this is given up (the server may still act on it).
TIMEOUT_SECONDS = 60.0


def _seg(value: str) -> str:
    return quote(value, safe="")


class HttpClient:
    def __init__(
        self, base_url: str, token: str | None = None, *, timeout: float = TIMEOUT_SECONDS
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        sent = {**self._headers, **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        url = self.base_url + path
        try:
            async with self._session.request(
                method, url, data=data, params=params, headers=sent
            ) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientConnectionError as exc:
            raise ApiError(
                503, "Unavailable", f"cannot reach the Sagaflow server at {self.base_url}: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise ApiError(
                504, "Timeout", f"the Sagaflow server at {self.base_url} did not answer in time"
            ) from exc
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return status, payload

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        status, payload = await self._request(method, path, **kwargs)
        if status >= 400:
            raise ApiError.from_json(status, payload)
        return payload

    async def start(self, call: StartCall) -> Started:
        body: dict[str, Any] = {"input": call.input}
        if call.name is not None:
            body["name"] = call.name
        if call.correlation_key is not None:
            body["correlationKey"] = call.correlation_key
        headers = _key_header(call.idempotency_key)
        path = f"/v1/namespaces/{_seg(call.namespace)}/workflows/{_seg(call.workflow)}/executions"
        status, payload = await self._request("POST", path, body=body, headers=headers)
        if status >= 400:
            raise ApiError.from_json(status, payload)
        return Started(payload["execution"], created=status == 201)

    async def get_execution(self, namespace: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = await self._call("GET", _execution(namespace, name))
        return found

    async def history(self, namespace: str, name: str) -> list[dict[str, Any]]:
        payload = await self._call("GET", _execution(namespace, name) + "/history")
        rows: list[dict[str, Any]] = payload["items"]
        return rows

    async def state_at(self, namespace: str, name: str, at: datetime) -> dict[str, Any]:
        params = {"at": at.isoformat()}
        found: dict[str, Any] = await self._call(
            "GET", _execution(namespace, name) + "/state", params=params
        )
        return found

    async def list_executions(
        self,
        namespace: str,
        *,
        workflow: str | None = None,
        phase: str | None = None,
        limit: int = 100,
        continue_token: str | None = None,
    ) -> Page:
        params = {"limit": str(limit)}
        for key, value in (("workflow", workflow), ("phase", phase), ("continue", continue_token)):
            if value is not None:
                params[key] = value
        path = f"/v1/namespaces/{_seg(namespace)}/executions"
        payload = await self._call("GET", path, params=params)
        return Page(payload["items"], payload.get("continue"))

    async def list_workflows(self, namespace: str) -> list[dict[str, Any]]:
        payload = await self._call("GET", f"/v1/namespaces/{_seg(namespace)}/workflows")
        items: list[dict[str, Any]] = payload["items"]
        return items

    async def get_workflow_version(self, namespace: str, name: str, version: int) -> dict[str, Any]:
        path = f"/v1/namespaces/{_seg(namespace)}/workflows/{_seg(name)}/versions/{version}"
        found: dict[str, Any] = await self._call("GET", path)
        return found

    async def list_schedules(self, namespace: str) -> list[dict[str, Any]]:
        payload = await self._call("GET", f"/v1/namespaces/{_seg(namespace)}/schedules")
        items: list[dict[str, Any]] = payload["items"]
        return items

    async def signal(
        self, namespace: str, name: str, signal: str, data: Any, signal_id: str | None = None
    ) -> Outcome:
        path = f"{_execution(namespace, name)}/signals/{_seg(signal)}"
        return await self._outcome(path, {"data": data}, _key_header(signal_id))

    async def control(
        self,
        namespace: str,
        name: str,
        verb: str,
        *,
        latest: bool = False,
        steps: Sequence[str] = (),
    ) -> Outcome:
        if verb not in CONTROL_ACTIONS:  # as the service says it, not as a 405 of the route
            verbs = ", ".join(CONTROL_ACTIONS)
            raise bad_request(f"unknown control verb {verb!r}: use one of {verbs}", "verb")
        body: dict[str, Any] = {}
        if verb == "redrive":
            body["latest"] = latest
        elif verb == "skip-compensation":
            body["steps"] = list(steps)
        return await self._outcome(f"{_execution(namespace, name)}:{_seg(verb)}", body)

    async def _outcome(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> Outcome:
        status, payload = await self._request("POST", path, body=body, headers=headers)
        if status == 409 and isinstance(payload, dict) and "execution" in payload:
            error = ApiError.from_json(status, payload)
            if error.reason == "Refused":
                return Outcome("refused", error.message, payload["execution"])
        if status >= 400:
            raise ApiError.from_json(status, payload)
        return Outcome(payload["result"], payload["message"], payload["execution"])

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _execution(namespace: str, name: str) -> str:
    return f"/v1/namespaces/{_seg(namespace)}/executions/{_seg(name)}"


def _key_header(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Idempotency-Key": key}


__all__ = ["TIMEOUT_SECONDS", "HttpClient"]
