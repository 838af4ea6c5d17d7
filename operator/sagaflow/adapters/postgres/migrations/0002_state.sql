-- Workflow versions, executions and their history, inbox, outbox and durable timers.
-- Postgres is the authoritative state: everything the orchestrator knows is here.

-- Every accepted change of a Workflow is a new immutable version; executions pin one.
CREATE TABLE sagaflow_workflow_versions (
    namespace   text        NOT NULL,
    name        text        NOT NULL,
    version     integer     NOT NULL,
    spec        jsonb       NOT NULL,
    spec_hash   text        NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (namespace, name, version),
    UNIQUE (namespace, name, spec_hash)
);

CREATE TABLE sagaflow_workflows (
    namespace       text        NOT NULL,
    name            text        NOT NULL,
    current_version integer     NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (namespace, name)
);

-- One row per execution: the aggregate as JSON plus the columns queries filter on.
-- (namespace, name) makes starting an execution idempotent.
CREATE TABLE sagaflow_executions (
    execution_id     text        PRIMARY KEY,
    namespace        text        NOT NULL,
    name             text        NOT NULL,
    workflow         text        NOT NULL,
    workflow_version integer     NOT NULL,
    phase            text        NOT NULL,
    revision         bigint      NOT NULL,
    state            jsonb       NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    UNIQUE (namespace, name)
);
CREATE INDEX sagaflow_executions_active ON sagaflow_executions (phase)
    WHERE phase NOT IN ('Completed', 'Failed', 'Cancelled');

-- Append-only history: every applied transition and every ignored message.
CREATE TABLE sagaflow_history (
    seq          bigserial   PRIMARY KEY,
    execution_id text        NOT NULL,
    at           timestamptz NOT NULL,
    kind         text        NOT NULL,
    step         text,
    attempt      integer,
    message      text        NOT NULL,
    data         jsonb
);
CREATE INDEX sagaflow_history_execution ON sagaflow_history (execution_id, seq);

-- One row per dispatched step attempt; the primary key is the attempt id, so an
-- attempt is dispatched once and its result applied once.
CREATE TABLE sagaflow_step_attempts (
    execution_id  text        NOT NULL,
    step          text        NOT NULL,
    attempt       integer     NOT NULL,
    status        text        NOT NULL,
    dispatched_at timestamptz NOT NULL,
    finished_at   timestamptz,
    error_type    text,
    error_message text,
    PRIMARY KEY (execution_id, step, attempt)
);

-- Every consumed message id, recorded in the same transaction as its effect.
CREATE TABLE sagaflow_inbox (
    message_id   text        PRIMARY KEY,
    execution_id text        NOT NULL,
    received_at  timestamptz NOT NULL,
    outcome      text        NOT NULL
);

-- Commands waiting for the relay, for buses outside the database (Service Bus).
CREATE TABLE sagaflow_outbox (
    seq          bigserial   PRIMARY KEY,
    queue        text        NOT NULL,
    message_id   text        NOT NULL,
    session_id   text        NOT NULL,
    body         bytea       NOT NULL,
    scheduled_at timestamptz,
    created_at   timestamptz NOT NULL
);

-- Durable timers: retries, timeouts, waits. Changed only under the execution's row lock.
CREATE TABLE sagaflow_timers (
    execution_id text        NOT NULL,
    key          text        NOT NULL,
    kind         text        NOT NULL,
    step         text        NOT NULL,
    attempt      integer     NOT NULL,
    due_at       timestamptz NOT NULL,
    PRIMARY KEY (execution_id, key)
);
CREATE INDEX sagaflow_timers_due ON sagaflow_timers (due_at);
