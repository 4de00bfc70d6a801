-- WatchSaga and ListSagas (issue 19).
--
-- Every committed transition is announced on the channel 'sagaplane_history', its
-- payload the saga's id. NOTIFY is transactional: it is delivered when (and only if) the
-- transaction that wrote the history rows commits, so a watcher never sees a transition
-- that was rolled back, and every replica's watchers hear of transitions written by any
-- replica (or by an older version that knows nothing of this, during a rolling
-- upgrade). PostgreSQL folds identical notifications of one transaction into one, so a
-- batch of many entries for one saga costs one notification. A trigger rather than a
-- pg_notify in the store's statements: every writer of history is covered, whichever
-- statement it uses (insert_history, insert_histories).
CREATE FUNCTION sagaplane_history_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sagaplane_history', saga_id)
    FROM (SELECT DISTINCT saga_id FROM new_entries) AS s;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sagaplane_history_notify AFTER INSERT ON sagaplane_history
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION sagaplane_history_notify();

-- ListSagas pages newest first by (created_at, id), per state: one index range scan per
-- state asked for (the query's LATERAL join), each stopping after one page, so a page
-- costs the same however many sagas are stored (tests/integration/test_list_sagas.py
-- checks the plans with EXPLAIN). The second one serves the name filter.
CREATE INDEX sagaplane_sagas_by_state ON sagaplane_sagas (state, created_at, id);
CREATE INDEX sagaplane_sagas_by_state_name ON sagaplane_sagas (state, name, created_at, id);
