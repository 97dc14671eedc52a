-- Cached generic plans for the engine's functions (issue #23). PL/pgSQL keeps each
-- statement's plan for the session, but under the default plan_cache_mode (auto) it plans
-- the statement afresh with the call's arguments ("custom" plans) as long as those look
-- cheaper than the generic plan, and they always do here: with the arguments known the
-- planner counts an unnest(array) exactly (one row for one completion), without them it
-- guesses ten. So every call of wf_complete_steps planned its dozen statements again,
-- wf_append_events (called by it and by claims) and wf_create_workflow their big
-- statements too. Measured on one backend, 3,000 chains in the table, analysed, load
-- average 9 (the machine shared), wf_complete_steps of one step leasing its successor:
-- 1.49–4.21 ms per call with custom plans, 0.84–2.40 ms with generic ones (−30 to −45 %),
-- in alternating calls. The generic plans of these statements are the ones the custom
-- plans were: index scans on the primary keys and the runnable index, nested loops over
-- the arrays; they are replanned when ANALYZE changes the tables' statistics.
ALTER FUNCTION wf_append_events(uuid[], text[], smallint[], text[], uuid[], smallint[],
    text[], boolean) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION wf_complete_steps(text, uuid[], text[], integer[], jsonb[], integer,
    double precision, boolean) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION wf_create_workflow(uuid, text, text, text[], text, bytea, integer, float8,
    text[], text[], jsonb[], jsonb[], integer[], float8[], float8[], float8[], float8[],
    float8[], float8[], timestamptz[], text[], boolean[], text, float8, jsonb, text, uuid,
    text[], text, text, text[], float8) SET plan_cache_mode = force_generic_plan;
