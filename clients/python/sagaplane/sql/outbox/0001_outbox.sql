-- The transactional outbox, shared by the coordinator and every participant.
-- A row is written in the same transaction as the state change it announces;
-- the relay publishes it after commit and marks it sent once the broker confirmed.
CREATE TABLE sagaplane_outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    text        NOT NULL,
    exchange      text        NOT NULL,
    routing_key   text        NOT NULL,
    message_type  text        NOT NULL,
    body          bytea       NOT NULL,
    -- Groups rows for people reading the table (the coordinator puts the saga id here).
    correlation_id text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    -- After a failed publish, the row waits until then (exponential backoff).
    next_attempt_at timestamptz,
    -- Set when the row can never be published; a person must look at it.
    parked_at     timestamptz
);

-- Only unsent rows are indexed, so claiming stays cheap however much history piles up.
CREATE INDEX sagaplane_outbox_pending ON sagaplane_outbox (id)
    WHERE sent_at IS NULL AND parked_at IS NULL;

CREATE FUNCTION sagaplane_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Delivered at commit, once per transaction whatever the number of rows.
    PERFORM pg_notify('sagaplane_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER sagaplane_outbox_notify AFTER INSERT ON sagaplane_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION sagaplane_outbox_notify();
