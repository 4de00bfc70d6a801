-- Parked rows, indexed on their own: the metrics endpoint counts them at every scrape
-- (sagaplane_outbox_parked), and there are few, however much history the table holds.
CREATE INDEX sagaplane_outbox_parked ON sagaplane_outbox (id) WHERE parked_at IS NOT NULL;
