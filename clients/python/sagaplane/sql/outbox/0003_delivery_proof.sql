-- What the relay records so that a saga can know a command was never delivered
-- (issue 19; the proof is written down in sagaplane/delivery.py).
--
-- returned: publishes of the row that the broker confirmed and returned as unroutable
-- (mandatory, no queue bound to the routing key), counted in the relay's transaction
-- that records the attempt.
ALTER TABLE sagaplane_outbox ADD COLUMN returned integer NOT NULL DEFAULT 0;

-- Publishes begun, by a relay that tracks delivery (the coordinator's): counted and
-- COMMITTED on a connection of its own before each publish, while the relay's claim
-- holds the outbox row's lock. A separate table, without a foreign key, because the
-- outbox row is locked FOR UPDATE by the claim (a foreign key check would wait for it).
-- A crash (or a publish whose outcome is not known) leaves begun above the outbox row's
-- returned for good: that row can never count as undelivered.
CREATE TABLE sagaplane_outbox_publishes (
    outbox_id bigint  PRIMARY KEY,
    begun     integer NOT NULL
);

-- Withdrawing a step's command (by its message id) when its saga moved past it; only
-- unsent rows are indexed, so the index stays as small as the backlog.
CREATE INDEX sagaplane_outbox_unsent_message ON sagaplane_outbox (message_id)
    WHERE sent_at IS NULL;
