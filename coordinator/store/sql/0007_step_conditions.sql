-- Conditional steps (StepSpec.when): the CEL expression evaluated when the step is
-- ready; NULL for a step that always runs (every step stored before this migration).
ALTER TABLE sagaplane_steps ADD COLUMN condition text;
