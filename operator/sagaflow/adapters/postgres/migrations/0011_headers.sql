-- Message headers (Service Bus's application properties): the W3C `traceparent` of
-- the trace a command or event belongs to (sagaflow.telemetry.tracing), and whatever
-- else a sender attaches. A JSON object of strings, NULL when a message has none.
-- Waiting messages and outbox rows keep them; a dead letter keeps its message's, so
-- the step it fails is still in the trace.
ALTER TABLE bus_messages ADD COLUMN headers jsonb;
ALTER TABLE bus_dead_letters ADD COLUMN headers jsonb;
ALTER TABLE sagaflow_outbox ADD COLUMN headers jsonb;

-- Receiving, as in 0004 (read its notes there, and 0001's), now returning each
-- message's headers and keeping them on the messages it dead-letters.
DROP FUNCTION bus_receive(text, timestamptz, integer, timestamptz, integer, uuid, uuid, integer);
CREATE FUNCTION bus_receive(p_queue text, p_now timestamptz, p_max integer,
                            p_until timestamptz, p_max_deliveries integer, p_token uuid,
                            p_receiver uuid, p_max_crashes integer)
RETURNS TABLE (kind text, seq bigint, message_id text, session_id text, body bytea,
               delivery_count integer, enqueued_at timestamptz, crash_count integer,
               won text[], headers jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH cand AS MATERIALIZED (
        SELECT m.seq, m.session_id, m.crash_count
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
    ), suspect AS MATERIALIZED (
        SELECT c.seq, c.session_id FROM cand AS c WHERE c.crash_count >= 2
        ORDER BY c.seq LIMIT 1
    ), win AS MATERIALIZED (
        SELECT x.seq, x.session_id FROM suspect AS x
        UNION ALL
        SELECT c.seq, c.session_id FROM cand AS c WHERE NOT EXISTS (SELECT FROM suspect)
    ), sess AS (
        INSERT INTO bus_sessions AS s (queue, session_id, lock_token, locked_until, receiver)
        SELECT DISTINCT p_queue, w.session_id, p_token, p_until, p_receiver FROM win AS w
        ORDER BY 2
        ON CONFLICT ON CONSTRAINT bus_sessions_pkey DO UPDATE
            SET lock_token = excluded.lock_token, locked_until = excluded.locked_until,
                receiver = excluded.receiver
            WHERE s.locked_until <= p_now
        RETURNING s.session_id
    ), ours AS (
        SELECT t.seq, t.delivery_count, t.crash_count, t.lone_crashes
        FROM sess CROSS JOIN LATERAL (
            SELECT m.seq, m.delivery_count, m.crash_count, m.lone_crashes
            FROM bus_messages AS m
            WHERE m.queue = p_queue AND m.session_id = sess.session_id
              AND m.seq <= (SELECT max(w.seq) FROM win AS w)
              AND (m.visible_at IS NULL OR m.visible_at <= p_now)
              AND (m.locked_until IS NULL OR m.locked_until <= p_now)
            OFFSET 0) AS t
    ), doomed AS MATERIALIZED (
        SELECT o.seq FROM ours AS o
        WHERE o.delivery_count - o.crash_count >= p_max_deliveries
           OR o.lone_crashes >= p_max_crashes
    ), dead AS (
        DELETE FROM bus_messages AS m
        WHERE m.queue = p_queue
          AND m.seq BETWEEN (SELECT min(o.seq) FROM ours AS o)
                        AND (SELECT max(o.seq) FROM ours AS o)
          AND m.seq = ANY (ARRAY(SELECT d.seq FROM doomed AS d))
          AND (m.visible_at IS NULL OR m.visible_at <= p_now)
          AND (m.locked_until IS NULL OR m.locked_until <= p_now)
        RETURNING m.message_id, m.session_id, m.body, m.delivery_count, m.enqueued_at,
                  m.crash_count, m.lone_crashes, m.headers
    ), buried AS (
        INSERT INTO bus_dead_letters (queue, message_id, session_id, body, reason,
                                      description, delivery_count, enqueued_at,
                                      dead_lettered_at, crash_count, headers)
        SELECT p_queue, d.message_id, d.session_id, d.body,
               CASE WHEN d.lone_crashes >= p_max_crashes THEN 'ReceiverCrashed'
                    ELSE 'MaxDeliveryCountExceeded' END,
               CASE WHEN d.lone_crashes >= p_max_crashes
                    THEN format('the receiving process died %s times while it ran this '
                                'message alone (%s deaths while holding it in all)',
                                d.lone_crashes, d.crash_count)
                    WHEN d.crash_count > 0
                    THEN format('delivered %s times, the maximum (and %s more times to '
                                'receivers that died)', d.delivery_count - d.crash_count,
                                d.crash_count)
                    ELSE format('delivered %s times, the maximum', d.delivery_count) END,
               d.delivery_count, d.enqueued_at, p_now, d.crash_count, d.headers
        FROM dead AS d
        -- Notifications repeated in one transaction are delivered once.
        RETURNING pg_notify('sagaflow_dead_letters', p_queue)
    ), got AS (
        UPDATE bus_messages AS m
        SET lock_token = p_token, locked_until = p_until,
            delivery_count = m.delivery_count + 1
        WHERE m.queue = p_queue
          AND m.seq BETWEEN (SELECT min(o.seq) FROM ours AS o)
                        AND (SELECT max(o.seq) FROM ours AS o)
          AND m.seq = ANY (ARRAY(SELECT o.seq FROM ours AS o
                                 WHERE o.seq NOT IN (SELECT d.seq FROM doomed AS d)))
          AND (m.visible_at IS NULL OR m.visible_at <= p_now)
          AND (m.locked_until IS NULL OR m.locked_until <= p_now)
        RETURNING m.seq, m.message_id, m.session_id, m.body, m.delivery_count,
                  m.enqueued_at, m.crash_count, m.headers
    )
    SELECT 'm', g.seq, g.message_id, g.session_id, g.body, g.delivery_count,
           g.enqueued_at, g.crash_count, NULL::text[], g.headers
    FROM got AS g
    UNION ALL
    SELECT 'w', (SELECT count(*) FROM win), NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT array_agg(x.session_id) FROM sess AS x), NULL::jsonb;
END
$$;
