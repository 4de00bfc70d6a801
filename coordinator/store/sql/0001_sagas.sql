-- Sagas, their steps, and the append-only history of their transitions.
-- The outbox table comes from the shared "outbox" migrations (sagaplane package).
CREATE TABLE sagaplane_sagas (
    id              text        PRIMARY KEY,   -- ULID: time-ordered, so inserts stay local
    name            text        NOT NULL,
    state           text        NOT NULL,
    context         jsonb       NOT NULL,
    idempotency_key text,
    -- SHA-256 of the StartSaga request, to tell a replay from a conflicting reuse of the key.
    request_hash    bytea,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    completed_at    timestamptz
);

CREATE UNIQUE INDEX sagaplane_sagas_idempotency_key ON sagaplane_sagas (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- ListActive reads only these partial indexes, so its cost does not grow with history.
CREATE INDEX sagaplane_sagas_active ON sagaplane_sagas (id DESC)
    WHERE state IN ('started', 'compensating', 'compensation_failed');
CREATE INDEX sagaplane_sagas_active_by_name ON sagaplane_sagas (name, id DESC)
    WHERE state IN ('started', 'compensating', 'compensation_failed');

CREATE TABLE sagaplane_steps (
    saga_id               text        NOT NULL REFERENCES sagaplane_sagas (id) ON DELETE CASCADE,
    position              smallint    NOT NULL,
    id                    text        NOT NULL,
    name                  text        NOT NULL,
    action                text        NOT NULL,
    compensation          text,
    input                 jsonb       NOT NULL,
    output                jsonb,
    status                text        NOT NULL,
    error                 text,
    attempts              integer     NOT NULL DEFAULT 0,
    compensation_attempts integer     NOT NULL DEFAULT 0,
    token                 text,
    executed_at           timestamptz,
    compensated_at        timestamptz,
    PRIMARY KEY (saga_id, position)
);

CREATE TABLE sagaplane_history (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id    text        NOT NULL REFERENCES sagaplane_sagas (id) ON DELETE CASCADE,
    from_state text,
    to_state   text        NOT NULL,
    step_name  text,
    event      text        NOT NULL,
    reason     text,
    at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX sagaplane_history_saga ON sagaplane_history (saga_id, id);
