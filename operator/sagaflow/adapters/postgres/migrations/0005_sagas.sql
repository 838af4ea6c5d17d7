-- Sagas: a step's compensation attempts are numbered apart from its forward attempts,
-- so an attempt row is keyed by whether it undoes the step too.
ALTER TABLE sagaflow_step_attempts ADD COLUMN compensation boolean NOT NULL DEFAULT false;
ALTER TABLE sagaflow_step_attempts DROP CONSTRAINT sagaflow_step_attempts_pkey;
ALTER TABLE sagaflow_step_attempts ADD PRIMARY KEY (execution_id, step, compensation, attempt);

-- Compensated is terminal too: the active index leaves it out.
DROP INDEX sagaflow_executions_active;
CREATE INDEX sagaflow_executions_active ON sagaflow_executions (phase)
    WHERE phase NOT IN ('Completed', 'Failed', 'Cancelled', 'Compensated');
