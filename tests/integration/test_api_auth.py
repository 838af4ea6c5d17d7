"""Who may call the HTTP API and where it listens: a tokens file, loopback only, or
Kubernetes reviews; and the API's settings.

`TokensFile` is read from files as a user writes them (and refused naming the file
and field); `LoopbackOnly` holds the API to a loopback address; `KubeAuthorizer`
asks the in-memory API server of `tests/support` (TokenReview, then
SubjectAccessReview from the tables a test fills), keeping positive answers for its
TTL on a fake clock. Through the app: 401 and 403 in the error shape, the verb each
route asks for, and the token's name recorded as the source of the runs it starts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import asyncpg
import kubernetes
import pytest
from test_api import ORDERS
from test_orchestrator import harness_on
from tests.support.kube import ApiServer, running_api_server, write_kubeconfig
from tests.support.kube_reviews import User

from sagaflow.api.app import make_app
from sagaflow.api.auth import (
    LoopbackOnly,
    Principal,
    TokensFile,
    TokensFileError,
    Verb,
    file_or_loopback,
)
from sagaflow.api.contract import ApiError, Outcome, Page, Started
from sagaflow.api.server import ServeError, bind_host, serve, serve_api
from sagaflow.api.service import DirectService
from sagaflow.kube.auth import ClientReviews, KubeAuthorizer
from sagaflow.runtime.startpath import StartCall
from sagaflow.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.timeout(120)

CI_TOKEN = "ci-token-0123456789"  # noqa: S105 - test tokens
ADMIN_TOKEN = "admin-token-0123456789"  # noqa: S105
TOKENS = f"""\
tokens:
  - name: ci
    token: {CI_TOKEN}
    namespaces: [team-a]
  - name: admin
    sha256: {hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}
    namespaces: ["*"]
