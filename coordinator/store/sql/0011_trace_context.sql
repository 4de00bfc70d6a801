-- Tracing (issue 20): the W3C trace context of the saga (its StartSaga call's span), as
-- a JSON object of the headers ({"traceparent": ..., "tracestate": ...}). Every later
-- transition, by any replica and after any restart, continues this trace: the commands
-- it writes carry a child of it in their AMQP headers. NULL: the saga is not traced.
ALTER TABLE sagaplane_sagas ADD COLUMN trace_context jsonb;
