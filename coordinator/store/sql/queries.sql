-- Every statement the coordinator's store runs, by name (see queries.py).

-- name: now
SELECT now() AS now;

-- name: insert_saga
INSERT INTO sagaplane_sagas
    (id, name, state, context, idempotency_key, request_hash, created_at, updated_at,
     completed_at, deadline_at, trace_context)
VALUES (%(id)s, %(name)s, %(state)s, %(context)s, %(idempotency_key)s, %(request_hash)s,
        %(created_at)s, %(updated_at)s, %(completed_at)s, %(deadline_at)s, %(trace_context)s)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id;

-- == many sagas at once (StartSagas) ================================================
-- Each takes %(rows)s, a JSON array of the parameters of its one-row counterpart above
-- or below (sagaplane.batch.records), and inserts every row in one statement.

-- name: insert_sagas
-- In idempotency key order: two batches that share keys wait for each other's keys in
-- the same order, so they cannot deadlock. Returns the sagas inserted; a key already
-- taken inserts nothing (see select_sagas_by_keys).
INSERT INTO sagaplane_sagas
    (id, name, state, context, idempotency_key, request_hash, created_at, updated_at,
     completed_at, deadline_at, trace_context)
SELECT id, name, state, context, idempotency_key, request_hash, created_at, updated_at,
       completed_at, deadline_at, trace_context
FROM jsonb_to_recordset(%(rows)s::jsonb)
    AS r (id text, name text, state text, context jsonb, idempotency_key text,
          request_hash bytea, created_at timestamptz, updated_at timestamptz,
          completed_at timestamptz, deadline_at timestamptz, trace_context jsonb)
ORDER BY idempotency_key
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id;

