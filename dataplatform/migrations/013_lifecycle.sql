-- Workflow lifecycle (issue #20): ListWorkflows filters by name, schedule and create time,
-- and finished workflows are purged after the configured retention.
--
-- name: the spec's name, copied out of `spec` at submit so a filter is an index scan.
-- schedule_id: the schedule whose tick or trigger submitted the workflow, set by the ticker
-- only (an idempotency key a user chose can look like a tick's; this column cannot).
-- finished_at: when the workflow last became SUCCEEDED, FAILED, CANCELLED or TIMED_OUT
-- (NULL while active: a retry clears it), the retention's clock. Not updated_at: an index
-- on it would change with every event and cost the queue its HOT updates.
ALTER TABLE workflows
    ADD COLUMN name        text NOT NULL DEFAULT '',
    ADD COLUMN schedule_id uuid,
    ADD COLUMN finished_at timestamptz;
UPDATE workflows SET finished_at = updated_at WHERE state IN (3, 4, 5, 6);

-- Existing rows: the name is WorkflowSpec field 1, which protobuf writes first (tag 0x0a,
-- then its length as a varint: one byte below 128, two up to 16383; names are at most
-- 256 characters); an empty name is not written at all.
UPDATE workflows SET name = convert_from(
    CASE WHEN get_byte(spec, 1) < 128 THEN substring(spec FROM 3 FOR get_byte(spec, 1))
    ELSE substring(spec FROM 4 FOR (get_byte(spec, 1) - 128) + get_byte(spec, 2) * 128) END,
    'UTF8')
WHERE length(spec) > 1 AND get_byte(spec, 0) = 10;

-- Existing ticks: their idempotency key "schedule:<id>:..." names a schedule of the same
-- owner (a user's own key that merely looks like one names none of theirs).
UPDATE workflows w SET schedule_id = s.schedule_id
FROM schedules s
WHERE w.idempotency_key ~ '^schedule:[0-9a-f-]{36}:'
  AND s.schedule_id = substring(w.idempotency_key FROM 10 FOR 36)::uuid
  AND s.owner_id = w.owner_id;

-- A user's listing by state, by name and by schedule (newest first) each scan one index;
-- a create-time range rides the (owner_id, created_at) index of migration 004.
CREATE INDEX workflows_owner_state_created
    ON workflows (owner_id, state, created_at DESC, workflow_id DESC);
CREATE INDEX workflows_owner_name_created
    ON workflows (owner_id, name, created_at DESC, workflow_id DESC);
-- A schedule belongs to one owner: no owner column needed to serve a user's filter.
CREATE INDEX workflows_schedule_created
    ON workflows (schedule_id, created_at DESC, workflow_id DESC) WHERE schedule_id IS NOT NULL;

-- Retention: finished workflows, oldest finished first.
CREATE INDEX workflows_finished ON workflows (finished_at) WHERE finished_at IS NOT NULL;
