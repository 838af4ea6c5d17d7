-- Each Schedule's place in time: where its ticks stand and what they did. One row per
-- Schedule, put by the operator's handlers or `sagaflow server`'s files, and read by
-- the schedule runner of every replica: a pass locks a due row (FOR UPDATE SKIP
-- LOCKED), starts its ticks through the start path, and moves `cursor` on in the same
-- transaction, so two replicas never handle one tick and a crash before the commit
-- hands it to the next pass (whose start is then a repeat, by the tick's key).
CREATE TABLE sagaflow_schedules (
    namespace          text        NOT NULL,
    name               text        NOT NULL,
    -- A Schedule deleted and created again under its name is a new uid: new keys,
    -- counts from zero.
    uid                text        NOT NULL,
    spec               jsonb       NOT NULL,
    -- Interval ticks count from here (the Schedule's creation, to the second).
    created_at         timestamptz NOT NULL,
    -- The last nominal tick handled: the next pass looks at the ticks after it.
    cursor             timestamptz NOT NULL,
    -- overlap BufferOne: the one tick waiting for the schedule's run to finish.
    buffered_tick      timestamptz,
    started            bigint      NOT NULL DEFAULT 0,
    skipped            bigint      NOT NULL DEFAULT 0,
    missed             bigint      NOT NULL DEFAULT 0,
    -- Ticks whose start was refused (an unknown workflow, an input that does not render).
    failed             bigint      NOT NULL DEFAULT 0,
    last_schedule_time timestamptz,
    -- The first tick after `cursor`; NULL while suspended or when the cron has none.
    next_schedule_time timestamptz,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE INDEX sagaflow_schedules_next ON sagaflow_schedules (next_schedule_time);
CREATE INDEX sagaflow_schedules_buffered ON sagaflow_schedules (namespace, name)
    WHERE buffered_tick IS NOT NULL;
