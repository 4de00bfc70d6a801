-- WatchSaga: each commit's notification carries the newest history position it wrote
-- for the saga (`saga_id:position`), so that a watcher already handed that commit by its
-- own coordinator is not woken to read it again (store/notifications.py). A listener of
-- 0008 reads the whole payload as the saga id: upgrade every replica before this runs
-- (or run it last), as for any migration that changes what replicas exchange.
CREATE OR REPLACE FUNCTION sagaplane_history_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sagaplane_history', saga_id || ':' || newest)
    FROM (SELECT saga_id, max(id) AS newest FROM new_entries GROUP BY saga_id) AS s;
    RETURN NULL;
END;
$$;
