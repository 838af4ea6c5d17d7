-- Child executions (a `workflowRef` step's attempt): which run started which, written
-- in the transaction that starts the child. In a cluster the status mirror creates an
-- Execution object for each child of an object-backed parent (owner-referenced to
-- the parent's object) and sets `materialized`; elsewhere the rows only link the two.
CREATE TABLE sagaflow_children (
    execution_id  text        PRIMARY KEY REFERENCES sagaflow_executions ON DELETE CASCADE,
    parent_id     text        NOT NULL,
    created_at    timestamptz NOT NULL,
    materialized  boolean     NOT NULL DEFAULT false
);
CREATE INDEX sagaflow_children_parent ON sagaflow_children (parent_id);
CREATE INDEX sagaflow_children_pending ON sagaflow_children (created_at) WHERE NOT materialized;
