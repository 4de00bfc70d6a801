-- Every statement the SDK runs, by name (see sagaplane/queries.py). BEGIN and COMMIT
-- are written where they are sent, as part of a batch (see sagaplane/batch.py).

-- == the outbox (sagaplane.outbox) ====================================================

-- name: insert_outbox_message
-- One outbox row; its parameters are sagaplane.outbox.insert_params (prefixed, so that
-- they can share a batch of statements with other named parameters).
INSERT INTO sagaplane_outbox
    (message_id, exchange, routing_key, message_type, body, correlation_id, headers)
VALUES (%(outbox_message_id)s, %(outbox_exchange)s, %(outbox_routing_key)s,
        %(outbox_message_type)s, %(outbox_body)s, %(outbox_correlation_id)s,
        %(outbox_headers)s);

-- name: insert_outbox_messages
-- Many outbox rows in one statement: %(outbox_rows)s is a JSON array of messages
-- (sagaplane.outbox.insert_many_params). The rows keep the array's order (their ids,
-- which the relay publishes in, follow it).
INSERT INTO sagaplane_outbox
    (message_id, exchange, routing_key, message_type, body, correlation_id, headers)
SELECT message_id, exchange, routing_key, message_type, body, correlation_id, headers
FROM ROWS FROM (
        jsonb_to_recordset(%(outbox_rows)s::jsonb)
        AS (message_id text, exchange text, routing_key text, message_type text,
            body bytea, correlation_id text, headers jsonb)
    ) WITH ORDINALITY
    AS r (message_id, exchange, routing_key, message_type, body, correlation_id, headers, n)
ORDER BY n;

-- == operators' view of the outbox (sagaplane.outbox; `sagaplane outbox`) ===============

-- name: outbox_stats
-- Rows per status, and how long the oldest unpublished, unparked row has waited.
SELECT status, count(*),
       extract(epoch FROM now() - min(created_at) FILTER (WHERE status IN ('pending', 'failed')))
FROM sagaplane_outbox
GROUP BY status;

-- name: outbox_last_failure
-- The latest failure among the rows still to publish (status failed): when, and why.
SELECT failed_at, last_error
FROM sagaplane_outbox
WHERE sent_at IS NULL AND parked_at IS NULL AND failed_at IS NOT NULL
ORDER BY failed_at DESC
LIMIT 1;

-- name: outbox_problems
-- The rows in the given statuses (failed, invalid, expired), oldest first.
SELECT id, status, message_id, exchange, routing_key, message_type, attempts, created_at,
       next_attempt_at, last_error, failed_at
FROM sagaplane_outbox
WHERE status = ANY(%(statuses)s) AND id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: outbox_retry
-- Back to pending, published by the relay's next cycle (unpublished rows only).
UPDATE sagaplane_outbox
SET parked_at = NULL, park_reason = NULL, attempts = 0, next_attempt_at = NULL,
    last_error = NULL, failed_at = NULL, created_at = now()
WHERE id = ANY(%(ids)s) AND sent_at IS NULL
RETURNING id;

-- name: outbox_discard
-- Never to be published: the unpublished rows are deleted.
DELETE FROM sagaplane_outbox WHERE id = ANY(%(ids)s) AND sent_at IS NULL RETURNING id;

-- == the outbox relay (sagaplane.relay) ================================================

-- name: relay_claim
SELECT id, message_id, exchange, routing_key, message_type, body, correlation_id, attempts,
       headers
FROM sagaplane_outbox
WHERE sent_at IS NULL AND parked_at IS NULL
  AND (next_attempt_at IS NULL OR next_attempt_at <= now())
ORDER BY id
LIMIT %s
FOR UPDATE SKIP LOCKED;

-- name: relay_no_sync
-- The relay's own transaction need not wait for its WAL to reach disk: if a crash loses
-- "sent" (or a failed attempt's count), the row is published again, which receivers
-- deduplicate anyway. Only the message itself must never be lost, and it is not touched.
SET LOCAL synchronous_commit TO off;

-- name: relay_mark_sent
UPDATE sagaplane_outbox SET sent_at = now() WHERE id = ANY(%s);

-- name: relay_expire
-- Rows older than the relay's max_age are parked as expired, never published (rows a
-- relay is publishing right now are skipped: they are not late). Reads the pending index.
UPDATE sagaplane_outbox
SET parked_at = now(), park_reason = 'expired',
    last_error = 'not published within max_age (' || %(max_age)s || 's)'
