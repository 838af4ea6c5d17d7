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

-- A session's messages in send order: a receive locks those of the sessions it won,
-- settling checks whether the receiver still holds any.
CREATE INDEX bus_messages_session ON bus_messages (queue, session_id, seq);

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

-- Receiving (PostgresBus.receive): one statement, in a function for its SET clauses.
--
-- Every table access in it is a lookup by key, or a walk of an index in order that
-- stops early, whatever the planner believes about the tables. Left to itself it
-- goes wrong in ways that get worse as the queue churns: before the first ANALYZE of
-- a new database it takes a queue for 0.5% of the table and prefers bitmap scans,
-- which read every index entry of the queue, dead ones too, on every call (only
-- plain index scans mark entries dead, so that later scans skip them); and a plan
-- cached while the tables were small (the client's prepared statement, this
-- function's own) keeps its full scans as they grow. Hence no sequential or bitmap
-- scans, and a statement whose every plan is keyed even for tiny tables (checked
-- with EXPLAIN EXECUTE under plan_cache_mode = force_generic_plan).
--
-- `win`: the first p_max messages in send order that are visible, not locked (or
-- whose lock expired) and in a session nobody holds. A walk of the primary key that
-- steps over locked messages with a look at the row and over the entries of settled
-- messages it has marked dead; the session check is a lookup per candidate (OFFSET 0
-- keeps it from becoming a join). For each session these are its oldest available
-- messages, so FIFO holds.
-- `sess` locks those sessions, in order (see the lock order in bus.py); ON CONFLICT
-- re-checks the lock against the latest committed row, so of two concurrent
-- receivers only one gets a session.
-- `ours`: the messages of the won sessions that were in the window (the same
-- conditions, up to its last seq), through each session's index entries. `dead` and
-- `got` read it whole before touching a message, so every session is locked first;
-- they find their rows by seq, and the seq range bounds the walk of the primary key
-- the planner may prefer to one lookup per seq.
-- Rows: 'm' a message; one 'w' with the window's size and the sessions won (the
-- caller releases those that got no message).
CREATE FUNCTION bus_receive(p_queue text, p_now timestamptz, p_max integer,
                            p_until timestamptz, p_max_deliveries integer, p_token uuid)
RETURNS TABLE (kind text, seq bigint, message_id text, session_id text, body bytea,
               delivery_count integer, enqueued_at timestamptz, won text[])
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH win AS MATERIALIZED (
        SELECT m.seq, m.session_id
        FROM bus_messages AS m
        WHERE m.queue = p_queue
          AND (m.visible_at IS NULL OR m.visible_at <= p_now)
          AND (m.locked_until IS NULL OR m.locked_until <= p_now)
          AND NOT EXISTS (
              SELECT FROM bus_sessions AS s
              WHERE s.queue = p_queue AND s.session_id = m.session_id
                AND s.locked_until > p_now
              OFFSET 0)
        ORDER BY m.queue, m.seq
        LIMIT p_max
    ), sess AS (
        INSERT INTO bus_sessions AS s (queue, session_id, lock_token, locked_until)
        SELECT DISTINCT p_queue, w.session_id, p_token, p_until FROM win AS w
        ORDER BY 2
        ON CONFLICT ON CONSTRAINT bus_sessions_pkey DO UPDATE
            SET lock_token = excluded.lock_token, locked_until = excluded.locked_until
            WHERE s.locked_until <= p_now
        RETURNING s.session_id
    ), ours AS (
        SELECT t.seq, t.delivery_count
        FROM sess CROSS JOIN LATERAL (
            SELECT m.seq, m.delivery_count FROM bus_messages AS m
            WHERE m.queue = p_queue AND m.session_id = sess.session_id
              AND m.seq <= (SELECT max(w.seq) FROM win AS w)
              AND (m.visible_at IS NULL OR m.visible_at <= p_now)
              AND (m.locked_until IS NULL OR m.locked_until <= p_now)
            OFFSET 0) AS t
    ), dead AS (
        DELETE FROM bus_messages AS m
        WHERE m.queue = p_queue
          AND m.seq BETWEEN (SELECT min(o.seq) FROM ours AS o)
                        AND (SELECT max(o.seq) FROM ours AS o)
          AND m.seq = ANY (ARRAY(SELECT o.seq FROM ours AS o
                                 WHERE o.delivery_count >= p_max_deliveries))
          AND (m.visible_at IS NULL OR m.visible_at <= p_now)
          AND (m.locked_until IS NULL OR m.locked_until <= p_now)
          AND m.delivery_count >= p_max_deliveries
        RETURNING m.message_id, m.session_id, m.body, m.delivery_count, m.enqueued_at
    ), buried AS (
        INSERT INTO bus_dead_letters (queue, message_id, session_id, body, reason,
                                      description, delivery_count, enqueued_at,
                                      dead_lettered_at)
        SELECT p_queue, d.message_id, d.session_id, d.body, 'MaxDeliveryCountExceeded',
               format('delivered %s times, the maximum', d.delivery_count),
               d.delivery_count, d.enqueued_at, p_now
        FROM dead AS d
    ), got AS (
        UPDATE bus_messages AS m
        SET lock_token = p_token, locked_until = p_until,
            delivery_count = m.delivery_count + 1
        WHERE m.queue = p_queue
          AND m.seq BETWEEN (SELECT min(o.seq) FROM ours AS o)
                        AND (SELECT max(o.seq) FROM ours AS o)
          AND m.seq = ANY (ARRAY(SELECT o.seq FROM ours AS o
                                 WHERE o.delivery_count < p_max_deliveries))
          AND (m.visible_at IS NULL OR m.visible_at <= p_now)
          AND (m.locked_until IS NULL OR m.locked_until <= p_now)
          AND m.delivery_count < p_max_deliveries
        RETURNING m.seq, m.message_id, m.session_id, m.body, m.delivery_count,
                  m.enqueued_at
    )
    SELECT 'm', g.seq, g.message_id, g.session_id, g.body, g.delivery_count,
           g.enqueued_at, NULL::text[]
    FROM got AS g
    UNION ALL
    SELECT 'w', (SELECT count(*) FROM win), NULL, NULL, NULL, NULL, NULL,
           (SELECT array_agg(x.session_id) FROM sess AS x);
END
$$;
