-- Schedules (aiwfe.taskproc.v1.ScheduleService): a cron in a time zone that submits a
-- workflow as its owner. Any dataplatform replica ticks them: it claims due rows with
-- FOR UPDATE SKIP LOCKED and, in the same transaction, creates the tick's workflow (its
-- idempotency key "schedule:<id>:<tick>") and advances next_tick_at.
-- Policies are the aiwfe.taskproc.v1 enum numbers (OverlapPolicy / CatchUpPolicy).
CREATE TABLE schedules (
    schedule_id      uuid PRIMARY KEY,
    owner_id         text NOT NULL,
    owner_username   text NOT NULL,
    owner_roles      text[] NOT NULL DEFAULT '{}',
    name             text NOT NULL,
    cron             text NOT NULL,
    time_zone        text NOT NULL,
    spec             bytea NOT NULL,
    overlap_policy   smallint NOT NULL,
    catch_up_policy  smallint NOT NULL,
    paused           boolean NOT NULL DEFAULT false,
    next_tick_at     timestamptz,          -- NULL while paused
    last_tick_at     timestamptz,
    last_workflow_id uuid,                 -- no foreign key: workflows outlive nothing here
    buffered_tick_at timestamptz,          -- OVERLAP_POLICY_BUFFER_ONE's pending tick
    skipped_ticks    bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_owner_created ON schedules (owner_id, created_at DESC, schedule_id DESC);
CREATE INDEX schedules_created ON schedules (created_at DESC, schedule_id DESC);
-- The ticker's two questions: which schedules are due, which hold a buffered tick.
CREATE INDEX schedules_due ON schedules (next_tick_at) WHERE NOT paused;
CREATE INDEX schedules_buffered ON schedules (buffered_tick_at)
    WHERE buffered_tick_at IS NOT NULL;
