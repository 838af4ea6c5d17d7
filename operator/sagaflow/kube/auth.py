"""The API's auth in a cluster: Kubernetes decides who calls and what they may do.

`KubeAuthorizer` sends the caller's bearer token (a service account's, or one from
`kubectl create token`) to the API server in a TokenReview (authentication.k8s.io/v1),
then asks in a SubjectAccessReview (authorization.k8s.io/v1) whether that user may
`create` / `get` / `patch` `executions.sagaflow.io` in the namespace. So RBAC
Roles and RoleBindings on Executions govern the HTTP API exactly as they govern
kubectl, and Sagaflow keeps no tokens of its own.

Positive answers are kept for a short TTL (`ttl`, 10 s by default): a burst of
requests costs two reviews, and a revoked grant stops working within the TTL.
Refusals are never kept, so a grant just made works at once. A review the API
server cannot answer is a 503, logged: it is not the caller's fault. The operator's
service account needs `create` on `tokenreviews` and `subjectaccessreviews`.

`Reviews` is the narrow interface to the API server (two POSTs); `ClientReviews`
implements it with the `kubernetes` client, in threads as `kube.api` does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import kubernetes
import urllib3

from sagaflow.api.auth import (
    GROUP,
    RESOURCE,
    Principal,
    Verb,
    forbidden,
    token_digest,
    unauthorized,
)
from sagaflow.api.contract import ApiError

log = logging.getLogger("sagaflow.api")

Body = dict[str, Any]
Review = Literal["tokenreviews", "subjectaccessreviews"]
# Long enough to spare the API server a burst; short enough that a revoked grant ends soon.
TTL_SECONDS = 10.0
MAX_ENTRIES = 10_000


class ReviewUnavailableError(Exception):
    """The API server did not answer a review (the message says why)."""


class Reviews(Protocol):
    async def review(self, kind: Review, body: Body) -> Body:
        """Create the review object; the API server's answer (with its `status`).
        ReviewUnavailableError when there is no answer."""
        ...


class ClientReviews:
    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self._authn = kubernetes.client.AuthenticationV1Api(client)
        self._authz = kubernetes.client.AuthorizationV1Api(client)
        self._threads = ThreadPoolExecutor(4, thread_name_prefix="kube-reviews")

    async def review(self, kind: Review, body: Body) -> Body:
        create = (
            self._authn.create_token_review
            if kind == "tokenreviews"
            else self._authz.create_subject_access_review
        )
        sent: Any = body  # the client serialises a plain dict as it is
        call = functools.partial(create, sent, _preload_content=False)
        try:
            response: Any = await asyncio.get_running_loop().run_in_executor(self._threads, call)
            answer: Body = json.loads(response.data)
        except kubernetes.client.ApiException as exc:
            raise ReviewUnavailableError(f"{kind}: HTTP {exc.status} {exc.reason}") from exc
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ReviewUnavailableError(f"{kind}: {exc}") from exc
        return answer


def token_review(token: str) -> Body:
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }


def access_review(user: Body, verb: Verb, namespace: str) -> Body:
    spec: Body = {
        "user": user.get("username", ""),
        "groups": list(user.get("groups") or []),
        "resourceAttributes": {
            "namespace": namespace,
            "verb": verb,
            "group": GROUP,
            "resource": RESOURCE,
        },
    }
    if user.get("uid"):
        spec["uid"] = user["uid"]
    if user.get("extra"):
        spec["extra"] = user["extra"]
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": spec,
    }


class KubeAuthorizer:
    def __init__(
        self,
        reviews: Reviews,
        *,
        ttl: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reviews, self._ttl, self._clock = reviews, ttl, clock
        self._users: dict[str, tuple[Body, float]] = {}  # token digest -> user, expiry
        self._grants: dict[tuple[str, str, str], float] = {}  # (digest, verb, ns) -> expiry

    async def authorize(self, token: str | None, verb: Verb, namespace: str) -> Principal:
        if token is None:
            raise unauthorized(
                "this API needs a Kubernetes bearer token: send 'Authorization: Bearer "
                "<token>' (for one, `kubectl create token <service-account>`)"
            )
        digest = token_digest(token)
        now = self._clock()
        user = await self._user(digest, token, now)
        name = str(user.get("username") or "unknown")
        key = (digest, verb, namespace)
        if self._grants.get(key, 0.0) > now:
            return Principal(name)
        status = await self._ask("subjectaccessreviews", access_review(user, verb, namespace))
        if not status.get("allowed"):
            why = f": {status['reason']}" if status.get("reason") else ""
            raise forbidden(
                f"{name} may not {verb} {RESOURCE}.{GROUP} in namespace {namespace!r}{why}"
            )
        self._keep(self._grants, key, now + self._ttl, now)
        return Principal(name)

    async def _user(self, digest: str, token: str, now: float) -> Body:
        held = self._users.get(digest)
        if held is not None and held[1] > now:
            return held[0]
        status = await self._ask("tokenreviews", token_review(token))
        user = status.get("user") or {}
        if not status.get("authenticated") or not user.get("username"):
            raise unauthorized("the bearer token was not accepted by the Kubernetes API server")
        self._keep(self._users, digest, (user, now + self._ttl), now)
        return dict(user)

    async def _ask(self, kind: Review, body: Body) -> Body:
        try:
            answer = await self._reviews.review(kind, body)
        except ReviewUnavailableError as exc:
            log.error("cannot check an API caller with the Kubernetes API: %s", exc)
            raise ApiError(
                503,
                "Unavailable",
                "cannot check the caller with the Kubernetes API just now; try again",
            ) from None
        status = answer.get("status")
        return status if isinstance(status, dict) else {}

    def _keep(self, cache: dict[Any, Any], key: Any, value: Any, now: float) -> None:
        """Store, first dropping what has expired, then the oldest, beyond MAX_ENTRIES."""
        if len(cache) >= MAX_ENTRIES:
            for old in [k for k, v in cache.items() if _expiry(v) <= now]:
                del cache[old]
            while len(cache) >= MAX_ENTRIES:
                del cache[next(iter(cache))]
        cache[key] = value


def _expiry(value: Any) -> float:
    return float(value[1] if isinstance(value, tuple) else value)


__all__ = [
    "TTL_SECONDS",
    "ClientReviews",
    "KubeAuthorizer",
    "ReviewUnavailableError",
    "Reviews",
    "access_review",
    "token_review",
]
