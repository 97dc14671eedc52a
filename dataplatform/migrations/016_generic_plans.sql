-- Cached generic plans for the engine's functions (issue #23). PL/pgSQL keeps each
-- statement's plan for the session, but under the default plan_cache_mode (auto) it plans
-- the statement afresh with the call's arguments ("custom" plans) as long as those look
-- cheaper than the generic plan, and they always do here: with the arguments known the
-- planner counts an unnest(array) exactly (one row for one completion), without them it
-- guesses ten. So every call of wf_complete_steps planned its dozen statements again, and
-- wf_append_events (called by it and by claims) its statement.
--
-- A generic plan alone is no better on small tables: guessing ten keys per array, the
-- planner prefers a sequential scan of a table of up to a few thousand rows (workflows,
-- workflow_steps) to ten index probes, and keeps that plan until ANALYZE. Every statement
-- of these functions reads or writes the rows of the workflows it is given, by key or
-- through the runnable indexes, so sequential scans are switched off for them
-- (enable_seqscan only steers the choice: a statement with no index path still scans).
--
-- One backend, alternating calls, wf_complete_steps of one step leasing its successor
-- (median of 200 each, load average 2): 3,000 chains in the tables, analysed: 1.89–1.94
-- ms as before, 1.12–1.13 ms generic, 1.08 ms generic without sequential scans; 300
-- chains: 1.68–1.95, 1.82–2.22, 1.15–1.49 ms. wf_create_workflow: equal within 0.05 ms
-- (its statement's plan was generic already); set too, so the engine's functions plan
-- alike. CREATE OR REPLACE FUNCTION drops these settings: a migration replacing one of
-- these functions sets them again (tests/dataplatform/test_migrations.py checks).
ALTER FUNCTION wf_append_events(uuid[], text[], smallint[], text[], uuid[], smallint[],
    text[], boolean)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
ALTER FUNCTION wf_complete_steps(text, uuid[], text[], integer[], jsonb[], integer,
    double precision, boolean)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
ALTER FUNCTION wf_create_workflow(uuid, text, text, text[], text, bytea, integer, float8,
    text[], text[], jsonb[], jsonb[], integer[], float8[], float8[], float8[], float8[],
    float8[], float8[], timestamptz[], text[], boolean[], text, float8, jsonb, text, uuid,
    text[], text, text, text[], float8)
    SET plan_cache_mode = force_generic_plan SET enable_seqscan = off;
