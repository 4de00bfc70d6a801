-- Steps that wait for other steps (StepSpec.depends_on): the positions of the steps each
-- one waits for. NULL means the step before it (none for the first), which is what every
-- step stored before this migration means: a saga of such steps runs one step at a time.
ALTER TABLE sagaplane_steps ADD COLUMN depends_on integer[];
