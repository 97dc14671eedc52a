-- Fan-out (StepSpec.for_each): when a fan-out step is reached, each item of its list
-- becomes a step row of its own, named "<step>[<i>]" (step names cannot hold '['),
-- claimed, leased, retried and recorded like any step. The fan-out step itself waits on
-- an internal queue ('$fanout') no worker claims, RUNNING while its items run.
ALTER TABLE workflow_steps
    ADD COLUMN parent     text,     -- an item: the fan-out step it belongs to
    ADD COLUMN item_index integer,  -- an item: its position in the list
    ADD COLUMN item       jsonb;    -- an item: its value ("${item}")

-- One row per expanded fan-out. Items past the first max_concurrency wait with
-- remaining_deps = 1; each item that finishes (succeeded, or failed for good) releases
-- the next one, so at most max_concurrency run at once. The last one to finish (unfinished
-- reaching 0) completes the fan-out step with the items' outputs in order.
CREATE TABLE workflow_fan_outs (
    workflow_id uuid NOT NULL REFERENCES workflows ON DELETE CASCADE,
    step_name   text NOT NULL,
    total       integer NOT NULL,  -- items
    released    integer NOT NULL,  -- items made runnable so far
    unfinished  integer NOT NULL,  -- items not yet succeeded or failed for good
    collect     boolean NOT NULL,  -- ITEM_FAILURE_POLICY_COLLECT (else FAIL_FAST)
    PRIMARY KEY (workflow_id, step_name)
);