WHERE id IN (
    SELECT id FROM sagaplane_outbox
    WHERE sent_at IS NULL AND parked_at IS NULL
      AND created_at < now() - make_interval(secs => %(max_age)s)
    FOR UPDATE SKIP LOCKED
);

-- name: relay_mark_invalid
-- Rows that can never be published (their exchange does not exist): parked at once.
UPDATE sagaplane_outbox AS o
SET attempts = o.attempts + 1, last_error = f.error, failed_at = now(), parked_at = now(),
    park_reason = 'invalid'
FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS f(id, error)
WHERE o.id = f.id;

-- name: relay_mark_failed
-- A publish that failed by the row's own fault: charged an attempt, parked at max_attempts.
-- Each row waits its own delay (exponential backoff with jitter, from sagaplane.backoff),
-- so a command for a participant not deployed yet waits minutes (not one poll interval
-- per attempt) before it is parked, and rows that failed together are not retried
-- together. A publish the broker returned as unroutable is counted in ``returned`` (see
-- sagaplane/delivery.py).
UPDATE sagaplane_outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    failed_at = now(),
    returned = o.returned + f.returned::int,
    parked_at = CASE WHEN o.attempts + 1 >= %(max_attempts)s THEN now() END,
    next_attempt_at = now() + make_interval(secs => f.delay)
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(returned)s::boolean[],
            %(delays)s::float8[])
    AS f(id, error, returned, delay)
WHERE o.id = f.id;

