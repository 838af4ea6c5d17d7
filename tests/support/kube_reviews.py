"""TokenReview and SubjectAccessReview for the in-memory API server.

A real API server answers `POST /apis/authentication.k8s.io/v1/tokenreviews` with
who a token belongs to, and `POST /apis/authorization.k8s.io/v1/subjectaccessreviews`
with whether a user (or one of their groups) may use a verb on a resource in a
namespace. `Reviews` answers both from tables the test fills:

    api.reviews.tokens["t-ci"] = User("system:serviceaccount:team-a:ci", groups=("ci",))
    api.reviews.allow("ci", "create", "team-a")     # a user or a group; "*" for any

and counts what it was asked (`asked`), so a test sees what a cache saved. A review
whose token is not in the table is unauthenticated; a review with no matching grant
is not allowed, with a reason, as RBAC says it. Setting `failing` answers every
review 500 (an API server in trouble).

Pure of I/O; `kube.ApiServer` calls `answer` first for every request.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import rendering

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a path
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"

Body = dict[str, Any]


@dataclass(frozen=True)
class User:
    username: str
    groups: tuple[str, ...] = ()
    uid: str = ""


@dataclass
class Reviews:
    tokens: dict[str, User] = field(default_factory=dict)
    # (user or group, verb, namespace, group/resource), "*" matching any of each
    grants: set[tuple[str, str, str, str]] = field(default_factory=set)
    asked: Counter[str] = field(default_factory=Counter)
    # The SubjectAccessReview specs received, oldest first.
    access_specs: list[Body] = field(default_factory=list)
    failing: bool = False

    def allow(
        self, subject: str, verb: str, namespace: str, resource: str = "executions.sagaflow.io"
    ) -> None:
        self.grants.add((subject, verb, namespace, resource))

    def revoke(self, subject: str, verb: str, namespace: str) -> None:
        self.grants = {g for g in self.grants if g[:3] != (subject, verb, namespace)}

    def answer(self, request: rendering.Request) -> aiohttp.web.Response | None:
        """The review's answer, or None: not a review, the server handles it."""
        path = request.url.path.rstrip("/")
        if path not in (TOKEN_REVIEWS, ACCESS_REVIEWS) or request.method != kmock.method.POST:
            return None
        kind = "tokenreviews" if path == TOKEN_REVIEWS else "subjectaccessreviews"
        self.asked[kind] += 1
        if self.failing:
            return _status(500, "InternalError", "the review failed")
        body = request.data
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
            return _status(400, "BadRequest", "a review needs a spec")
        answer = copy.deepcopy(body)
        if kind == "tokenreviews":
            answer["status"] = self._authenticate(body["spec"])
        else:
            self.access_specs.append(copy.deepcopy(body["spec"]))
            answer["status"] = self._authorize(body["spec"])
        return aiohttp.web.json_response(answer, status=201)

    def _authenticate(self, spec: Body) -> Body:
        user = self.tokens.get(str(spec.get("token", "")))
        if user is None:
            return {"authenticated": False, "error": "invalid bearer token"}
        found: Body = {"username": user.username, "groups": list(user.groups)}
        if user.uid:
            found["uid"] = user.uid
        return {"authenticated": True, "user": found}

    def _authorize(self, spec: Body) -> Body:
        attrs = spec.get("resourceAttributes") or {}
        subjects = {str(spec.get("user", "")), *map(str, spec.get("groups") or [])}
        wanted = (
            str(attrs.get("verb", "")),
            str(attrs.get("namespace", "")),
            f"{attrs.get('resource', '')}.{attrs.get('group', '')}",
        )
        for subject, verb, namespace, resource in self.grants:
            held = (verb, namespace, resource)
            if subject in (*subjects, "*") and all(
                h in ("*", w) for h, w in zip(held, wanted, strict=True)
            ):
                return {"allowed": True, "reason": f"granted to {subject}"}
        return {
            "allowed": False,
            "reason": f"no grant of {wanted[0]} on {wanted[2]} in {wanted[1]}",
        }


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    body.update(reason=reason, message=message)
    return aiohttp.web.json_response(body, status=code)


__all__ = ["ACCESS_REVIEWS", "TOKEN_REVIEWS", "Reviews", "User"]
