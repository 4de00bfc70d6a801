-- The participant's inbox: the outcome of every step command this service handled.
--
-- Key: (step_id, kind), not the command's message_id. A redelivered command (same
-- attempt) and a retried one (next attempt, new token, new message_id) both find the
-- row, so the handler runs once per step and kind, and every command is answered
-- with the stored outcome under ITS OWN attempt and token (the coordinator accepts
-- only the reply of the command in flight). Execute and compensate are separate
-- rows: the compensation of a step runs once too.
--
-- The one outcome that is not final is a failure: a command with a HIGHER attempt runs
-- the handler again and overwrites the row (the same attempt, redelivered, gets the
-- stored failure back). The coordinator sends a higher attempt only when it decided to
-- retry: a retryable failure within its policy, a timeout, or an operator's RETRY.
--
-- An execute whose step already has a 'compensate' row here is not run (it is answered
-- with a non-retryable StepAlreadyCompensated failure): an action never lands after its
-- undo.
--
-- Concurrent copies of one command serialise on the primary key: the first transaction
-- inserts the row before its handler runs; the second blocks on that insert until the
-- first commits, then reads the outcome.
CREATE TABLE sagaplane_inbox (
    step_id          text        NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('execute', 'compensate')),
    saga_id          text        NOT NULL,
    action           text        NOT NULL,
    -- The command whose handler run produced the stored outcome.
    message_id       text        NOT NULL,
    attempt          integer     NOT NULL,
    -- NULL only inside the transaction that claimed the row; always set at its commit.
    outcome          text        CHECK (outcome IN ('succeeded', 'failed')),
    -- What the handler returned (succeeded), re-sent in every reply to this step.
    output           jsonb,
    -- Why it failed (failed): StepError's type, message and retryable.
    error_type       text,
    error_message    text,
    error_retryable  boolean,
    received_at      timestamptz NOT NULL DEFAULT now(),
    -- For people: how many commands were answered from this row, and when last.
    replies          integer     NOT NULL DEFAULT 0,
    last_replied_at  timestamptz,
    PRIMARY KEY (step_id, kind)
);

-- Looking up what a saga did here, and pruning by age, without scanning the table.
CREATE INDEX sagaplane_inbox_saga ON sagaplane_inbox (saga_id);
CREATE INDEX sagaplane_inbox_received ON sagaplane_inbox (received_at);
