-- Every step stores the retry policies it was started with. Until now a policy equal to
-- the default of the time was stored as NULL, so changing the default would have changed
-- sagas already in flight. NULL meant the defaults of 0.1, which these are; the
-- coordinator keeps reading a NULL as them (a replica of the previous version may still
-- write one during a rolling upgrade, which is also why the columns stay nullable).
UPDATE sagaplane_steps
SET retry_policy = '{"max_attempts": 3, "initial_interval_ms": 1000, "backoff_coefficient": 2.0, "max_interval_ms": 60000}'
WHERE retry_policy IS NULL;

UPDATE sagaplane_steps
SET compensation_retry_policy = '{"max_attempts": 10, "initial_interval_ms": 1000, "backoff_coefficient": 2.0, "max_interval_ms": 60000}'
WHERE compensation_retry_policy IS NULL;