"""


def tokens_file(tmp_path: Path, text: str = TOKENS) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("- a\n", "tokens"),
        ("tokens: []\n", "tokens"),
        ("tokens: [a]\n", "tokens[0]"),
        ("tokens:\n  - {token: abcdefghijklmnopq, namespaces: [a]}\n", "tokens[0].name"),
        ("tokens:\n  - {name: ci, namespaces: [a]}\n", "tokens[0]"),
        ("tokens:\n  - {name: ci, token: short, namespaces: [a]}\n", "tokens[0].token"),
        ("tokens:\n  - {name: ci, sha256: abc, namespaces: [a]}\n", "tokens[0].sha256"),
        ("tokens:\n  - {name: ci, token: abcdefghijklmnopq}\n", "tokens[0].namespaces"),
        ("tokens:\n  - {name: ci, token: abcdefghijklmnopq, namespaces: [A_b]}\n",
         "tokens[0].namespaces[0]"),
        ("tokens:\n  - {name: ci, token: abcdefghijklmnopq, namespaces: [a], role: x}\n",
         "tokens[0].role"),
        ("tokens:\n  - {name: a, token: abcdefghijklmnopq, namespaces: [a]}\n"
         "  - {name: a, token: bbcdefghijklmnopq, namespaces: [a]}\n", "tokens[1].name"),
        ("tokens:\n  - {name: a, token: abcdefghijklmnopq, namespaces: [a]}\n"
         "  - {name: b, token: abcdefghijklmnopq, namespaces: [a]}\n", "tokens[1]"),
        ("tokens: [\n", None),
    ],
)  # fmt: skip
def test_a_bad_tokens_file_is_refused_naming_the_file_and_field(
    tmp_path: Path, text: str, field: str | None
) -> None:
    path = tokens_file(tmp_path, text)
    with pytest.raises(TokensFileError) as refused:
        TokensFile.load(path)
    assert str(refused.value).startswith(f"API tokens file {path}: ")
    if field is not None:
        assert f": {field}: " in str(refused.value)


def test_a_missing_tokens_file_is_refused_and_none_means_loopback(tmp_path: Path) -> None:
    with pytest.raises(TokensFileError, match=r"tokens.yaml: cannot read: No such file"):
        file_or_loopback(tmp_path / "tokens.yaml")
    assert isinstance(file_or_loopback(None), LoopbackOnly)
    assert file_or_loopback(tokens_file(tmp_path)).names == ["ci", "admin"]


async def test_tokens_are_known_by_value_or_digest_and_held_to_their_namespaces(
    tmp_path: Path,
) -> None:
    tokens = TokensFile.load(tokens_file(tmp_path))
    assert await tokens.authorize(CI_TOKEN, "create", "team-a") == Principal("ci")
    assert await tokens.authorize(ADMIN_TOKEN, "patch", "anywhere") == Principal("admin")
    for token, namespace, status in [
        (None, "team-a", 401),
        ("nobody-knows-this-token", "team-a", 401),
        (CI_TOKEN[:-1], "team-a", 401),
        (CI_TOKEN, "team-b", 403),
    ]:
        with pytest.raises(ApiError) as refused:
            await tokens.authorize(token, "get", namespace)
        assert refused.value.status == status


def test_without_auth_the_api_listens_on_loopback_only_and_says_so(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger="sagaflow.api"):
        assert bind_host(LoopbackOnly(), None) == "127.0.0.1"
    assert "no authentication" in caplog.text and "127.0.0.1" in caplog.text
    assert bind_host(LoopbackOnly(), "::1") == "::1"
    for host in ("0.0.0.0", "10.0.0.5", "localhost"):  # noqa: S104 - refused
        with pytest.raises(ServeError, match=f"SAGAFLOW_API_HOST={host}: .* loopback"):
            bind_host(LoopbackOnly(), host)
    tokens = TokensFile.load(tokens_file(tmp_path))
    assert bind_host(tokens, None) == "0.0.0.0"  # noqa: S104 - with auth: every interface
    assert bind_host(tokens, "10.0.0.5") == "10.0.0.5"


async def test_serve_api_follows_the_settings() -> None:
    service: Any = StubService()
    async with serve_api(service, LoopbackOnly(), Settings(api_port=0)) as none:
        assert none is None
    async with serve(make_app(service, LoopbackOnly()), "127.0.0.1", 0) as taken:
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{taken.port}"):
            async with serve_api(service, LoopbackOnly(), Settings(api_port=taken.port)):
                pass


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAGAFLOW_API_PORT", "70000"),
        ("SAGAFLOW_API_HOST", "a host"),
        ("SAGAFLOW_API_MAX_BODY_BYTES", "10"),
    ],
)
def test_api_settings_are_checked_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_api_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("PORT", "HOST", "TOKENS_FILE", "MAX_BODY_BYTES"):
        monkeypatch.delenv(f"SAGAFLOW_API_{variable}", raising=False)
    s = Settings()
    assert (s.api_port, s.api_host, s.api_tokens_file, s.api_max_body_bytes) == (
        8090,
        None,
        None,
        1024 * 1024,
    )


class StubService:
    """Answers every call with a fixed document and records the start calls."""

    RUN: ClassVar[dict[str, Any]] = {"kind": "Execution", "metadata": {"name": "run-1"}}

    def __init__(self) -> None:
        self.starts: list[StartCall] = []

    async def start(self, call: StartCall) -> Started:
        self.starts.append(call)
        return Started(self.RUN, True)

    async def get_execution(self, namespace: str, name: str) -> dict[str, Any]:
        return self.RUN

    async def history(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return []

    async def list_executions(self, namespace: str, **_: Any) -> Page:
        return Page([], None)

    async def list_workflows(self, namespace: str) -> list[dict[str, Any]]:
        return []

    async def state_at(self, namespace: str, name: str, at: Any) -> dict[str, Any]:
        return {"phase": "Running"}

    async def get_workflow_version(self, namespace: str, name: str, version: int) -> dict[str, Any]:
        return {"metadata": {"name": name}, "status": {"version": version}}

    async def list_schedules(self, namespace: str) -> list[dict[str, Any]]:
        return []

    async def signal(self, *_: Any, **__: Any) -> Outcome:
        return Outcome("accepted", "done", self.RUN)

    async def control(self, *_: Any, **__: Any) -> Outcome:
        return Outcome("accepted", "done", self.RUN)

    async def close(self) -> None:
        pass


class Recording:
    """An authorizer that lets everyone in and records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str | None, Verb, str]] = []

    async def authorize(self, token: str | None, verb: Verb, namespace: str) -> Principal:
        self.asked.append((token, verb, namespace))
        return Principal("rec")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    url: str,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url + path, json=body, headers=headers) as r:
        return r.status, await r.json()


