-- One definition of "active" for every query: ListActive, and whatever else asks.
-- It is the predicate of the partial indexes sagaplane_sagas_active and
-- sagaplane_sagas_active_by_name (0001_sagas.sql), written out once more here because an
-- index's predicate must stay literal: an index is never rebuilt when a function it
-- uses changes. PostgreSQL inlines this function into a query, so the query's condition
-- is the index's and the planner uses the index (tests/integration/test_store_sql.py
-- checks both with EXPLAIN, and that the list is coordinator.engine.ACTIVE_STATES).
-- Changing the list takes a new migration that replaces this function and both indexes.
CREATE FUNCTION sagaplane_saga_is_active(state text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN state IN ('started', 'compensating', 'compensation_failed');
