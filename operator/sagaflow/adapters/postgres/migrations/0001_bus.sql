-- The embedded message bus (sagaflow.adapters.postgres.bus): Service Bus semantics
-- over three tables. All times come from the application's clock, never now().

-- Messages waiting, scheduled or locked by a receiver. A row is deleted when it is
-- completed or dead-lettered.
CREATE TABLE bus_messages (
    queue          text        NOT NULL,
    seq            bigint      GENERATED ALWAYS AS IDENTITY,
    message_id     text        NOT NULL,
    session_id     text        NOT NULL,
    body           bytea       NOT NULL,
    enqueued_at    timestamptz NOT NULL,
    -- NULL: visible at once, whatever the clocks of sender and receiver say.
    visible_at     timestamptz,
    -- The receive that holds the message; equal to its session's lock token.
    lock_token     uuid,
    locked_until   timestamptz,
    delivery_count integer     NOT NULL DEFAULT 0,
    -- (queue, seq) orders a queue's messages: receive scans it in send order.
    PRIMARY KEY (queue, seq),
    -- Duplicate detection: a message id already waiting in the queue is dropped.
    UNIQUE (queue, message_id)
-- Room on each page so lock changes (no indexed column) are HOT updates.
) WITH (fillfactor = 80);

-- Settling checks whether the receiver still holds messages of a session.
CREATE INDEX bus_messages_session ON bus_messages (queue, session_id);

-- Only scheduled messages: when does the next one become visible?
CREATE INDEX bus_messages_scheduled ON bus_messages (queue, visible_at)
    WHERE visible_at IS NOT NULL;

-- Session locks: a row exists while one receive holds the session. Deleted when the
-- holder has settled all its messages; an expired row may be taken over.
CREATE TABLE bus_sessions (
    queue        text        NOT NULL,
    session_id   text        NOT NULL,
    lock_token   uuid        NOT NULL,
    locked_until timestamptz NOT NULL,
    PRIMARY KEY (queue, session_id)
);

CREATE TABLE bus_dead_letters (
    seq              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text        NOT NULL,
    message_id       text        NOT NULL,
    session_id       text        NOT NULL,
    body             bytea       NOT NULL,
    reason           text        NOT NULL,
    description      text        NOT NULL,
    delivery_count   integer     NOT NULL,
    enqueued_at      timestamptz NOT NULL,
    dead_lettered_at timestamptz NOT NULL
);

CREATE INDEX bus_dead_letters_queue ON bus_dead_letters (queue, seq);
