-- Every outbox row's lifecycle, visible: status, maintained by PostgreSQL from the columns
-- the relay writes (sent_at, parked_at, attempts) and the reason a row was parked, so
-- the relay's own statements need not change to keep it right.
--
--   pending    not published yet, no failed attempt
--   failed     a publish failed; retried with exponential backoff (next_attempt_at)
--   published  the broker confirmed it (sent_at)
--   invalid    can never be published (its exchange does not exist, the broker refused it
--              every time up to max_attempts): parked for a person
--   expired    not published within the relay's max_age: parked, never published
ALTER TABLE sagaplane_outbox
    ADD COLUMN park_reason text CHECK (park_reason IN ('invalid', 'expired'));

ALTER TABLE sagaplane_outbox
    ADD COLUMN status text NOT NULL GENERATED ALWAYS AS (
        CASE
            WHEN sent_at IS NOT NULL THEN 'published'
            WHEN parked_at IS NOT NULL THEN coalesce(park_reason, 'invalid')
            WHEN attempts > 0 THEN 'failed'
            ELSE 'pending'
        END
    ) STORED;
