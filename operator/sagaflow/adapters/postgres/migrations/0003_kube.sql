-- Executions started from Kubernetes custom resources.
--
-- An Execution object is keyed by its uid, which becomes the execution id. Deleting
-- the object cancels the execution and RELEASES its name: the row and its history
-- stay, and a new object of the same name starts a new execution. So a name is
-- unique only among executions not released.
ALTER TABLE sagaflow_executions ADD COLUMN released_at timestamptz;
ALTER TABLE sagaflow_executions DROP CONSTRAINT sagaflow_executions_namespace_name_key;
CREATE UNIQUE INDEX sagaflow_executions_live_name ON sagaflow_executions (namespace, name)
    WHERE released_at IS NULL;

-- What of each object-backed execution has been written back to Kubernetes: the
-- state revision in its status and the last history row posted as an Event. The
-- status mirror locks these rows (never the execution rows, so mirroring does not
-- hold up transitions) and advances them only after the writes succeeded.
CREATE TABLE sagaflow_kube_executions (
    execution_id      text        PRIMARY KEY,
    namespace         text        NOT NULL,
    name              text        NOT NULL,
    -- Delete the object this long after the execution finished; NULL: keep it.
    ttl_seconds       integer,
    mirrored_revision bigint      NOT NULL DEFAULT -1,
    event_seq         bigint      NOT NULL DEFAULT 0,
    released_at       timestamptz
);
CREATE INDEX sagaflow_kube_executions_live ON sagaflow_kube_executions (execution_id)
    WHERE released_at IS NULL;
