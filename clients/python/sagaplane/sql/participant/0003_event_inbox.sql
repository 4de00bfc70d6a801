-- The consumer's inbox of domain events: one row per event a service's handlers ran for.
--
-- Key: (consumer, source, id). CloudEvents makes (source, id) unique per event, so a
-- redelivered or re-published event (the relay publishes at least once) finds the row
-- and its handlers do not run again. The consuming service is part of the key because
-- services may share one database (small deployments, tests), and each must handle
-- the event once. A table of its own rather than rows of sagaplane_inbox: that table
-- is keyed by step, its columns are a step's outcome, and events have neither.
--
-- The row is inserted in the same transaction as the handlers' writes, before they
-- run: a handler that fails rolls it back with them (the event is retried), and a
-- concurrent copy of the event blocks on the key until the first commits, then skips.
CREATE TABLE sagaplane_event_inbox (
    consumer     text        NOT NULL,
    source       text        NOT NULL,
    id           text        NOT NULL,
    type         text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, source, id)
);

-- Pruning by age without scanning the table.
CREATE INDEX sagaplane_event_inbox_received ON sagaplane_event_inbox (received_at);
