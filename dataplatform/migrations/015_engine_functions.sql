-- Step completion in one call (issue #23): the complete transaction was seven round trips
-- (BEGIN, the completion, the workflow row lock, the finished check, the successor's lease,
-- the events, COMMIT), each statement parsed and planned afresh (no prepared statements:
-- PgBouncer). As PL/pgSQL functions they are one round trip, and each backend caches
-- their plans. Every statement inside a function takes a fresh snapshot (READ COMMITTED,
-- VOLATILE), so the finished check still runs after the workflow row lock and sees the
-- sibling completions that committed before it (the rule repository.complete states).
--
-- States are literals, as in dataplatform/workflows/states.py (whose SQL uses literals too, for
-- the partial indexes; tests/dataplatform/test_complete_alone.py reads what these write):
-- steps PENDING 1, RUNNING 2, SUCCEEDED 3, RETRYING 6, SKIPPED 7; workflows PENDING 1,
-- RUNNING 2, SUCCEEDED 3, finished 3-6.

-- Events with gap-free per-workflow sequences and the workflows' state changes (moved_*),
-- in one statement; with several workflows the caller locks their rows first, in id order
-- (repository.lock_workflows), so concurrent appends never deadlock.
CREATE FUNCTION wf_append_events(
    p_ids uuid[], p_steps text[], p_step_states smallint[], p_messages text[],
    p_moved_ids uuid[], p_moved_states smallint[], p_moved_errors text[],
    p_promote_pending boolean)
RETURNS TABLE (workflow_id uuid, sequence bigint, workflow_state smallint, step_name text,
               step_state smallint, message text, created_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH c AS (SELECT * FROM unnest(p_ids, p_steps, p_step_states, p_messages)
        WITH ORDINALITY AS c(wf, step, step_state, msg, ord)),
    n AS (SELECT wf, count(*) AS k FROM c GROUP BY wf),
    t AS (SELECT * FROM unnest(p_moved_ids, p_moved_states, p_moved_errors) AS t(wf, state, err)),
    w AS (UPDATE workflows w SET last_sequence = w.last_sequence + n.k,
        state = COALESCE(t.state, CASE WHEN p_promote_pending AND w.state = 1 THEN 2
            ELSE w.state END),
        error = COALESCE(t.err, w.error), updated_at = now(),
        -- Set when the workflow finishes, cleared when a retry makes it active (013).
        finished_at = CASE WHEN t.state IS NULL THEN w.finished_at
            WHEN t.state IN (3, 4, 5, 6) THEN now() END
        FROM n LEFT JOIN t ON t.wf = n.wf WHERE w.workflow_id = n.wf
        RETURNING w.workflow_id AS wf, w.last_sequence, n.k, w.state)
    INSERT INTO workflow_events AS e
        (workflow_id, sequence, workflow_state, step_name, step_state, message)
    SELECT c.wf, w.last_sequence - w.k + row_number() OVER (PARTITION BY c.wf ORDER BY c.ord),
        w.state, c.step, c.step_state, c.msg
    FROM c JOIN w ON w.wf = c.wf
    RETURNING e.workflow_id, e.sequence, e.workflow_state, e.step_name, e.step_state,
        e.message, e.created_at;
END $$;

-- Records results where the lease is still p_worker's, counts down the dependants'
-- unmet dependencies, locks the workflow rows, finishes workflows whose steps are all
-- done, leases up to p_eager_max of the built-in steps it made runnable to p_worker
-- (eager dispatch, unless a runnable built-in step of a higher priority waits) and
-- appends the events. Rows by `kind`:
--   done:   a recorded result (ord: 1-based position in the arrays)
--   dep:    a dependant counted down (remaining, queue, gated: has a condition)
--   leased: a step leased to p_worker, with what a ClaimedStep needs
--   slot:   a finished workflow's concurrency slot (owner_id, slot_key) to pass on
--   event:  an appended event
-- With p_alone (the call is its own transaction, autocommit), a batch that needs more
-- than this (a fan-out item, a dependant with a condition, a timer/signal/fan-out
-- dependant, a workflow with a concurrency key) changes nothing and answers one row of
-- kind `whole`: the caller runs repository.complete's whole transaction instead.
CREATE FUNCTION wf_complete_steps(
    p_worker text, p_ids uuid[], p_names text[], p_attempts integer[], p_outputs jsonb[],
    p_eager_max integer, p_eager_lease double precision, p_alone boolean)
RETURNS TABLE (kind text, ord bigint, workflow_id uuid, name text, attempt integer,
    remaining integer, queue text, gated boolean, op text, inputs jsonb,
    timeout_seconds double precision, lease_expires_at timestamptz, priority integer,
    next_run_at timestamptz, owner_id text, owner_username text, owner_roles text[],
    task_type text, heartbeat_timeout double precision, attempt_deadline_at timestamptz,
    trace_context jsonb, submitted_at timestamptz, item_index integer, item jsonb,
    sequence bigint, workflow_state smallint, step_state smallint, message text,
    created_at timestamptz, slot_key text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    d_ords bigint[]; d_ids uuid[]; d_names text[]; d_attempts integer[];
    r_ids uuid[]; r_names text[]; r_remaining integer[]; r_queues text[]; r_gated boolean[];
    touched uuid[]; finished uuid[]; l_ids uuid[]; l_names text[]; l_attempts integer[];
BEGIN
    IF p_alone AND (
        EXISTS (SELECT 1 FROM unnest(p_names) AS n WHERE n LIKE '%[%')
        OR EXISTS (SELECT 1 FROM workflows w WHERE w.workflow_id = ANY(p_ids)
            AND w.concurrency_key IS NOT NULL)
        OR EXISTS (SELECT 1 FROM workflow_steps d
            JOIN unnest(p_ids, p_names) AS u(wf, name)
              ON d.workflow_id = u.wf AND u.name = ANY(d.depends_on)
            WHERE d.state = 1 AND (d.condition IS NOT NULL OR d.queue LIKE '$%'))) THEN
        RETURN QUERY SELECT 'whole'::text, NULL::bigint, NULL::uuid, NULL::text,
            NULL::integer, NULL::integer, NULL::text, NULL::boolean, NULL::text, NULL::jsonb,
            NULL::float8, NULL::timestamptz, NULL::integer, NULL::timestamptz, NULL::text,
            NULL::text, NULL::text[], NULL::text, NULL::float8, NULL::timestamptz,
            NULL::jsonb, NULL::timestamptz, NULL::integer, NULL::jsonb, NULL::bigint,
            NULL::smallint, NULL::smallint, NULL::text, NULL::timestamptz, NULL::text;
        RETURN;
    END IF;

    WITH u AS (SELECT * FROM unnest(p_ids, p_names, p_attempts, p_outputs)
        WITH ORDINALITY AS u(wf, name, attempt, output, ord)),
    done AS (UPDATE workflow_steps s SET state = 3, output = u.output, error = '',
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now() FROM u
        WHERE s.workflow_id = u.wf AND s.name = u.name AND s.attempt = u.attempt
        AND s.lease_owner = p_worker AND s.state = 2
        RETURNING u.ord, s.workflow_id, s.name, s.attempt, u.output),
    rec AS (INSERT INTO workflow_step_attempts
        (workflow_id, step_name, attempt, worker_id, succeeded, output)
        SELECT done.workflow_id, done.name, done.attempt, p_worker, true, done.output
        FROM done),
    deps AS (UPDATE workflow_steps d SET remaining_deps = d.remaining_deps - x.k,
        -- A timer starts when the step is reached (harmless until the last dependency).
        next_run_at = greatest(now() + coalesce(d.timer_seconds, 0) * interval '1 second',
            d.not_before_at), updated_at = now()
        FROM (SELECT d2.workflow_id, d2.name, count(*) AS k FROM workflow_steps d2
            JOIN done a ON d2.workflow_id = a.workflow_id AND a.name = ANY(d2.depends_on)
            WHERE d2.state = 1 GROUP BY 1, 2) x
        WHERE d.workflow_id = x.workflow_id AND d.name = x.name
        RETURNING d.workflow_id, d.name, d.remaining_deps, d.queue,
            d.condition IS NOT NULL AS gated)
    SELECT (SELECT array_agg(done.ord ORDER BY done.workflow_id, done.name) FROM done),
        (SELECT array_agg(done.workflow_id ORDER BY done.workflow_id, done.name) FROM done),
        (SELECT array_agg(done.name ORDER BY done.workflow_id, done.name) FROM done),
        (SELECT array_agg(done.attempt ORDER BY done.workflow_id, done.name) FROM done),
        (SELECT array_agg(deps.workflow_id) FROM deps),
        (SELECT array_agg(deps.name) FROM deps),
        (SELECT array_agg(deps.remaining_deps) FROM deps),
        (SELECT array_agg(deps.queue) FROM deps),
        (SELECT array_agg(deps.gated) FROM deps)
    INTO d_ords, d_ids, d_names, d_attempts, r_ids, r_names, r_remaining, r_queues, r_gated;
    IF d_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT 'done'::text, x.o, x.wf, x.n, x.a, NULL::integer, NULL::text,
        NULL::boolean, NULL::text, NULL::jsonb, NULL::float8, NULL::timestamptz,
        NULL::integer, NULL::timestamptz, NULL::text, NULL::text, NULL::text[], NULL::text,
        NULL::float8, NULL::timestamptz, NULL::jsonb, NULL::timestamptz, NULL::integer,
        NULL::jsonb, NULL::bigint, NULL::smallint, NULL::smallint, NULL::text,
        NULL::timestamptz, NULL::text
        FROM unnest(d_ords, d_ids, d_names, d_attempts) AS x(o, wf, n, a);
    RETURN QUERY SELECT 'dep'::text, NULL::bigint, x.wf, x.n, NULL::integer, x.r, x.q, x.g,
        NULL::text, NULL::jsonb, NULL::float8, NULL::timestamptz, NULL::integer,
        NULL::timestamptz, NULL::text, NULL::text, NULL::text[], NULL::text, NULL::float8,
        NULL::timestamptz, NULL::jsonb, NULL::timestamptz, NULL::integer, NULL::jsonb,
        NULL::bigint, NULL::smallint, NULL::smallint, NULL::text, NULL::timestamptz,
        NULL::text
        FROM unnest(r_ids, r_names, r_remaining, r_queues, r_gated) AS x(wf, n, r, q, g);

    -- Completions of sibling steps serialise on the workflow row; the finished check
    -- below is a new statement, so it sees the ones that committed while we waited.
    touched := ARRAY(SELECT DISTINCT unnest(d_ids) ORDER BY 1);
    PERFORM 1 FROM workflows w WHERE w.workflow_id = ANY(touched)
        ORDER BY w.workflow_id FOR NO KEY UPDATE;
    RETURN QUERY SELECT 'slot'::text, NULL::bigint, w.workflow_id, NULL::text,
        NULL::integer, NULL::integer, NULL::text, NULL::boolean, NULL::text, NULL::jsonb,
        NULL::float8, NULL::timestamptz, NULL::integer, NULL::timestamptz, w.owner_id,
        NULL::text, NULL::text[], NULL::text, NULL::float8, NULL::timestamptz, NULL::jsonb,
        NULL::timestamptz, NULL::integer, NULL::jsonb, NULL::bigint, NULL::smallint,
        NULL::smallint, NULL::text, NULL::timestamptz, w.concurrency_key
        FROM workflows w WHERE w.workflow_id = ANY(touched) AND w.admitted
        AND w.concurrency_key IS NOT NULL;
    finished := ARRAY(SELECT s.workflow_id FROM workflow_steps s
        WHERE s.workflow_id = ANY(touched) AND s.parent IS NULL
        GROUP BY s.workflow_id HAVING bool_and(s.state IN (3, 7)) ORDER BY 1);

    IF p_eager_max > 0 AND r_ids IS NOT NULL THEN
        -- As ClaimSteps' claim of built-in steps, among the built-in dependants just
        -- made runnable with no condition.
        WITH picked AS (SELECT s.workflow_id, s.name FROM workflow_steps s
            JOIN unnest(r_ids, r_names, r_remaining, r_queues, r_gated) AS c(wf, n, r, q, g)
              ON s.workflow_id = c.wf AND s.name = c.n
            WHERE c.r = 0 AND c.q IS NULL AND NOT c.g
            AND s.state IN (1, 6) AND s.remaining_deps = 0 AND s.queue IS NULL
            AND s.next_run_at <= now()
            AND NOT EXISTS (SELECT 1 FROM workflow_steps h
                WHERE h.state IN (1, 6) AND h.remaining_deps = 0 AND h.queue IS NULL
                AND h.next_run_at <= now() AND h.priority > s.priority)
            ORDER BY s.priority DESC, s.next_run_at LIMIT p_eager_max
            FOR UPDATE OF s SKIP LOCKED),
        l AS (UPDATE workflow_steps s SET state = 2, attempt = s.attempt + 1,
            lease_owner = p_worker,
            lease_expires_at = now() + p_eager_lease * interval '1 second',
            attempt_deadline_at = NULL, details = NULL, updated_at = now()
            FROM picked WHERE s.workflow_id = picked.workflow_id AND s.name = picked.name
            RETURNING s.workflow_id, s.name, s.attempt, s.priority, s.next_run_at)
        SELECT array_agg(l.workflow_id ORDER BY l.priority DESC, l.next_run_at),
            array_agg(l.name ORDER BY l.priority DESC, l.next_run_at),
            array_agg(l.attempt ORDER BY l.priority DESC, l.next_run_at)
        INTO l_ids, l_names, l_attempts FROM l;
    END IF;

    RETURN QUERY SELECT 'event'::text, NULL::bigint, e.workflow_id, e.step_name,
        NULL::integer, NULL::integer, NULL::text, NULL::boolean, NULL::text, NULL::jsonb,
        NULL::float8, NULL::timestamptz, NULL::integer, NULL::timestamptz, NULL::text,
        NULL::text, NULL::text[], NULL::text, NULL::float8, NULL::timestamptz, NULL::jsonb,
        NULL::timestamptz, NULL::integer, NULL::jsonb, e.sequence, e.workflow_state,
        e.step_state, e.message, e.created_at, NULL::text
        FROM wf_append_events(
            d_ids || finished || coalesce(l_ids, '{}'),
            d_names || array_fill(''::text, ARRAY[cardinality(finished)])
                || coalesce(l_names, '{}'),
            array_fill(3::smallint, ARRAY[cardinality(d_ids)])
                || array_fill(0::smallint, ARRAY[cardinality(finished)])
                || array_fill(2::smallint, ARRAY[coalesce(cardinality(l_ids), 0)]),
            ARRAY(SELECT 'attempt ' || a FROM unnest(d_attempts) WITH ORDINALITY AS x(a, i)
                ORDER BY i)
                || array_fill('workflow succeeded'::text, ARRAY[cardinality(finished)])
                || ARRAY(SELECT 'attempt ' || a FROM unnest(l_attempts) WITH ORDINALITY
                    AS x(a, i) ORDER BY i),
            finished, array_fill(3::smallint, ARRAY[cardinality(finished)]),
            array_fill(''::text, ARRAY[cardinality(finished)]), false) AS e;

    IF l_ids IS NOT NULL THEN
        RETURN QUERY SELECT 'leased'::text, x.i, s.workflow_id, s.name, s.attempt,
            NULL::integer, s.queue, NULL::boolean, s.op, s.inputs, s.timeout_seconds,
            s.lease_expires_at, s.priority, s.next_run_at, w.owner_id, w.owner_username,
            w.owner_roles, s.task_type, s.heartbeat_timeout, s.attempt_deadline_at,
            w.trace_context, w.created_at, s.item_index, s.item, NULL::bigint,
            NULL::smallint, NULL::smallint, NULL::text, NULL::timestamptz, NULL::text
            FROM unnest(l_ids, l_names) WITH ORDINALITY AS x(wf, n, i)
            JOIN workflow_steps s ON s.workflow_id = x.wf AND s.name = x.n
            JOIN workflows w ON w.workflow_id = x.wf
            ORDER BY x.i;
    END IF;
END $$;

-- A workflow's submission (repository._insert): its row, its steps and its first event, in
-- one statement as before, now with a cached plan (its planning took longer than its
-- execution). With eager dispatch (p_eager_names: runnable root steps, no timer, no
-- not_before, no condition) those steps are inserted RUNNING, attempt 1, leased to
-- p_eager_worker (a task step to p_eager_task_lease), with their "attempt 1" events,
-- exactly as a ClaimSteps would leave them, unless a runnable step of a higher priority
-- waits (`ok`). No row when the idempotency key was used before.
CREATE FUNCTION wf_create_workflow(
    p_workflow_id uuid, p_owner_id text, p_owner_username text, p_owner_roles text[],
    p_idempotency_key text, p_spec bytea, p_priority integer, p_timeout_seconds float8,
    p_step_names text[], p_step_ops text[], p_step_inputs jsonb[], p_step_deps jsonb[],
    p_max_attempts integer[], p_initial_backoffs float8[], p_backoff_multipliers float8[],
    p_max_backoffs float8[], p_jitters float8[], p_step_timeouts float8[],
    p_step_timers float8[], p_step_not_befores timestamptz[], p_step_conditions text[],
    p_step_run_skipped boolean[], p_submitted text, p_default_heartbeat float8,
    p_trace_context jsonb, p_name text, p_schedule_id uuid, p_eager_names text[],
    p_eager_worker text, p_eager_task_lease text, p_eager_queues text[], p_eager_lease float8)
RETURNS TABLE (workflow_id uuid, owner_id text, owner_username text, owner_roles text[],
    spec bytea, state smallint, error text, created_at timestamptz, updated_at timestamptz,
    last_sequence bigint, eager boolean, tx_now timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH ok AS (SELECT cardinality(p_eager_names) > 0 AND NOT EXISTS
        (SELECT 1 FROM workflow_steps h
        WHERE h.state IN (1, 6) AND h.remaining_deps = 0
        AND (h.queue IS NULL OR h.queue = ANY(p_eager_queues))
        AND h.next_run_at <= now() AND h.priority > p_priority) AS eager),
    w AS (INSERT INTO workflows AS wf (workflow_id, owner_id, owner_username, owner_roles,
        idempotency_key, spec, state, priority, deadline_at, last_sequence, trace_context,
        name, schedule_id)
        VALUES (p_workflow_id, p_owner_id, p_owner_username, p_owner_roles,
        p_idempotency_key, p_spec, CASE WHEN (SELECT ok.eager FROM ok) THEN 2 ELSE 1 END,
        p_priority, now() + p_timeout_seconds * interval '1 second',
        1 + CASE WHEN (SELECT ok.eager FROM ok) THEN cardinality(p_eager_names) ELSE 0 END,
        p_trace_context, p_name, p_schedule_id)
        ON CONFLICT (owner_id, idempotency_key) DO NOTHING
        RETURNING wf.workflow_id, wf.owner_id, wf.owner_username, wf.owner_roles, wf.spec,
            wf.state, wf.error, wf.created_at, wf.updated_at, wf.last_sequence),
    s AS (INSERT INTO workflow_steps (workflow_id, name, position, op, inputs,
        depends_on, remaining_deps, state, priority, max_attempts, initial_backoff,
        backoff_multiplier, max_backoff, jitter, timeout_seconds, queue, task_type,
        heartbeat_timeout, timer_seconds, not_before_at, next_run_at, condition,
        run_if_dependency_skipped, attempt, lease_owner, lease_expires_at,
        attempt_deadline_at)
        SELECT w.workflow_id, u.name, u.ord - 1, u.op, u.inputs,
        ARRAY(SELECT jsonb_array_elements_text(u.deps)), jsonb_array_length(u.deps),
        CASE WHEN ea.leased THEN 2 ELSE 1 END,
        p_priority, u.max_attempts, u.initial_backoff,
        u.backoff_multiplier, u.max_backoff, u.jitter, u.timeout_seconds,
        -- A task step's queue and type (validated literals, see taskproc/ops/task.py)
        -- become columns, so claims filter on an index; timers and signals wait in
        -- queues of their own (repository.TIMER_QUEUE, SIGNAL_QUEUE).
        CASE u.op WHEN 'task' THEN u.inputs->>'queue' WHEN 'sleep' THEN '$timer'
            WHEN 'wait_for_signal' THEN '$signal' END,
        CASE WHEN u.op = 'task' THEN u.inputs->>'type' END,
        CASE WHEN u.op = 'task' THEN coalesce(
            (u.inputs->>'heartbeat_timeout_seconds')::float8, p_default_heartbeat) END,
        u.timer, u.not_before,
        greatest(now() + coalesce(u.timer, 0) * interval '1 second', u.not_before),
        u.condition, u.run_skipped, CASE WHEN ea.leased THEN 1 ELSE 0 END,
        CASE WHEN ea.leased THEN CASE WHEN u.op = 'task' THEN p_eager_task_lease
            ELSE p_eager_worker END END,
        -- A task's lease is its heartbeat timeout, never past its attempt's deadline.
        CASE WHEN ea.leased THEN now() + CASE WHEN u.op = 'task' THEN least(coalesce(
            (u.inputs->>'heartbeat_timeout_seconds')::float8, p_default_heartbeat),
            u.timeout_seconds) ELSE p_eager_lease END * interval '1 second' END,
        CASE WHEN ea.leased AND u.op = 'task'
            THEN now() + u.timeout_seconds * interval '1 second' END
        FROM w, unnest(p_step_names, p_step_ops, p_step_inputs, p_step_deps,
            p_max_attempts, p_initial_backoffs, p_backoff_multipliers, p_max_backoffs,
            p_jitters, p_step_timeouts, p_step_timers, p_step_not_befores,
            p_step_conditions, p_step_run_skipped)
        WITH ORDINALITY AS u(name, op, inputs, deps, max_attempts, initial_backoff,
            backoff_multiplier, max_backoff, jitter, timeout_seconds, timer, not_before,
            condition, run_skipped, ord),
        LATERAL (SELECT (SELECT ok.eager FROM ok) AND u.name = ANY(p_eager_names)
            AS leased) ea),
    e AS (INSERT INTO workflow_events (workflow_id, sequence, workflow_state,
        step_name, step_state, message, created_at)
        SELECT w.workflow_id, 1, 1, '', 0, p_submitted, w.created_at FROM w
        UNION ALL
        SELECT w.workflow_id, 1 + x.n, 2, x.name, 2, 'attempt 1', w.created_at
        FROM w, ok, unnest(p_eager_names) WITH ORDINALITY AS x(name, n) WHERE ok.eager)
    SELECT w.workflow_id, w.owner_id, w.owner_username, w.owner_roles, w.spec, w.state,
        w.error, w.created_at, w.updated_at, w.last_sequence, (SELECT ok.eager FROM ok),
        now() FROM w;
END $$;
