-- What each Trigger has done: the counts its status shows (`kubectl get triggers`,
-- `sagaflow server`'s listing). One row per Trigger, added to after the events it
-- counts have taken effect (a run started, a signal applied) and before they are
-- settled, so a crash in between counts a redelivered event again, as a duplicate.
-- `uid` tells a Trigger recreated under the same name from the old one: the first
-- count under a new uid starts the row from zero.
CREATE TABLE sagaflow_trigger_counts (
    namespace       text        NOT NULL,
    name            text        NOT NULL,
    uid             text        NOT NULL,
    started         bigint      NOT NULL DEFAULT 0,
    signalled       bigint      NOT NULL DEFAULT 0,
    filtered        bigint      NOT NULL DEFAULT 0,
    duplicates      bigint      NOT NULL DEFAULT 0,
    dead_lettered   bigint      NOT NULL DEFAULT 0,
    last_event_time timestamptz,
    PRIMARY KEY (namespace, name)
);
