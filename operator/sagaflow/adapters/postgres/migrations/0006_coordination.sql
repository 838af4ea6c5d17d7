-- Coordination between executions: concurrency limits and correlation keys.

-- spec.concurrency.maxExecutions. Executions of a limited workflow that found no slot
-- wait here, in creation order (seq), while their rows stay Pending with the reason in
-- their state. A row goes when the run is admitted (or, if it was cancelled while it
-- waited, by the next admission pass); deleting the execution (prune) deletes it too.
-- Admission takes a transaction-level advisory lock per (namespace, workflow), so the
-- queue and the count of running executions below are read and changed by one
-- transaction at a time, whichever replica runs it.
CREATE TABLE sagaflow_admission_queue (
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    execution_id text        PRIMARY KEY
                             REFERENCES sagaflow_executions ON DELETE CASCADE,
    namespace    text        NOT NULL,
    workflow     text        NOT NULL,
    -- spec.suspend: started suspended once admitted.
    suspend      boolean     NOT NULL,
    queued_at    timestamptz NOT NULL
);
CREATE INDEX sagaflow_admission_queue_order ON sagaflow_admission_queue (namespace, workflow, seq);

-- The executions holding a slot: started and not finished (Suspended and
-- CompensationFailed ones too). Phase is indexed already, so this index keeps the
-- updates that do not change the phase HOT.
CREATE INDEX sagaflow_executions_started ON sagaflow_executions (namespace, workflow)
    WHERE phase NOT IN ('Pending', 'Completed', 'Failed', 'Compensated', 'Cancelled');

-- spec.correlationKey: at most one unfinished execution of a workflow per namespace
-- holds a key. The column is set at the start and cleared in the transaction that
-- finishes the run (so a Failed run that is redriven does not take its key back from
-- a newer holder); the predicate leaves finished phases out as well.
ALTER TABLE sagaflow_executions ADD COLUMN correlation_key text;
CREATE UNIQUE INDEX sagaflow_executions_correlation
    ON sagaflow_executions (namespace, workflow, correlation_key)
    WHERE correlation_key IS NOT NULL
      AND phase NOT IN ('Completed', 'Failed', 'Compensated', 'Cancelled');
