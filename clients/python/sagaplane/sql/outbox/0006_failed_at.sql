-- A row the relay could not publish because the broker was away (refused the connection,
-- lost it, did not answer) shows as failed, with the error, like a row the broker refused.
-- Such a failure is nobody's fault: it is not counted in attempts, so an outage never
-- parks a row, however long it lasts (0005's status said "pending" for these rows).
--
-- failed_at: when a publish of the row last failed, for any reason (the broker's or the
-- row's own); last_error says why. NULL: never failed, or put back by `outbox retry`.
ALTER TABLE sagaplane_outbox ADD COLUMN failed_at timestamptz;

-- status, as in 0005, but failed also while failed_at is set. A generated column's
-- expression cannot be changed in place before PostgreSQL 17: dropped and added again,
-- which rewrites the table once, under an exclusive lock (prune a large outbox first:
-- `sagaplane prune`). Rows already failed (attempts > 0) keep their status.
ALTER TABLE sagaplane_outbox DROP COLUMN status;

ALTER TABLE sagaplane_outbox
    ADD COLUMN status text NOT NULL GENERATED ALWAYS AS (
        CASE
            WHEN sent_at IS NOT NULL THEN 'published'
            WHEN parked_at IS NOT NULL THEN coalesce(park_reason, 'invalid')
            WHEN attempts > 0 OR failed_at IS NOT NULL THEN 'failed'
            ELSE 'pending'
        END
    ) STORED;
