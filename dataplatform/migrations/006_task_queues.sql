-- External workers (WorkerService): a step with op "task" waits on a named queue for a
-- worker of its type instead of taskproc's built-in workers. The queue and type are copied
-- out of the step's inputs at submit, so claims filter on indexed columns.
ALTER TABLE workflow_steps
    ADD COLUMN queue             text,  -- NULL: a built-in op, claimed by taskproc
    ADD COLUMN task_type         text,
    ADD COLUMN heartbeat_timeout double precision,  -- a task's lease length
    ADD COLUMN attempt_deadline_at timestamptz,     -- a task's lease never runs past it
    ADD COLUMN details           jsonb;             -- a task's last heartbeat details

ALTER TABLE workflow_step_attempts ADD COLUMN details jsonb;  -- a failed task's details

-- Built-in claims keep their own index; task claims get one per queue.
DROP INDEX workflow_steps_runnable;
CREATE INDEX workflow_steps_runnable ON workflow_steps (priority DESC, next_run_at)
    WHERE state IN (1, 6) AND remaining_deps = 0 AND queue IS NULL;
CREATE INDEX workflow_steps_runnable_tasks ON workflow_steps (queue, priority DESC, next_run_at)
    WHERE state IN (1, 6) AND remaining_deps = 0 AND queue IS NOT NULL;
