"""The SQL of the embedded bus (`bus.py`), each statement with the reason for its shape.

Kept apart from the adapter's behaviour because the statements are long and their
notes longer: the lock order that keeps them free of deadlocks, why settling checks
expiry, what each returns. Every statement works on arrays (`unnest`), so a batch is
one round trip; `bus_receive` and `bus_reap` live in the migrations.
"""

# $1-$5 and $7 the messages' columns (headers as JSON text, NULL for none), $6 now.
SEND = """
WITH ins AS (
    INSERT INTO bus_messages (queue, message_id, session_id, body, enqueued_at, visible_at,
                              headers)
    SELECT t.queue, t.message_id, t.session_id, t.body, $6, t.visible_at, t.headers::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::timestamptz[],
                $7::text[])
         WITH ORDINALITY AS t(queue, message_id, session_id, body, visible_at, headers, ord)
    ORDER BY t.ord
    ON CONFLICT (queue, message_id) DO NOTHING
    RETURNING queue
)
SELECT pg_notify('sagaflow_bus', d.queue) FROM (SELECT DISTINCT queue FROM ins) AS d
"""

# $1 queue, $2 now, $3 max messages, $4 locked until, $5 max delivery count, $6 the
# receive's lock token, $7 this receiver, $8 max crashes. The statement is
# `bus_receive` in the migrations (0001, 0004, 0011), which say what it does and why it is a
# function. Rows: 'm' a message; one 'w' with the size of the window and the sessions
# won (those that got no message are to be released).
RECEIVE = "SELECT * FROM bus_receive($1, $2, $3, $4, $5, $6, $7, $8)"

# Lock order, to stay free of deadlocks: every statement locks session rows first,
# in (queue, session_id) order, then messages. A receive (`bus_receive`) inserts its
# sessions sorted (ON CONFLICT locks even the rows it fails to take) and reads them
# all back before it touches a message; settling locks its sessions with a sorted
# FOR UPDATE and touches messages only after that (`AFTER_LOCKING` is a one-time
# gate evaluated before the first message row).
AFTER_LOCKING = "(SELECT count(*) FROM locked) >= 0"

# $1 queue, $2 now: when may a waiting receiver find something without a notification?
NEXT_DUE = """
SELECT least(
    (SELECT min(visible_at) FROM bus_messages WHERE queue = $1 AND visible_at > $2),
    (SELECT min(locked_until) FROM bus_sessions WHERE queue = $1 AND locked_until > $2))
"""

# Settling: $1-$4 are the messages' queues, seqs, lock tokens and session ids.
LOCK_SESSIONS = """
WITH held AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[])
        AS t(queue, seq, token, session_id)
), locked AS MATERIALIZED (
    SELECT s.queue, s.session_id, s.lock_token FROM bus_sessions s
    WHERE (s.queue, s.session_id, s.lock_token) IN (SELECT queue, session_id, token FROM held)
    ORDER BY s.queue, s.session_id
    FOR UPDATE
)"""

# After a `settled` CTE: release the locked sessions of which the holder keeps no
# message (the snapshot still shows the settled rows, hence the seq filter), and wake
# the queue's waiters when a released session has messages waiting.
RELEASE_AND_WAKE = """
, released AS (
    DELETE FROM bus_sessions s USING locked d
    WHERE s.queue = d.queue AND s.session_id = d.session_id
      AND NOT EXISTS (
          SELECT 1 FROM bus_messages h
          WHERE h.queue = d.queue AND h.session_id = d.session_id
            AND h.lock_token = d.lock_token AND h.seq <> ALL($2::bigint[]))
    RETURNING s.queue, s.session_id
), woken AS (
    SELECT pg_notify('sagaflow_bus', d.queue)
    FROM (SELECT DISTINCT r.queue FROM released r
          WHERE EXISTS (SELECT 1 FROM bus_messages p
                        WHERE p.queue = r.queue AND p.session_id = r.session_id
                          AND {pending})) AS d
)
SELECT (SELECT count(*) FROM settled), (SELECT count(*) FROM woken)
"""

HELD_MATCH = f"""{AFTER_LOCKING}
      AND m.queue = t.queue AND m.seq = t.seq AND m.lock_token = t.token"""
OTHERS_PENDING = "p.seq <> ALL($2::bigint[])"