ROUTES: Sequence[tuple[str, str, Any, Verb]] = [
    ("POST", "/v1/namespaces/team-a/workflows/orders/executions", {"input": {}}, "create"),
    ("GET", "/v1/namespaces/team-a/executions/run-1", None, "get"),
    ("GET", "/v1/namespaces/team-a/executions/run-1/history", None, "get"),
    ("GET", "/v1/namespaces/team-a/executions", None, "get"),
    ("GET", "/v1/namespaces/team-a/workflows", None, "get"),
    ("GET", "/v1/namespaces/team-a/workflows/orders/versions/1", None, "get"),
    ("GET", "/v1/namespaces/team-a/executions/run-1/state?at=2026-01-01T00:00:00Z", None, "get"),
    ("GET", "/v1/namespaces/team-a/schedules", None, "get"),
    ("POST", "/v1/namespaces/team-a/executions/run-1/signals/go", {"data": 1}, "patch"),
    ("POST", "/v1/namespaces/team-a/executions/run-1:suspend", None, "patch"),
    ("POST", "/v1/namespaces/team-a/executions/run-1:resume", None, "patch"),
    ("POST", "/v1/namespaces/team-a/executions/run-1:cancel", None, "patch"),
    ("POST", "/v1/namespaces/team-a/executions/run-1:redrive", {"latest": True}, "patch"),
    ("POST", "/v1/namespaces/team-a/executions/run-1:skip-compensation", {"steps": ["a"]}, "patch"),
]


async def test_each_route_asks_for_its_verb_in_its_namespace_with_the_token(
    http: aiohttp.ClientSession,
) -> None:
    authorizer = Recording()
    async with serve(make_app(StubService(), authorizer), "127.0.0.1", 0) as served:
        for method, path, body, _verb in ROUTES:
            status, _ = await call(http, served.url, method, path, "tok", body)
            assert status in (200, 201), path
        for path in ("/healthz", "/openapi.json"):
            assert (await call(http, served.url, "GET", path))[0] == 200
    assert authorizer.asked == [("tok", verb, "team-a") for *_, verb in ROUTES]


