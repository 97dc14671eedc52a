-- One trace from submit to the last step (issue #20): the submitter's W3C trace context
-- ({"traceparent": ..., "tracestate": ...}), NULL when the submission carried none. Each
-- step attempt's span is its child, or a new root linked to it when the attempt starts
-- long after the submit (telemetry.step_link_after_seconds).
ALTER TABLE workflows ADD COLUMN trace_context jsonb;
