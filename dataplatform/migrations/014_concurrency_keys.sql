-- Concurrency keys (WorkflowSpec.concurrency): at most concurrency_max workflows of one
-- (owner_id, concurrency_key) are admitted and active at once; the rest wait PENDING with
-- their root steps gated (remaining_deps + 1, so no claim, timer or signal sees them) until
-- a finishing workflow of the key admits them in submit order. NULL key: not limited, and
-- never in the index below (its predicate is false), so such workflows pay nothing.
ALTER TABLE workflows
    ADD COLUMN concurrency_key text,
    ADD COLUMN concurrency_max integer,
    ADD COLUMN admitted boolean;  -- holds one of its key's slots (NULL without a key)

-- The active workflows of a key: the admitted ones (slots taken) and the queue in order.
CREATE INDEX workflows_concurrency ON workflows
    (owner_id, concurrency_key, admitted, created_at, workflow_id)
    WHERE concurrency_key IS NOT NULL AND state IN (1, 2);
