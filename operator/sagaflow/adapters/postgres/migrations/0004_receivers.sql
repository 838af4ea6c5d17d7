-- Receivers of the embedded bus, and what their deaths mean for the messages they held.
--
-- Every PostgresBus that receives registers here with a lease it renews (the
-- database's clock, not the application's) and the identity of its process. Session
-- locks name the receiver that holds them. A receiver found dead (its process is gone
-- from a machine that can check it, or its lease ran out) is REAPED: its sessions and
-- message locks are released at once, and each message it held counts a crash instead
-- of a failed delivery. So recovering after a crash never touches the locks of a live
-- process (the old rule was "release every lock at start"), and a crash loop does not
-- push the healthy messages it happened to hold towards the dead letters.
CREATE TABLE bus_receivers (
    receiver    uuid        PRIMARY KEY,
    -- Where pids mean something: the kernel's boot id and the pid namespace. A process
    -- with the same `host` can tell whether `pid` still runs.
    host        text        NOT NULL,
    hostname    text        NOT NULL,
    pid         integer     NOT NULL,
    -- The process's start time in clock ticks since boot: a reused pid has another.
    pid_started bigint      NOT NULL,
    started_at  timestamptz NOT NULL,
    lease_until timestamptz NOT NULL
);

ALTER TABLE bus_sessions ADD COLUMN receiver uuid;
CREATE INDEX bus_sessions_receiver ON bus_sessions (receiver) WHERE receiver IS NOT NULL;

-- crash_count: deliveries that ended with the receiver's death (not counted against
-- the maximum delivery count). lone_crashes: those where the message was already a
-- suspect and was the only thing its receiver held: the death is on the message.
ALTER TABLE bus_messages
    ADD COLUMN crash_count  integer NOT NULL DEFAULT 0,
    ADD COLUMN lone_crashes integer NOT NULL DEFAULT 0;

-- Dead letters are received like messages (by the orchestrator, which fails the step
-- they belong to) and kept once handled, for inspection.
ALTER TABLE bus_dead_letters
    ADD COLUMN crash_count  integer NOT NULL DEFAULT 0,
    ADD COLUMN lock_token   uuid,
    ADD COLUMN locked_until timestamptz,
    ADD COLUMN handled_at   timestamptz;
CREATE INDEX bus_dead_letters_unhandled ON bus_dead_letters (queue, seq)
    WHERE handled_at IS NULL;

-- Receiving, as in 0001 (read its notes there), with three changes:
-- * sessions record the receiving bus (p_receiver);
-- * a message held by receivers that died twice (crash_count >= 2: one death may be
--   bad luck, a kill -9 or an OOM of a busy process, and costs nothing but the
--   redelivery) is a suspect and goes out ALONE: when the window holds one, the
--   receive returns only the first (with any older message of its session). The runner
--   host then runs it with nothing else running, so a death while it runs is on it
--   (`SUSPECT_AFTER_CRASHES` in sagaflow.core.ports says the same);
-- * the dead-letter rule: deliveries that did not end in a crash reach
--   p_max_deliveries (MaxDeliveryCountExceeded), or deaths while running alone reach
--   p_max_crashes (ReceiverCrashed).
DROP FUNCTION bus_receive(text, timestamptz, integer, timestamptz, integer, uuid);
CREATE FUNCTION bus_receive(p_queue text, p_now timestamptz, p_max integer,
                            p_until timestamptz, p_max_deliveries integer, p_token uuid,
                            p_receiver uuid, p_max_crashes integer)
RETURNS TABLE (kind text, seq bigint, message_id text, session_id text, body bytea,
               delivery_count integer, enqueued_at timestamptz, crash_count integer,
               won text[])
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
                  m.crash_count, m.lone_crashes
    ), buried AS (
        INSERT INTO bus_dead_letters (queue, message_id, session_id, body, reason,
                                      description, delivery_count, enqueued_at,
                                      dead_lettered_at, crash_count)
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
               d.delivery_count, d.enqueued_at, p_now, d.crash_count
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
                  m.enqueued_at, m.crash_count
    )
    SELECT 'm', g.seq, g.message_id, g.session_id, g.body, g.delivery_count,
           g.enqueued_at, g.crash_count, NULL::text[]
    FROM got AS g
    UNION ALL
    SELECT 'w', (SELECT count(*) FROM win), NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT array_agg(x.session_id) FROM sess AS x);
END
$$;

-- Reaping (PostgresBus heartbeat): the receivers named dead by a process on their host
-- (p_dead), and, when p_expired, every receiver whose lease ran out. For each, in the
-- bus's lock order (sessions, then messages): its messages lose their locks and count
-- a crash, a lone crash too when the message was a suspect already (two crashes) and
-- the only session held (see bus_receive); its sessions and its row go. SKIP LOCKED: two
-- reapers never count one death twice. Rows: each receiver reaped and what it held.
CREATE FUNCTION bus_reap(p_dead uuid[], p_expired boolean)
RETURNS TABLE (receiver uuid, hostname text, pid integer, sessions integer,
               messages integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    r record;
    v_sessions integer;
BEGIN
    FOR r IN
        SELECT x.receiver, x.hostname, x.pid FROM bus_receivers AS x
        WHERE x.receiver = ANY (p_dead) OR (p_expired AND x.lease_until < now())
        ORDER BY x.receiver
        FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM 1 FROM bus_sessions AS s WHERE s.receiver = r.receiver
        ORDER BY s.queue, s.session_id FOR UPDATE;
        SELECT count(*) INTO v_sessions FROM bus_sessions AS s WHERE s.receiver = r.receiver;
        WITH held AS (
            SELECT s.queue, s.session_id, s.lock_token FROM bus_sessions AS s
            WHERE s.receiver = r.receiver
        ), released AS (
            UPDATE bus_messages AS m
            SET lock_token = NULL, locked_until = NULL,
                lone_crashes = m.lone_crashes
                    + CASE WHEN v_sessions = 1 AND m.crash_count >= 2 THEN 1 ELSE 0 END,
                crash_count = m.crash_count + 1
            FROM held AS h
            WHERE m.queue = h.queue AND m.session_id = h.session_id
              AND m.lock_token = h.lock_token
            -- Wakes the queue's waiters (repeats within a transaction are sent once).
            RETURNING pg_notify('sagaflow_bus', m.queue)
        )
        SELECT r.receiver, r.hostname, r.pid, v_sessions, (SELECT count(*) FROM released)
        INTO receiver, hostname, pid, sessions, messages;
        DELETE FROM bus_sessions AS s WHERE s.receiver = r.receiver;
        DELETE FROM bus_receivers AS x WHERE x.receiver = r.receiver;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Churn. The bus tables see a row inserted and deleted per message and per receive,
-- the execution rows one update per transition: left to the default thresholds
-- (20% of the table), autovacuum comes too late in a busy run, and receives walk ever
-- more dead index entries. Vacuum them after a fixed number of changes instead, and
-- leave room on execution pages so most updates are HOT (no index entries written).
ALTER TABLE bus_messages SET (autovacuum_vacuum_scale_factor = 0,
                              autovacuum_vacuum_threshold = 2000,
                              autovacuum_vacuum_cost_delay = 0);
ALTER TABLE bus_sessions SET (autovacuum_vacuum_scale_factor = 0,
                              autovacuum_vacuum_threshold = 2000,
                              autovacuum_vacuum_cost_delay = 0);
ALTER TABLE sagaflow_executions SET (fillfactor = 70,
                                     autovacuum_vacuum_scale_factor = 0.05);