# $5 now: an expired lock is lost even if nobody has taken the message yet.
COMPLETE = f"""{LOCK_SESSIONS}, settled AS (
    DELETE FROM bus_messages m USING held t
    WHERE {HELD_MATCH} AND m.locked_until > $5
    RETURNING m.queue, m.session_id
)""" + RELEASE_AND_WAKE.format(pending=OTHERS_PENDING)

# $5 now, $6 reason, $7 description.
DEAD_LETTER = f"""{LOCK_SESSIONS}, settled AS (
    DELETE FROM bus_messages m USING held t
    WHERE {HELD_MATCH} AND m.locked_until > $5
    RETURNING m.*
), buried AS (
    INSERT INTO bus_dead_letters (queue, message_id, session_id, body, reason, description,
                                  delivery_count, enqueued_at, dead_lettered_at, crash_count,
                                  headers)
    SELECT queue, message_id, session_id, body, $6, $7, delivery_count, enqueued_at, $5,
           crash_count, headers
    FROM settled
    -- Notifications repeated in one transaction are delivered once.
    RETURNING pg_notify('sagaflow_dead_letters', queue)
)""" + RELEASE_AND_WAKE.format(pending=OTHERS_PENDING)

# Abandoning does not check expiry: the message is meant to be redelivered anyway,
# and a lock taken over by another receiver no longer matches the token. The
# abandoned messages themselves are pending, so a release always wakes.
ABANDON = f"""{LOCK_SESSIONS}, settled AS (
    UPDATE bus_messages m SET lock_token = NULL, locked_until = NULL
    FROM held t
    WHERE {HELD_MATCH}
    RETURNING m.queue, m.session_id
)""" + RELEASE_AND_WAKE.format(pending="true")

# $5 now, $6 new locked_until. The main query reads `renewed` only, so `relocked`
# runs after it, when all the sessions are locked.
RENEW = f"""{LOCK_SESSIONS}, renewed AS (
    UPDATE bus_sessions s SET locked_until = $6
    FROM locked d
    WHERE s.queue = d.queue AND s.session_id = d.session_id AND s.locked_until > $5
    RETURNING s.queue, s.session_id, s.lock_token
), relocked AS (
    UPDATE bus_messages m SET locked_until = $6
    FROM renewed r
    WHERE m.queue = r.queue AND m.session_id = r.session_id AND m.lock_token = r.lock_token
)
SELECT (SELECT count(*) FROM renewed),
       (SELECT count(*) FROM (SELECT DISTINCT queue, session_id FROM held) AS d)
"""

DEAD_LETTERS = """SELECT queue, message_id, session_id, body, reason, description,
    delivery_count, dead_lettered_at FROM bus_dead_letters WHERE queue = $1 ORDER BY seq"""


# Receives whose answer never came: $1 their tokens. Their sessions are released and
# the delivery they counted is taken back.
RELEASE_TOKENS = """
WITH gone AS (
    DELETE FROM bus_sessions WHERE lock_token = ANY($1::uuid[])
    RETURNING queue, session_id, lock_token
), released AS (
    UPDATE bus_messages m
    SET lock_token = NULL, locked_until = NULL, delivery_count = greatest(m.delivery_count - 1, 0)
    FROM gone g
    WHERE m.queue = g.queue AND m.session_id = g.session_id AND m.lock_token = g.lock_token
    RETURNING m.queue
)
SELECT pg_notify('sagaflow_bus', d.queue) FROM (SELECT DISTINCT queue FROM released) AS d
"""

# Dead letters waiting to be handled: $1 queue, $2 now, $3 token, $4 locked until, $5 max.
RECEIVE_DEAD = """
UPDATE bus_dead_letters d SET lock_token = $3, locked_until = $4
WHERE d.seq IN (SELECT x.seq FROM bus_dead_letters x
                WHERE x.queue = $1 AND x.handled_at IS NULL
                  AND (x.locked_until IS NULL OR x.locked_until <= $2)
                ORDER BY x.seq LIMIT $5 FOR UPDATE SKIP LOCKED)
RETURNING seq, queue, message_id, session_id, body, reason, description, delivery_count,
          enqueued_at, dead_lettered_at, crash_count, headers
"""
# $1 seqs, $2 tokens, $3 now: handled, kept for inspection.
COMPLETE_DEAD = """
UPDATE bus_dead_letters d SET handled_at = $3, lock_token = NULL, locked_until = NULL
FROM unnest($1::bigint[], $2::uuid[]) AS t(seq, token)
WHERE d.seq = t.seq AND d.lock_token = t.token AND d.locked_until > $3
  AND d.handled_at IS NULL
"""
