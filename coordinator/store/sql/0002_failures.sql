-- Failure semantics: retry policies, per-step timeouts, saga deadlines.
-- Policies are JSON ({"max_attempts", "initial_interval_ms", "backoff_coefficient",
-- "max_interval_ms"}); NULL means the default.
ALTER TABLE sagaplane_steps
    ADD COLUMN retry_policy              jsonb,
    ADD COLUMN compensation_retry_policy jsonb,
    ADD COLUMN timeout_ms                bigint,
    -- When the coordinator acts on its own: the attempt times out or the retry is due.
    ADD COLUMN deadline_at               timestamptz,
    ADD COLUMN outcome_unknown           boolean NOT NULL DEFAULT false;

-- The timers read only due rows, whatever the history's size.
CREATE INDEX sagaplane_steps_deadline ON sagaplane_steps (deadline_at)
    WHERE deadline_at IS NOT NULL;

ALTER TABLE sagaplane_sagas ADD COLUMN deadline_at timestamptz;

CREATE INDEX sagaplane_sagas_deadline ON sagaplane_sagas (deadline_at)
    WHERE deadline_at IS NOT NULL AND state = 'started';
