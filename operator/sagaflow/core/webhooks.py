"""Who may call a webhook Trigger: HMAC signatures and bearer secrets, checked purely.

A webhook (`POST /v1/namespaces/{ns}/webhooks/{path}`) is open to the network, so a
request is believed only when it proves it knows the Trigger's secret
(`trigger_specs.WebhookAuth`):

- HMAC-SHA256 (GitHub's form): the configured header (default `X-Signature-256`)
  holds `sha256=<hex>` over the raw body, or over `<timestamp>.<raw body>` when
  `timestampHeader` names a header with the sender's Unix time; then the time must
  lie within `maxSkew` of ours (`now` is passed in), so a captured request cannot be
  replayed later. Inside the window a replay is the same event: its idempotency key
  (`request_key`) finds the run the first delivery started;
- a bearer secret: `Authorization: Bearer <secret>`.

Comparisons are constant-time (`hmac.compare_digest`). A refusal is `WebhookRefused`
with HTTP status 401 and a reason word; its message says what was wrong with the
request, never what the right value would have been. `secret_document` reads a `kind: Secret`
document (for `sagaflow server`, whose secrets are files).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from sagaflow.core.durations import parse_duration
from sagaflow.core.trigger_specs import WebhookAuth
from sagaflow.core.triggers import Outcome

_SIGNATURE = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
_BEARER = re.compile(r"^[Bb]earer +(\S.*)$")


class Refusal(StrEnum):
    MISSING_SIGNATURE = "MissingSignature"
    BAD_SIGNATURE_FORMAT = "BadSignatureFormat"
    SIGNATURE_MISMATCH = "SignatureMismatch"
    MISSING_TIMESTAMP = "MissingTimestamp"
    BAD_TIMESTAMP = "BadTimestamp"
    STALE_TIMESTAMP = "StaleTimestamp"
    MISSING_BEARER = "MissingBearer"
    BAD_BEARER_FORMAT = "BadBearerFormat"
    BEARER_MISMATCH = "BearerMismatch"


class WebhookRefused(Exception):
    """The request did not prove it knows the secret (HTTP 401)."""

    status = 401

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def verify(
    auth: WebhookAuth,
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
) -> None:
    """Return if the request is authentic under `auth`; WebhookRefused otherwise."""
    lower = {name.lower(): value for name, value in headers.items()}
    if auth.bearer_secret_ref is not None:
        _bearer(secret, lower.get("authorization"))
        return
    given = lower.get(auth.header.lower())
    if given is None:
        raise WebhookRefused(Refusal.MISSING_SIGNATURE, f"no {auth.header} header")
    match = _SIGNATURE.match(given.strip())
    if match is None:
        raise WebhookRefused(
            Refusal.BAD_SIGNATURE_FORMAT,
            f"{auth.header} must be sha256=<64 hex digits>, the HMAC-SHA256 of the body",
        )
    timestamp = None
    if auth.timestamp_header is not None:
        timestamp = _timestamp(auth.timestamp_header, lower.get(auth.timestamp_header.lower()))
    expected = sign(secret, body, timestamp).removeprefix("sha256=")
    if not hmac.compare_digest(expected.encode(), match.group(1).lower().encode()):
        signed = "the timestamp, '.' and the body" if timestamp is not None else "the body"
        raise WebhookRefused(
            Refusal.SIGNATURE_MISMATCH,
            f"{auth.header} does not match the HMAC-SHA256 of {signed} under the secret",
        )
    if timestamp is not None:
        skew = abs(now.timestamp() - int(timestamp))
        if skew > parse_duration(auth.max_skew):
            raise WebhookRefused(
                Refusal.STALE_TIMESTAMP,
                f"{auth.timestamp_header} is {int(skew)}s away from the server's clock; "
                f"at most {auth.max_skew} is accepted",
            )


def sign(secret: bytes, body: bytes, timestamp: str | None = None) -> str:
    """The signature header's value for `body` (and `timestamp`): `sha256=<hex>`."""
    signed = body if timestamp is None else timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()


def request_key(headers: Mapping[str, str], body: bytes) -> str:
    """A webhook request's message id, its default idempotency key: the
    `Idempotency-Key` header, else `X-Request-Id`, else the SHA-256 of the raw body
    (so a replay of the same request is the same event)."""
    lower = {name.lower(): value for name, value in headers.items()}
    for name in ("idempotency-key", "x-request-id"):
        value = lower.get(name, "").strip()
        if value:
            return value
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _timestamp(header: str, value: str | None) -> str:
    if value is None:
        raise WebhookRefused(Refusal.MISSING_TIMESTAMP, f"no {header} header")
    value = value.strip()
    if not _TIMESTAMP.match(value):
        raise WebhookRefused(Refusal.BAD_TIMESTAMP, f"{header} must be a Unix time in seconds")
    return value


def _bearer(secret: bytes, value: str | None) -> None:
    if value is None:
        raise WebhookRefused(Refusal.MISSING_BEARER, "no Authorization header")
    match = _BEARER.match(value.strip())
    if match is None:
        raise WebhookRefused(Refusal.BAD_BEARER_FORMAT, "Authorization must be Bearer <secret>")
    # Digests of both, so the comparison takes the same time whatever the lengths.
    given = hashlib.sha256(match.group(1).encode("utf-8", "surrogatepass")).digest()
    if not hmac.compare_digest(given, hashlib.sha256(secret).digest()):
        raise WebhookRefused(Refusal.BEARER_MISMATCH, "the bearer secret does not match")


def secret_document(document: Mapping[str, Any]) -> tuple[str, str, dict[str, bytes]]:
    """(namespace, name, values) of a `kind: Secret` document: `data` is base64,
    `stringData` plain text and wins, as in Kubernetes. ValueError naming the field."""
    metadata = document.get("metadata") or {}
    name, namespace = metadata.get("name"), metadata.get("namespace", "default")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        raise ValueError("Secret: metadata.name (and metadata.namespace) must be strings")
    values: dict[str, bytes] = {}
    for key, text in _pairs(document, "data", name):
        try:
            values[key] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"Secret {name}: data.{key} is not base64") from None
    for key, text in _pairs(document, "stringData", name):
        values[key] = text.encode()
    return namespace, name, values


def _pairs(document: Mapping[str, Any], field: str, name: str) -> list[tuple[str, str]]:
    section = document.get(field) or {}
    if not isinstance(section, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in section.items()
    ):
        raise ValueError(f"Secret {name}: {field} must map keys to strings")
    return list(section.items())


def answer(namespace: str, outcome: Outcome) -> tuple[int, dict[str, Any]]:
    """A webhook's answer to `outcome`: 202 with the run (and a signal's result), 200
    for a filtered event, else an error (400 malformed, 409 refused, 503 retry later)."""
    if outcome.kind == "filtered":
        return 200, {"filtered": True}
    execution = {"name": outcome.execution, "namespace": namespace}
    if outcome.kind in ("signalled", "duplicate") and outcome.signal:
        result = "accepted" if outcome.kind == "signalled" else "noop"
        return 202, {"execution": execution, "signal": {"result": result}}
    if outcome.kind in ("started", "duplicate"):
        return 202, {"execution": execution, "created": outcome.kind == "started"}
    return error(outcome.status, outcome.reason, outcome.message)


def error(status: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    """The API's error shape: {"error": {code, reason, message}}."""
    return status, {"error": {"code": status, "reason": reason, "message": message}}