-- name: select_sagas_by_keys
-- The sagas that already hold these keys (other than %(ids)s, the batch's own new ones).
SELECT * FROM sagaplane_sagas
WHERE idempotency_key = ANY(%(keys)s::text[]) AND NOT id = ANY(%(ids)s::text[]);

-- name: select_steps_by_keys
SELECT st.* FROM sagaplane_steps st JOIN sagaplane_sagas s ON s.id = st.saga_id
WHERE s.idempotency_key = ANY(%(keys)s::text[]) AND NOT s.id = ANY(%(ids)s::text[])
ORDER BY st.saga_id, st.position;

-- name: insert_steps
INSERT INTO sagaplane_steps
    (saga_id, position, id, name, action, compensation, input, output, status, error,
     attempts, compensation_attempts, token, executed_at, compensated_at, retry_policy,
     compensation_retry_policy, timeout_ms, deadline_at, outcome_unknown, depends_on, condition)
SELECT saga_id, position, id, name, action, compensation, input, output, status, error,
       attempts, compensation_attempts, token, executed_at, compensated_at, retry_policy,
       compensation_retry_policy, timeout_ms, deadline_at, outcome_unknown, depends_on,
       condition
FROM jsonb_to_recordset(%(rows)s::jsonb)
    AS r (saga_id text, position smallint, id text, name text, action text,
          compensation text, input jsonb, output jsonb, status text, error text,
          attempts integer, compensation_attempts integer, token text,
          executed_at timestamptz, compensated_at timestamptz, retry_policy jsonb,
          compensation_retry_policy jsonb, timeout_ms bigint, deadline_at timestamptz,
          outcome_unknown boolean, depends_on integer[], condition text);

-- name: insert_histories
-- In the array's order: a saga's history is read back in id order.
INSERT INTO sagaplane_history (saga_id, from_state, to_state, step_name, event, reason,
                               caller)
SELECT saga_id, from_state, to_state, step_name, event, reason, caller
FROM ROWS FROM (
        jsonb_to_recordset(%(rows)s::jsonb)
        AS (saga_id text, from_state text, to_state text, step_name text, event text,
            reason text, caller text)
    ) WITH ORDINALITY AS r (saga_id, from_state, to_state, step_name, event, reason, caller, n)
ORDER BY n;

-- name: find_by_idempotency_key
SELECT id, request_hash FROM sagaplane_sagas WHERE idempotency_key = %(key)s;

-- name: insert_step
INSERT INTO sagaplane_steps
    (saga_id, position, id, name, action, compensation, input, output, status, error,
     attempts, compensation_attempts, token, executed_at, compensated_at, retry_policy,
     compensation_retry_policy, timeout_ms, deadline_at, outcome_unknown, depends_on, condition)
VALUES (%(saga_id)s, %(position)s, %(id)s, %(name)s, %(action)s, %(compensation)s, %(input)s,
        %(output)s, %(status)s, %(error)s, %(attempts)s, %(compensation_attempts)s, %(token)s,
        %(executed_at)s, %(compensated_at)s, %(retry_policy)s, %(compensation_retry_policy)s,
        %(timeout_ms)s, %(deadline_at)s, %(outcome_unknown)s, %(depends_on)s, %(condition)s);

-- name: update_step
UPDATE sagaplane_steps
SET output = %(output)s, status = %(status)s, error = %(error)s, attempts = %(attempts)s,
    compensation_attempts = %(compensation_attempts)s, token = %(token)s,
    executed_at = %(executed_at)s, compensated_at = %(compensated_at)s,
    deadline_at = %(deadline_at)s, outcome_unknown = %(outcome_unknown)s
WHERE saga_id = %(saga_id)s AND position = %(position)s;

-- name: update_step_input
-- Only when the input changed: references to earlier steps' outputs, resolved at dispatch.
UPDATE sagaplane_steps SET input = %(input)s
WHERE saga_id = %(saga_id)s AND position = %(position)s;

-- name: update_saga
UPDATE sagaplane_sagas
SET state = %(state)s, updated_at = %(updated_at)s, completed_at = %(completed_at)s,
    deadline_at = %(deadline_at)s
WHERE id = %(id)s;

-- name: insert_history
INSERT INTO sagaplane_history (saga_id, from_state, to_state, step_name, event, reason,
                               caller)
VALUES (%(saga_id)s, %(from_state)s, %(to_state)s, %(step_name)s, %(event)s, %(reason)s,
        %(caller)s);

-- name: lock_sagas
-- Locks in id order, so that two transactions locking overlapping sets cannot deadlock.
SELECT *, now() AS db_now FROM sagaplane_sagas WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE;

-- name: select_sagas
SELECT * FROM sagaplane_sagas WHERE id = ANY(%(ids)s);

-- name: select_steps
SELECT * FROM sagaplane_steps WHERE saga_id = ANY(%(ids)s) ORDER BY saga_id, position;

-- name: select_history
SELECT * FROM sagaplane_history WHERE saga_id = %(saga_id)s ORDER BY id;

-- name: select_returned_commands
-- The unsent outbox rows of these sagas' commands that the broker returned as unroutable
-- (sagaplane/delivery.py): GetSaga and WatchSaga show why such a step waits. Read with the
-- saga in the same round trip, from the partial index of migration 0014, which holds only
-- such rows (the coordinator's outbox rows carry their saga's id as correlation_id).
SELECT message_id, routing_key FROM sagaplane_outbox
WHERE correlation_id = ANY(%(ids)s::text[]) AND sent_at IS NULL AND returned > 0;

-- name: select_history_after
-- WatchSaga's catch-up: the entries after the watcher's last position. Per saga, ids
-- grow in commit order (the saga row lock serialises its transitions).
SELECT * FROM sagaplane_history WHERE saga_id = %(saga_id)s AND id > %(after)s ORDER BY id;

-- name: select_written_history
-- The history rows this transaction wrote for the sagas %(ids)s, each with the newest
-- position its saga's history had before them (0: none), for WatchSaga's in-process
-- path (store/notifications.py). Run inside the transition, under the sagas' row locks,
-- so no other writer's entries can come between. A saga's history is a few rows.
SELECT h.*, (
    SELECT coalesce(max(p.id), 0) FROM sagaplane_history p
    WHERE p.saga_id = h.saga_id AND p.xmin <> xid(pg_current_xact_id())
) AS prior
FROM sagaplane_history h
WHERE h.saga_id = ANY(%(ids)s) AND h.xmin = xid(pg_current_xact_id())
ORDER BY h.id;

-- name: list_sagas
-- ListSagas: newest first by (created_at, id). One index range scan per state asked
-- for (sagaplane_sagas_by_state, or _by_state_name with a name; 0008), each stopping
-- after one page, then the pages merged: the cost of a page does not grow with the
-- table. Parameters are bound client-side (sagaplane.batch), so a filter left out
-- (NULL) folds away before planning. The page continues below the saga %(after)s created
-- at %(after_created)s, which the page token carries, so that a page continues where it
-- should even when that saga has been deleted since (retention); a token of an older
-- version carries no created_at, which is then looked up by the primary key.
WITH after AS (
    SELECT coalesce(%(after_created)s::timestamptz,
                    (SELECT created_at FROM sagaplane_sagas WHERE id = %(after)s)) AS created_at
)
SELECT page.* FROM unnest(%(states)s::text[]) AS wanted (state)
CROSS JOIN LATERAL (
    SELECT s.* FROM sagaplane_sagas s
    WHERE s.state = wanted.state
      AND (%(name)s::text IS NULL OR s.name = %(name)s)
      AND (%(created_after)s::timestamptz IS NULL OR s.created_at >= %(created_after)s)
      AND (%(created_before)s::timestamptz IS NULL OR s.created_at < %(created_before)s)
      AND (%(id)s::text IS NULL OR s.id = %(id)s)
      AND (%(idempotency_key)s::text IS NULL OR s.idempotency_key = %(idempotency_key)s)
      AND (%(after)s::text IS NULL
           OR (s.created_at, s.id) < ((SELECT created_at FROM after), %(after)s))
    ORDER BY s.created_at DESC, s.id DESC
    LIMIT %(limit)s
) AS page
ORDER BY page.created_at DESC, page.id DESC
LIMIT %(limit)s;

-- name: list_active
-- "after" is the last id of the previous page, or '~' (sorts after every ULID) for the first.
-- sagaplane_saga_is_active (0004_active_states.sql) is the partial indexes' predicate.
SELECT * FROM sagaplane_sagas
WHERE sagaplane_saga_is_active(state) AND id < %(after)s
  AND updated_at <= now() - %(stale_for)s::interval
ORDER BY id DESC
LIMIT %(limit)s;

-- name: list_active_by_name
SELECT * FROM sagaplane_sagas
WHERE sagaplane_saga_is_active(state) AND name = %(name)s
  AND id < %(after)s AND updated_at <= now() - %(stale_for)s::interval
ORDER BY id DESC
LIMIT %(limit)s;

-- name: due_step_timers
-- SKIP LOCKED spreads the timers across coordinator replicas; a saga busy elsewhere
-- is picked up by the next round.
SELECT st.saga_id, st.id AS step_id
FROM sagaplane_steps st JOIN sagaplane_sagas s ON s.id = st.saga_id
WHERE st.deadline_at <= now()
ORDER BY st.deadline_at
LIMIT %(limit)s
FOR UPDATE OF s SKIP LOCKED;

-- name: due_saga_deadlines
SELECT id AS saga_id FROM sagaplane_sagas
WHERE deadline_at <= now() AND state = 'started'
ORDER BY deadline_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: select_key
SELECT secret FROM sagaplane_keys WHERE name = %(name)s;

-- name: metrics_active_sagas
-- On the partial index of active sagas (sagaplane_saga_is_active is its predicate): the
-- cost of a scrape grows with the sagas still active, never with those stored.
SELECT name, state, count(*) AS count,
       extract(epoch FROM now() - min(created_at)) AS oldest_age
FROM sagaplane_sagas
WHERE sagaplane_saga_is_active(state)
GROUP BY name, state;

-- == retention (coordinator/retention.py; 0009_retention.sql) =========================
-- Finished sagas whose end (completed_at) is older than their name's window: the
-- window of %(names)s[i] is %(keeps)s[i], of any other name %(keep)s (a NULL window
-- keeps them all).

-- name: prune_claim_sagas
-- At most %(limit)s of them, locked for deletion. SKIP LOCKED: a saga another pruner
-- (a replica) took, or that a transition holds right now, is left to a later batch, so
-- two pruners never take the same saga and neither waits. The names come from a skip
-- scan of sagaplane_sagas_finished (one index probe per name), then each name's expired
-- sagas from the same index, oldest end first: no pass reads the sagas it keeps.
WITH RECURSIVE names (name) AS (
    (SELECT name FROM sagaplane_sagas WHERE sagaplane_saga_is_finished(state)
     ORDER BY name LIMIT 1)
    UNION ALL
    SELECT (SELECT s.name FROM sagaplane_sagas s
            WHERE sagaplane_saga_is_finished(s.state) AND s.name > names.name
            ORDER BY s.name LIMIT 1)
    FROM names WHERE names.name IS NOT NULL
), rules AS (
    SELECT n.name, CASE WHEN o.name IS NULL THEN %(keep)s::interval ELSE o.keep END AS keep
    FROM names AS n
    LEFT JOIN unnest(%(names)s::text[], %(keeps)s::interval[]) AS o (name, keep)
        ON o.name = n.name
    WHERE n.name IS NOT NULL
)
SELECT doomed.id FROM rules
CROSS JOIN LATERAL (
    SELECT s.id FROM sagaplane_sagas s
    WHERE sagaplane_saga_is_finished(s.state) AND s.name = rules.name
      AND s.completed_at < now() - rules.keep
    ORDER BY s.completed_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) AS doomed
LIMIT %(limit)s;

-- name: prune_delete_history
-- History and steps first, each in a statement of its own: the cascade of the sagas'
-- delete then finds nothing left to do, and each count is the rows that went.
WITH deleted AS (DELETE FROM sagaplane_history WHERE saga_id = ANY(%(ids)s::text[]) RETURNING 1)
SELECT count(*) AS count FROM deleted;

-- name: prune_delete_steps
WITH deleted AS (DELETE FROM sagaplane_steps WHERE saga_id = ANY(%(ids)s::text[]) RETURNING 1)
SELECT count(*) AS count FROM deleted;

-- name: prune_delete_sagas
WITH deleted AS (DELETE FROM sagaplane_sagas WHERE id = ANY(%(ids)s::text[]) RETURNING 1)
SELECT count(*) AS count FROM deleted;

-- name: expired_sagas
-- What prune_claim_sagas would take, every batch of it, by name (sagaplane prune
-- --dry-run): the sagas, their steps and history rows, and the oldest end.
WITH RECURSIVE names (name) AS (
    (SELECT name FROM sagaplane_sagas WHERE sagaplane_saga_is_finished(state)
     ORDER BY name LIMIT 1)
    UNION ALL
    SELECT (SELECT s.name FROM sagaplane_sagas s
            WHERE sagaplane_saga_is_finished(s.state) AND s.name > names.name
            ORDER BY s.name LIMIT 1)
    FROM names WHERE names.name IS NOT NULL
), rules AS (
    SELECT n.name, CASE WHEN o.name IS NULL THEN %(keep)s::interval ELSE o.keep END AS keep
    FROM names AS n
    LEFT JOIN unnest(%(names)s::text[], %(keeps)s::interval[]) AS o (name, keep)
        ON o.name = n.name
    WHERE n.name IS NOT NULL
), doomed AS (
    SELECT s.id, s.name, s.completed_at FROM rules
    JOIN sagaplane_sagas s ON s.name = rules.name
    WHERE sagaplane_saga_is_finished(s.state) AND s.completed_at < now() - rules.keep
)
SELECT d.name, count(*) AS sagas, min(d.completed_at) AS oldest,
       coalesce(sum((SELECT count(*) FROM sagaplane_steps st WHERE st.saga_id = d.id)), 0)
           AS steps,
       coalesce(sum((SELECT count(*) FROM sagaplane_history h WHERE h.saga_id = d.id)), 0)
           AS history
FROM doomed AS d
GROUP BY d.name
ORDER BY d.name;