async def test_through_the_app_tokens_answer_401_and_403_in_the_error_shape(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    app = make_app(StubService(), TokensFile.load(tokens_file(tmp_path)))
    path = "/v1/namespaces/team-a/executions/run-1"
    async with serve(app, "127.0.0.1", 0) as served:
        assert await call(http, served.url, "GET", path, CI_TOKEN) == (200, StubService.RUN)
        headers = {"Authorization": f"Basic {CI_TOKEN}"}
        async with http.get(served.url + path, headers=headers) as r:
            assert (r.status, (await r.json())["error"]["reason"]) == (401, "Unauthorized")
            assert r.headers["WWW-Authenticate"] == "Bearer"
        for token, namespace, status, reason in [
            (None, "team-a", 401, "Unauthorized"),
            ("wrong-token-0123456789", "team-a", 401, "Unauthorized"),
            (CI_TOKEN, "team-b", 403, "Forbidden"),
        ]:
            got = await call(http, served.url, "GET", path.replace("team-a", namespace), token)
            assert got[0] == status
            assert got[1] == {
                "error": {"code": status, "reason": reason, "message": got[1]["error"]["message"]}
            }
        assert (await call(http, served.url, "GET", "/healthz"))[0] == 200  # no token needed


async def test_the_token_name_is_the_source_of_the_runs_it_starts(
    pg_pool: asyncpg.Pool, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with harness_on(pg_pool) as h:
        await h.orchestrator.apply_workflow("team-a", "orders", ORDERS)
        app = make_app(DirectService(h.orchestrator), TokensFile.load(tokens_file(tmp_path)))
        async with serve(app, "127.0.0.1", 0) as served:
            path = "/v1/namespaces/team-a/workflows/orders/executions"
            headers = {"Authorization": f"Bearer {CI_TOKEN}", "Idempotency-Key": "k-1"}
            async with http.post(served.url + path, json={"input": {}}, headers=headers) as r:
                assert r.status == 201
            source = await h.scalar(
                "SELECT source_kind || '/' || source_name FROM sagaflow_start_keys WHERE key = $1",
                "k-1",
            )
    assert source == "api/ci"


class Cluster:
    """The in-memory API server, and a KubeAuthorizer asking it, on a fake clock."""

    def __init__(self, api: ApiServer, tmp: Path) -> None:
        self.api, self.now = api, 1000.0
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(write_kubeconfig(tmp, api.url)), client_configuration=config
        )
        self.authorizer = KubeAuthorizer(
            ClientReviews(kubernetes.client.ApiClient(config)), ttl=10, clock=lambda: self.now
        )
        api.reviews.tokens["t-ci"] = User("system:serviceaccount:team-a:ci", ("ci-bots",), "u-1")
        api.reviews.tokens["t-eve"] = User("eve")

    async def refused(self, token: str | None, verb: Verb, namespace: str) -> ApiError:
        with pytest.raises(ApiError) as refused:
            await self.authorizer.authorize(token, verb, namespace)
        return refused.value


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_api_server() as api:
        yield Cluster(api, tmp_path)


async def test_kubernetes_reviews_decide_and_positive_answers_are_kept_for_the_ttl(
    cluster: Cluster,
) -> None:
    reviews = cluster.api.reviews
    reviews.allow("ci-bots", "create", "team-a")  # granted to the user's group
    principal = await cluster.authorizer.authorize("t-ci", "create", "team-a")
    assert principal == Principal("system:serviceaccount:team-a:ci")
    [spec] = reviews.access_specs
    assert spec == {
        "user": "system:serviceaccount:team-a:ci",
        "groups": ["ci-bots"],
        "uid": "u-1",
        "resourceAttributes": {
            "namespace": "team-a",
            "verb": "create",
            "group": "sagaflow.io",
            "resource": "executions",
        },
    }
    assert await cluster.authorizer.authorize("t-ci", "create", "team-a") == principal
    assert dict(reviews.asked) == {"tokenreviews": 1, "subjectaccessreviews": 1}  # kept

    denied = await cluster.refused("t-ci", "patch", "team-a")
    assert (denied.status, denied.reason) == (403, "Forbidden")
    assert "may not patch executions.sagaflow.io in namespace 'team-a'" in denied.message
    reviews.allow("system:serviceaccount:team-a:ci", "patch", "team-a")
    await cluster.authorizer.authorize("t-ci", "patch", "team-a")  # a refusal is not kept
    assert (await cluster.refused("t-ci", "get", "team-b")).status == 403

    reviews.revoke("ci-bots", "create", "team-a")
    await cluster.authorizer.authorize("t-ci", "create", "team-a")  # within the TTL: kept
    cluster.now += 11
    assert (await cluster.refused("t-ci", "create", "team-a")).status == 403
    assert reviews.asked["tokenreviews"] == 2  # the user is asked for again too


async def test_unknown_tokens_are_401_and_a_failing_api_server_503(cluster: Cluster) -> None:
    cluster.api.reviews.allow("*", "*", "*")
    for token in (None, "t-unknown"):
        refused = await cluster.refused(token, "get", "team-a")
        assert (refused.status, refused.reason) == (401, "Unauthorized")
    assert cluster.api.reviews.asked["tokenreviews"] == 1  # none asked without a token
    assert await cluster.authorizer.authorize("t-eve", "get", "x") == Principal("eve")
    cluster.api.reviews.failing = True
    unavailable = await cluster.refused("t-eve", "patch", "x")
    assert (unavailable.status, unavailable.reason) == (503, "Unavailable")


async def test_the_app_with_kubernetes_auth(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    cluster.api.reviews.allow("eve", "create", "team-a")
    service = StubService()
    app = make_app(service, cluster.authorizer)
    path = "/v1/namespaces/{}/workflows/orders/executions"
    async with serve(app, "127.0.0.1", 0) as served:
        ok = await call(http, served.url, "POST", path.format("team-a"), "t-eve", {"input": {}})
        assert ok[0] == 201
        other = await call(http, served.url, "POST", path.format("team-b"), "t-eve", {"input": {}})
        assert other[0] == 403 and other[1]["error"]["reason"] == "Forbidden"
        anonymous = await call(http, served.url, "GET", "/v1/namespaces/team-a/workflows")
        assert anonymous[0] == 401
    assert [c.source.name for c in service.starts] == ["eve"]
