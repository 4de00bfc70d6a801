-- AMQP headers of an outbox row, published with it (a JSON object of strings): the W3C
-- trace context (traceparent, tracestate) of the command or reply, so that the trace
-- continues in the process that receives it. NULL: no headers.
ALTER TABLE sagaplane_outbox ADD COLUMN headers jsonb;
