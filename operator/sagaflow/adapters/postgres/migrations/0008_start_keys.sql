-- The one start path's idempotency keys: a key always yields the same execution.
-- Written in the start's own transaction; `request_hash` tells a repeat (same request)
-- from a different request under a used key (refused). The source says which schedule
-- or trigger started the run, so overlap policies can find the runs it has going.
CREATE TABLE sagaflow_start_keys (
    namespace     text        NOT NULL,
    key           text        NOT NULL,
    request_hash  text        NOT NULL,
    execution_id  text        NOT NULL REFERENCES sagaflow_executions ON DELETE CASCADE,
    source_kind   text        NOT NULL,
    source_name   text        NOT NULL,
    source_uid    text        NOT NULL,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX sagaflow_start_keys_source ON sagaflow_start_keys (namespace, source_kind, source_name);
CREATE INDEX sagaflow_start_keys_execution ON sagaflow_start_keys (execution_id);
