-- GetSaga and WatchSaga read a saga's commands that reached no queue with the saga itself,
-- in one round trip (select_returned_commands), by the saga's id: the coordinator's
-- outbox rows carry it as correlation_id. Only unsent rows the broker returned at least
-- once are indexed, so the index stays as small as the undelivered commands are few, and
-- an insert (returned = 0) costs it nothing.
CREATE INDEX sagaplane_outbox_returned_by_saga ON sagaplane_outbox (correlation_id)
    WHERE sent_at IS NULL AND returned > 0;
