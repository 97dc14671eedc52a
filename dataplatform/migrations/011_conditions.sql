-- Step conditions (StepSpec.when, a CEL expression) and what a step does when a dependency
-- was skipped (StepSpec.on_dependency_skipped). dataplatform evaluates a condition in the
-- transaction that makes its step reachable (the workflow's insert for a root step, the
-- completion or skip of its last dependency), so a crash can never leave a reached step
-- unevaluated. A SKIPPED step (state 7) counts as done for its workflow.
ALTER TABLE workflow_steps
    ADD COLUMN condition text,  -- NULL: unconditional
    ADD COLUMN run_if_dependency_skipped boolean NOT NULL DEFAULT false;
