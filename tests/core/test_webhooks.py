"""Webhook authentication (HMAC, timestamps, bearer), request keys and answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from sagaflow.core.trigger_specs import TriggerSpec, WebhookAuth
from sagaflow.core.triggers import Incoming, Outcome, StartOrder, TriggerRef, decide
from sagaflow.core.webhooks import (
    Refusal,
    WebhookRefused,
    answer,
    request_key,
    secret_document,
    sign,
    verify,
)

SECRET = b"It's a Secret to Everybody"
BODY = b'{"action":"opened","number":7}'
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
HMAC = WebhookAuth.model_validate({"hmacSecretRef": {"name": "hook", "key": "secret"}})
STAMPED = WebhookAuth.model_validate(
    {
        "hmacSecretRef": {"name": "hook", "key": "secret"},
        "header": "X-Sig",
        "timestampHeader": "X-Timestamp",
        "maxSkew": "5m",
    }
)
BEARER = WebhookAuth.model_validate({"bearerSecretRef": {"name": "hook", "key": "token"}})


def refusal(auth: WebhookAuth, headers: dict[str, str], body: bytes = BODY) -> WebhookRefused:
    with pytest.raises(WebhookRefused) as refused:
        verify(auth, SECRET, headers, body, NOW)
    assert refused.value.status == 401
    return refused.value


def test_the_signature_is_githubs_hmac_sha256_of_the_raw_body() -> None:
    # Worked out independently of `sign`, with hmac directly.
    expected = hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY) == f"sha256={expected}"
    verify(HMAC, SECRET, {"X-Signature-256": f"sha256={expected}"}, BODY, NOW)
    # Header names are case-insensitive, hex case does not matter.
    verify(HMAC, SECRET, {"x-signature-256": f"sha256={expected.upper()}"}, BODY, NOW)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, Refusal.MISSING_SIGNATURE),
        ({"X-Signature-256": "deadbeef"}, Refusal.BAD_SIGNATURE_FORMAT),
        ({"X-Signature-256": "sha1=" + "0" * 40}, Refusal.BAD_SIGNATURE_FORMAT),
        ({"X-Signature-256": "sha256=" + "z" * 64}, Refusal.BAD_SIGNATURE_FORMAT),
        ({"X-Signature-256": "sha256=" + "0" * 64}, Refusal.SIGNATURE_MISMATCH),
        ({"X-Signature-256": sign(b"another secret", BODY)}, Refusal.SIGNATURE_MISMATCH),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(headers: dict[str, str], reason: Refusal) -> None:
    refused = refusal(HMAC, headers)
    assert refused.reason is reason


def test_a_changed_body_does_not_match_and_the_expected_value_is_never_told() -> None:
    refused = refusal(HMAC, {"X-Signature-256": sign(SECRET, BODY)}, BODY + b" ")
    assert refused.reason is Refusal.SIGNATURE_MISMATCH
    expected = sign(SECRET, BODY + b" ")
    assert expected not in refused.message and expected[7:] not in refused.message
    assert SECRET.decode() not in refused.message


def stamped(at: datetime, body: bytes = BODY) -> dict[str, str]:
    ts = str(int(at.timestamp()))
    return {"X-Sig": sign(SECRET, body, ts), "X-Timestamp": ts}


def test_a_timestamped_signature_covers_time_and_body_within_the_skew() -> None:
    ts = str(int(NOW.timestamp()))
    expected = hmac.new(SECRET, ts.encode() + b"." + BODY, hashlib.sha256).hexdigest()
    verify(STAMPED, SECRET, {"X-Sig": f"sha256={expected}", "X-Timestamp": ts}, BODY, NOW)
    verify(STAMPED, SECRET, stamped(NOW - timedelta(minutes=4)), BODY, NOW)
    verify(STAMPED, SECRET, stamped(NOW + timedelta(minutes=4)), BODY, NOW)
    # The body's signature alone is not enough when a timestamp is asked for.
    no_time = {"X-Sig": sign(SECRET, BODY), "X-Timestamp": ts}
    assert refusal(STAMPED, no_time).reason is Refusal.SIGNATURE_MISMATCH


def test_stale_and_missing_timestamps_are_refused() -> None:
    stale = refusal(STAMPED, stamped(NOW - timedelta(minutes=6)))
    assert stale.reason is Refusal.STALE_TIMESTAMP and "5m" in stale.message
    future = refusal(STAMPED, stamped(NOW + timedelta(minutes=6)))
    assert future.reason is Refusal.STALE_TIMESTAMP
    assert refusal(STAMPED, {"X-Sig": sign(SECRET, BODY)}).reason is Refusal.MISSING_TIMESTAMP
    bad = {"X-Sig": sign(SECRET, BODY, "soon"), "X-Timestamp": "soon"}
    assert refusal(STAMPED, bad).reason is Refusal.BAD_TIMESTAMP
    # A moved timestamp breaks the signature rather than passing as fresh.
    moved = stamped(NOW - timedelta(minutes=6)) | {"X-Timestamp": str(int(NOW.timestamp()))}
    assert refusal(STAMPED, moved).reason is Refusal.SIGNATURE_MISMATCH


def test_a_replay_inside_the_window_is_authentic_and_keyed_as_the_same_event() -> None:
    headers = stamped(NOW - timedelta(minutes=1))
    spec = TriggerSpec.model_validate(
        {
            "workflowRef": {"name": "prs"},
            "source": {"http": {"path": "github", "auth": STAMPED.model_dump(by_alias=True)}},
        }
    )
    ref = TriggerRef("default", "github", "uid-9")
    verdicts = []
    for _ in range(2):
        verify(STAMPED, SECRET, headers, BODY, NOW)
        verdicts.append(decide(spec, ref, Incoming(BODY, request_key(headers, BODY), headers)))
    assert verdicts[0] == verdicts[1]
    assert isinstance(verdicts[0], StartOrder)
    assert verdicts[0].idempotency_key == (
        "trigger/uid-9/sha256:" + hashlib.sha256(BODY).hexdigest()
    )


def test_request_keys_prefer_the_idempotency_key_then_the_request_id() -> None:
    assert request_key({"Idempotency-Key": "k1", "X-Request-Id": "r1"}, BODY) == "k1"
    assert request_key({"x-request-id": "r1"}, BODY) == "r1"
    assert request_key({"Idempotency-Key": " "}, BODY).startswith("sha256:")
    assert request_key({}, BODY) != request_key({}, BODY + b"\n")


def test_a_bearer_secret_is_compared_whole() -> None:
    verify(BEARER, SECRET, {"Authorization": f"Bearer {SECRET.decode()}"}, BODY, NOW)
    verify(BEARER, SECRET, {"authorization": f"bearer {SECRET.decode()}"}, BODY, NOW)
    assert refusal(BEARER, {}).reason is Refusal.MISSING_BEARER
    basic = {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}
    assert refusal(BEARER, basic).reason is Refusal.BAD_BEARER_FORMAT
    for wrong in (SECRET.decode()[:-1], SECRET.decode() + "x", "nope"):
        refused = refusal(BEARER, {"Authorization": f"Bearer {wrong}"})
        assert refused.reason is Refusal.BEARER_MISMATCH
        assert SECRET.decode() not in refused.message


def test_secret_documents_read_data_and_string_data() -> None:
    document = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hook", "namespace": "shop"},
        "data": {"secret": base64.b64encode(b"\x00bin").decode(), "both": "b2xk"},
        "stringData": {"token": "plain", "both": "new"},
    }
    assert secret_document(document) == (
        "shop",
        "hook",
        {"secret": b"\x00bin", "both": b"new", "token": b"plain"},
    )
    assert secret_document({"metadata": {"name": "x"}})[0] == "default"
    with pytest.raises(ValueError, match=r"data\.secret is not base64"):
        secret_document({"metadata": {"name": "x"}, "data": {"secret": "!!"}})
    with pytest.raises(ValueError, match="stringData must map keys to strings"):
        secret_document({"metadata": {"name": "x"}, "stringData": {"n": 1}})
    with pytest.raises(ValueError, match=r"metadata\.name"):
        secret_document({"kind": "Secret"})


@pytest.mark.parametrize(
    ("outcome", "status", "body"),
    [
        (Outcome("filtered", "gave false", status=200), 200, {"filtered": True}),
        (
            Outcome("started", execution="prs-1"),
            202,
            {"execution": {"name": "prs-1", "namespace": "ns"}, "created": True},
        ),
        (
            Outcome("duplicate", execution="prs-1"),
            202,
            {"execution": {"name": "prs-1", "namespace": "ns"}, "created": False},
        ),
        (
            Outcome("signalled", execution="prs-1", signal=True),
            202,
            {"execution": {"name": "prs-1", "namespace": "ns"}, "signal": {"result": "accepted"}},
        ),
        (
            Outcome("duplicate", execution="prs-1", signal=True),
            202,
            {"execution": {"name": "prs-1", "namespace": "ns"}, "signal": {"result": "noop"}},
        ),
        (
            Outcome("malformed", "body: is not JSON", reason="MalformedMessage", status=400),
            400,
            {"error": {"code": 400, "reason": "MalformedMessage", "message": "body: is not JSON"}},
        ),
    ],
)
def test_answers(outcome: Outcome, status: int, body: dict[str, object]) -> None:
    assert answer("ns", outcome) == (status, body)
