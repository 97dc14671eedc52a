-- Durable workflows: state, the step queue (leases, retries), attempts and events.
-- States are the aiwfe.taskproc.v1 enum numbers (WorkflowState / StepState).
CREATE TABLE workflows (
    workflow_id     uuid PRIMARY KEY,
    owner_id        text NOT NULL,
    owner_username  text NOT NULL,
    owner_roles     text[] NOT NULL DEFAULT '{}',
    idempotency_key text,
    spec            bytea NOT NULL,
    state           smallint NOT NULL,
    priority        integer NOT NULL DEFAULT 0,
    error           text NOT NULL DEFAULT '',
    deadline_at     timestamptz NOT NULL,
    last_sequence   bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_id, idempotency_key)
);
CREATE INDEX workflows_owner_created ON workflows (owner_id, created_at DESC, workflow_id DESC);
CREATE INDEX workflows_state_created ON workflows (state, created_at DESC, workflow_id DESC);
CREATE INDEX workflows_active_deadline ON workflows (deadline_at) WHERE state IN (1, 2);

CREATE TABLE workflow_steps (
    workflow_id        uuid NOT NULL REFERENCES workflows ON DELETE CASCADE,
    name               text NOT NULL,
    position           integer NOT NULL,
    op                 text NOT NULL,
    inputs             jsonb NOT NULL DEFAULT '{}',
    depends_on         text[] NOT NULL DEFAULT '{}',
    remaining_deps     integer NOT NULL,
    state              smallint NOT NULL,
    priority           integer NOT NULL DEFAULT 0,
    attempt            integer NOT NULL DEFAULT 0,  -- claims so far: the lease fencing token
    failures           integer NOT NULL DEFAULT 0,  -- failed attempts (retry budget)
    max_attempts       integer NOT NULL,
    initial_backoff    double precision NOT NULL,
    backoff_multiplier double precision NOT NULL,
    max_backoff        double precision NOT NULL,
    jitter             double precision NOT NULL,
    timeout_seconds    double precision NOT NULL,
    next_run_at        timestamptz NOT NULL DEFAULT now(),
    lease_owner        text,
    lease_expires_at   timestamptz,
    output             jsonb,
    error              text NOT NULL DEFAULT '',
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, name)
);
-- The queue: runnable = pending or retrying with every dependency done.
CREATE INDEX workflow_steps_runnable ON workflow_steps (priority DESC, next_run_at)
    WHERE state IN (1, 6) AND remaining_deps = 0;
CREATE INDEX workflow_steps_leases ON workflow_steps (lease_expires_at) WHERE state = 2;

-- One row per finished attempt: a result is recorded at most once per attempt.
CREATE TABLE workflow_step_attempts (
    workflow_id uuid NOT NULL REFERENCES workflows ON DELETE CASCADE,
    step_name   text NOT NULL,
    attempt     integer NOT NULL,
    worker_id   text NOT NULL,
    succeeded   boolean NOT NULL,
    output      jsonb,
    error       text NOT NULL DEFAULT '',
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, step_name, attempt)
);

CREATE TABLE workflow_events (
    workflow_id    uuid NOT NULL REFERENCES workflows ON DELETE CASCADE,
    sequence       bigint NOT NULL,
    workflow_state smallint NOT NULL,
    step_name      text NOT NULL DEFAULT '',
    step_state     smallint NOT NULL DEFAULT 0,
    message        text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (workflow_id, sequence)
);
