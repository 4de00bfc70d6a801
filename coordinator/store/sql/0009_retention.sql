-- Retention (issue 19): finished sagas are deleted some time after they ended, with
-- their steps and history (coordinator/retention.py).
--
-- "Finished" is one definition, as "active" is (0004): completed, failed, compensated.
-- Not compensation_failed, which waits for a person however old it is. A completed
-- saga can still be compensated on request; once deleted it cannot (NOT_FOUND).
-- The index's predicate is written out once more because an index's predicate must
-- stay literal; PostgreSQL inlines the function, so queries that use it use the index.
CREATE FUNCTION sagaplane_saga_is_finished(state text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN state IN ('completed', 'failed', 'compensated');

-- The pruner walks the names of finished sagas (a skip scan of this index, so a pass
-- costs the names, not the sagas kept) and takes each name's oldest ends first, each
-- name with its own window (--retention-for). Only finished sagas are in it, so a
-- StartSaga does not touch it.
CREATE INDEX sagaplane_sagas_finished ON sagaplane_sagas (name, completed_at)
    WHERE state IN ('completed', 'failed', 'compensated');
