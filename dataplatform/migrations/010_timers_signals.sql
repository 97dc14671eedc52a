-- Durable timers and signals (ops `sleep` and `wait_for_signal`, StepSpec.not_before).
-- Such steps never go to a worker: they wait in the task index on internal queues
-- ('$timer', '$signal'; user queue names cannot hold '$') and dataplatform's sweep fires
-- them when due. A step's next_run_at is its timer: now + timer_seconds when its
-- dependencies are done, never before not_before_at.
ALTER TABLE workflow_steps
    ADD COLUMN timer_seconds double precision,  -- sleep: its seconds; wait_for_signal: its timeout
    ADD COLUMN not_before_at timestamptz;

-- Signals are kept until a wait_for_signal step of their name takes one (oldest first).
CREATE TABLE workflow_signals (
    workflow_id uuid NOT NULL REFERENCES workflows ON DELETE CASCADE,
    seq         bigserial,
    name        text NOT NULL,
    signal_id   text,  -- NULL: not deduplicated
    payload     jsonb NOT NULL,
    consumed_by text,  -- the step that took it
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, seq)
);
CREATE UNIQUE INDEX workflow_signals_dedup ON workflow_signals (workflow_id, signal_id)
    WHERE signal_id IS NOT NULL;
CREATE INDEX workflow_signals_unconsumed ON workflow_signals (workflow_id, name, seq)
    WHERE consumed_by IS NULL;