-- name: relay_mark_unreachable
-- The broker could not be reached before a cycle (refused, lost, not answering): the
-- rows the relay was about to publish (what relay_claim would take) get the error, and
-- show as failed, without an attempt charged (an outage is nobody's fault and must never
-- park a row) and without a later next_attempt_at (they go out as soon as it is back).
-- One statement; reads the pending index, as the claim does.
UPDATE sagaplane_outbox
SET failed_at = now(), last_error = %(error)s
WHERE id IN (
    SELECT id FROM sagaplane_outbox
    WHERE sent_at IS NULL AND parked_at IS NULL
      AND (next_attempt_at IS NULL OR next_attempt_at <= now())
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: relay_mark_interrupted
-- The rows of a batch whose publish the broker never settled (the connection was lost or
-- it did not answer in time): as relay_mark_unreachable, by id (they are claimed).
UPDATE sagaplane_outbox SET failed_at = now(), last_error = %(error)s WHERE id = ANY(%(ids)s);

-- name: relay_begin_publishes
-- Run and committed on a connection of its own before the rows are published, while the
-- claim holds their locks (sagaplane/delivery.py says why).
INSERT INTO sagaplane_outbox_publishes (outbox_id, begun)
SELECT id, 1 FROM unnest(%s::bigint[]) AS ids(id)
ON CONFLICT (outbox_id) DO UPDATE SET begun = sagaplane_outbox_publishes.begun + 1;

-- name: relay_forget_publishes
DELETE FROM sagaplane_outbox_publishes WHERE outbox_id = ANY(%s);

-- == delivery proofs and withdrawals (sagaplane.delivery) ==============================

-- name: delivery_lock
-- Rows a relay is publishing right now are skipped, not waited for (a transition never
-- waits for the broker): what becomes of them is not known, so they prove nothing.
-- From here until commit no relay can claim the rows locked (its claim skips them).
SELECT id FROM sagaplane_outbox
WHERE message_id = ANY(%(message_ids)s::text[]) AND sent_at IS NULL
ORDER BY id
FOR UPDATE SKIP LOCKED;

-- name: delivery_counts
-- Only the rows delivery_lock locked (%(ids)s), in a statement sent after it returned, so
-- that its snapshot is taken once the locks are held: it sees every count committed by
-- the relay that held them before.
SELECT o.message_id,
       bool_and(o.returned >= 1 AND o.returned = coalesce(p.begun, 0)) AS undelivered
FROM sagaplane_outbox o LEFT JOIN sagaplane_outbox_publishes p ON p.outbox_id = o.id
WHERE o.id = ANY(%(ids)s::bigint[]) AND o.sent_at IS NULL
GROUP BY o.message_id;

-- name: delivery_withdraw
-- Rows a relay is publishing right now are left alone (SKIP LOCKED): receivers drop a
-- command that is no longer in flight, and the caller does not wait for the broker.
WITH gone AS (
    DELETE FROM sagaplane_outbox
    WHERE id IN (SELECT id FROM sagaplane_outbox
                 WHERE message_id = ANY(%(message_ids)s::text[]) AND sent_at IS NULL
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
)
DELETE FROM sagaplane_outbox_publishes WHERE outbox_id IN (SELECT id FROM gone);

-- == the participant's inbox (sagaplane.inbox) =========================================

-- name: inbox_claim
-- Inserts the claim row, or (a copy of the command is being or was handled) waits for
-- the other transaction and does nothing. Also says whether the step's compensation
-- already ran (for the "no action after its undo" rule), in the same round trip.
WITH claimed AS (
    INSERT INTO sagaplane_inbox (step_id, kind, saga_id, action, message_id, attempt)
    VALUES (%(step_id)s, %(kind)s, %(saga_id)s, %(action)s, %(message_id)s, %(attempt)s)
    ON CONFLICT (step_id, kind) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT FROM claimed),
       EXISTS (SELECT FROM sagaplane_inbox WHERE step_id = %(step_id)s AND kind = 'compensate');

-- name: inbox_lock_stored
-- A copy, or a later attempt. Sent between handler_release and handler_savepoint, so
-- the row lock is the transaction's own and not the savepoint's, which a failing
-- handler rolls back. A NULL outcome (only a handler that committed the SDK's
-- transaction leaves one) counts as not handled.
SELECT i.attempt, i.outcome, i.output, i.error_type, i.error_message, i.error_retryable,
       EXISTS (SELECT FROM sagaplane_inbox c WHERE c.step_id = i.step_id AND c.kind = 'compensate')
FROM sagaplane_inbox AS i
WHERE i.step_id = %(step_id)s AND i.kind = %(kind)s
FOR UPDATE;

-- name: inbox_store
UPDATE sagaplane_inbox
SET message_id = %(message_id)s, attempt = %(attempt)s, outcome = %(outcome)s,
    output = %(output)s::jsonb, error_type = %(error_type)s,
    error_message = %(error_message)s, error_retryable = %(error_retryable)s,
    replies = replies + 1, last_replied_at = now()
WHERE step_id = %(step_id)s AND kind = %(kind)s;

-- name: inbox_replayed
UPDATE sagaplane_inbox SET replies = replies + 1, last_replied_at = now()
WHERE step_id = %(step_id)s AND kind = %(kind)s;

-- name: event_inbox_claim
-- Claims the event for this consumer, or (a copy is being or was handled) waits for the
-- other transaction and returns nothing.
INSERT INTO sagaplane_event_inbox (consumer, source, id, type)
VALUES (%(consumer)s, %(source)s, %(id)s, %(type)s)
ON CONFLICT (consumer, source, id) DO NOTHING
RETURNING 1;

-- name: handler_savepoint
-- Where a failing handler's writes roll back to; taken right after the claim.
SAVEPOINT sagaplane_handler;

-- name: handler_rollback
ROLLBACK TO SAVEPOINT sagaplane_handler;

-- name: handler_release
RELEASE SAVEPOINT sagaplane_handler;

-- == the attempt's deadline (sagaplane.inbox) =========================================
-- PostgreSQL's own end of the attempt, in milliseconds, set right after the inbox claim:
-- should the SDK fail to cancel the handler in time (a handler that blocks the event
-- loop or ignores cancellation, a frozen process), no statement, connection or inbox
-- row lock outlives the attempt. LOCAL: the pooled connection's next transaction is
-- not affected.

-- name: deadline_statement_timeout
-- Each statement at most the attempt's time left (a lock wait included).
SET LOCAL statement_timeout = %(ms)s;

-- name: deadline_idle_timeout
-- A transaction left idle that long (the handler awaits something else, and never
-- comes back) is ended with its session.
SET LOCAL idle_in_transaction_session_timeout = %(ms)s;

-- name: deadline_transaction_timeout
-- PostgreSQL 17 and later: the whole transaction, however its time is spent.
SET LOCAL transaction_timeout = %(ms)s;

-- == retention (sagaplane.retention) =================================================
-- Each statement is one short transaction that deletes at most %(limit)s rows. Rows
-- another pruner (a replica) has claimed are skipped, not waited for: replicas share the
-- work and never delete the same row, and nothing that writes new rows waits for them.

-- name: outbox_prune
-- Sent rows older than %(keep)s, oldest first. The scan by id stops at the first row
-- created within the window: a row's sent_at is never before its created_at, so no row
-- from there on can have been sent before the cutoff (save a few of transactions that
-- began earlier, taken by a later pass). A pass costs the rows it deletes and the old
-- unsent (parked) rows it steps over, never the outbox's whole size.
WITH bound AS (
    SELECT coalesce(
        (SELECT id FROM sagaplane_outbox
         WHERE created_at >= now() - %(keep)s::interval ORDER BY id LIMIT 1),
        9223372036854775807) AS id
), doomed AS (
    SELECT id FROM sagaplane_outbox
    WHERE id < (SELECT id FROM bound) AND sent_at < now() - %(keep)s::interval
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM sagaplane_outbox WHERE id IN (SELECT id FROM doomed) RETURNING 1
)
SELECT count(*) AS count FROM deleted;

-- name: outbox_expired
-- What outbox_prune would delete, every batch of it (sagaplane prune --dry-run).
SELECT count(*) AS count FROM sagaplane_outbox
WHERE id < coalesce(
        (SELECT id FROM sagaplane_outbox
         WHERE created_at >= now() - %(keep)s::interval ORDER BY id LIMIT 1),
        9223372036854775807)
  AND sent_at < now() - %(keep)s::interval;

-- name: inbox_prune
-- Rows first received longer than %(keep)s ago, oldest first, on sagaplane_inbox_received.
-- A row whose command is being handled is locked by that transaction: skipped.
WITH doomed AS (
    SELECT step_id, kind FROM sagaplane_inbox
    WHERE received_at < now() - %(keep)s::interval
    ORDER BY received_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM sagaplane_inbox AS i USING doomed AS d
    WHERE i.step_id = d.step_id AND i.kind = d.kind
    RETURNING 1
)
SELECT count(*) AS count FROM deleted;

-- name: inbox_expired
SELECT count(*) AS count FROM sagaplane_inbox WHERE received_at < now() - %(keep)s::interval;

-- == migrations (sagaplane.migrations) =================================================

-- name: migrations_lock
-- Serialises concurrent migrators (several replicas starting at once).
SELECT pg_advisory_xact_lock(%s);

-- name: migrations_table
CREATE TABLE IF NOT EXISTS sagaplane_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
);

-- name: migrations_applied
SELECT component, version FROM sagaplane_migrations;

-- name: migrations_record
INSERT INTO sagaplane_migrations (component, version, name) VALUES (%s, %s, %s);

-- == metrics (sagaplane.metrics) ======================================================

-- name: metrics_outbox
-- Both counts read partial indexes (sagaplane_outbox_pending, sagaplane_outbox_parked):
-- a scrape costs what is unsent or parked, never the outbox's whole history.
SELECT (SELECT count(*) FROM sagaplane_outbox WHERE sent_at IS NULL AND parked_at IS NULL),
       (SELECT count(*) FROM sagaplane_outbox WHERE parked_at IS NOT NULL),
       coalesce((SELECT extract(epoch FROM now() - created_at)
                 FROM sagaplane_outbox WHERE sent_at IS NULL AND parked_at IS NULL
                 ORDER BY id LIMIT 1), 0);
