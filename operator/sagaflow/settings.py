"""One settings model for every command, read from `SAGAFLOW_*` environment variables.

A wrong value fails at start-up with a message naming the variable, before
anything is started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGAFLOW_", extra="ignore")

    # An external Postgres; when unset, local mode starts an embedded one in its state dir.
    database_url: str | None = None
    bus: Literal["postgres", "servicebus"] = "postgres"
    servicebus_connection_string: SecretStr | None = None
    # Fully qualified namespace (NAME.servicebus.windows.net) for azure-identity auth.
    servicebus_namespace: str | None = None
    # Comma-separated Service Bus queues created with sessions on. Sagaflow's queues are
    # plain by default (docs/design.md says why); this serves queues made otherwise.
    servicebus_session_queues: str = Field(default="", pattern=r"^[A-Za-z0-9.,_\-\s]*$")
    payloads: Literal["local", "azureblob"] = "local"
    # Local payload directory; defaults to `payloads/` in the state dir.
    payload_dir: Path | None = None
    blob_connection_string: SecretStr | None = None
    # https://ACCOUNT.blob.core.windows.net (azure-identity auth) or a SAS URL.
    blob_account_url: str | None = None
    blob_container: str = Field(
        default="sagaflow-payloads", pattern=r"^[a-z0-9](-?[a-z0-9]){2,62}$"
    )
    blob_create_container: bool = False
    # Payloads above this size travel by reference; well under Service Bus's 256 KB.
    payload_threshold_bytes: int = Field(default=64 * 1024, ge=1, le=200 * 1024)
    # Orchestrator batch size: how many waiting events fold into one transaction.
    batch_size: int = Field(default=256, ge=1, le=10_000)
    # How long a receiver holds a message before it is redelivered.
    lock_duration_seconds: float = Field(default=30.0, gt=0, le=300)
    max_delivery_count: int = Field(default=10, ge=1, le=1000)
    # Postgres bus: how often a message's receiver may die while running it alone before
    # the message is dead-lettered as ReceiverCrashed (a crash loop, not bad luck).
    max_crash_count: int = Field(default=3, ge=1, le=100)
    # How long a runner runs such a suspect with nothing beside it (and waits for the
    # others to finish first): a crash that is the command's doing comes early.
    suspect_alone_seconds: float = Field(default=5.0, gt=0, le=3600)
    runner_concurrency: int = Field(default=64, ge=1, le=10_000)
    # `sagaflow run`: executions kept going at once; the others start as these finish.
    # Bounds the orchestrator's working set (memory, hot rows) whatever the files hold.
    max_running_executions: int = Field(default=2000, ge=1, le=1_000_000)
    # On SIGTERM / Ctrl-C: how long running handlers may take to finish before they are
    # cancelled and their commands handed back for redelivery.
    grace_period_seconds: float = Field(default=10.0, ge=0, le=3600)
    # An async handler holding the event loop longer than this is reported by step name.
    loop_block_seconds: float = Field(default=1.0, gt=0, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # `json`: one JSON object a line, with execution, step, attempt and trace ids, for a
    # log pipeline; `plain` (the default) reads well in a terminal.
    log_format: Literal["plain", "json"] = "plain"
    # Seconds between samples of the database gauges (backlogs, phases); 0 samples none.
    metrics_interval: float = Field(default=15.0, ge=0, le=3600)
    # `sagaflow runner`: port of its own /metrics; 0 serves none. The operator and the
    # server serve /metrics on the API port.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - a scrape target, reached from outside the pod
        min_length=1,
        pattern=r"^[A-Za-z0-9.:\-\[\]%]+$",
    )
    # The CLI verbs' server (`--server`): a `sagaflow server` or an operator's API URL,
    # and the bearer token they send. Unset: the verbs open the state themselves.
    server: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    server_token: SecretStr | None = None

    # -- the HTTP API (`sagaflow server`, `sagaflow operator`) ------------------------------
    # Port of the API (`api/`); 0 serves none.
    api_port: int = Field(default=8090, ge=0, le=65535)
    # Address it binds. Unset: every interface when callers authenticate, else loopback.
    # Without auth (no tokens file, not in a cluster) only a loopback address is accepted.
    api_host: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9.:\-\[\]%]+$")
    # YAML list of bearer tokens and their namespaces (`api/auth.py`); unset outside a
    # cluster: no auth, and the API listens on loopback only.
    api_tokens_file: Path | None = None
    # A request body above this is refused (413) before it is parsed.
    api_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    # -- `sagaflow operator` -------------------------------------------------------------
    # Port of /healthz (liveness) and /readyz (readiness); 0 serves none.
    health_port: int = Field(default=8080, ge=0, le=65535)
    # Comma-separated namespaces to watch; empty: every namespace (cluster-wide).
    watch_namespaces: str = Field(default="", pattern=r"^[a-z0-9,\-\s]*$")
    # A kopf peering object's name: replicas sharing it elect one to run handlers.
    # Empty: every replica runs them (safe too: starts are keyed by uid, transitions
    # by row locks; peering only saves duplicate work).
    peering_name: str = ""
    # kopf pauses every replica when peers share a priority, so each replica needs its
    # own: unset, a random one (the highest live replica runs the handlers).
    peering_priority: int | None = Field(default=None, ge=0, le=2**31 - 1)
    # How often the status mirror and TTL collector look without being woken.
    mirror_poll_seconds: float = Field(default=2.0, gt=0, le=300)
    # How long an Execution whose Workflow has no valid version waits between checks.
    workflow_wait_seconds: float = Field(default=5.0, gt=0, le=3600)
    # OTLP/HTTP collector base URL (http://collector:4318): set, spans are exported there;
    # unset, tracing is OpenTelemetry's no-op API and costs next to nothing.
    otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    otlp_service_name: str = Field(default="sagaflow", min_length=1, max_length=200)

    @property
    def namespaces(self) -> list[str]:
        return _names(self.watch_namespaces)

    @property
    def session_queues(self) -> list[str]:
        return _names(self.servicebus_session_queues)

    @model_validator(mode="after")
    def _adapters_have_what_they_need(self) -> Settings:
        if self.bus == "servicebus" and not (
            self.servicebus_connection_string or self.servicebus_namespace
        ):
            raise ValueError(
                "SAGAFLOW_BUS=servicebus needs SAGAFLOW_SERVICEBUS_CONNECTION_STRING or "
                "SAGAFLOW_SERVICEBUS_NAMESPACE"
            )
        if self.payloads == "azureblob" and not (
            self.blob_connection_string or self.blob_account_url
        ):
            raise ValueError(
                "SAGAFLOW_PAYLOADS=azureblob needs SAGAFLOW_BLOB_CONNECTION_STRING or "
                "SAGAFLOW_BLOB_ACCOUNT_URL"
            )
        return self


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise SettingsError(f"invalid configuration: {problems}") from exc


def _describe(error: Any) -> str:
    """Name the variable: pydantic's location is the field, the user sets SAGAFLOW_<FIELD>."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a rule across fields already names its variables
        return message
    return f"SAGAFLOW_{'_'.join(str(p) for p in error['loc']).upper()}: {message}"
