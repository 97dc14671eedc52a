"""The workflow engine: taskproc's durable workflow state machine and step queue, in
PostgreSQL.

Why it lives in dataplatform, not taskproc: the state machine *is* its transactions.
Every transition (claim, complete, fail, release, sweep, cancel) is one PostgreSQL
transaction that takes row locks, checks the fencing token (`attempt`) and appends a
gap-free event, so the states can only move where the database can enforce the move.
dataplatform owns the database (pool, migrations, stall guard, replica bus); taskproc is
stateless — the public WorkflowService, spec validation and the workers that run ops —
and reaches the state machine only through WorkflowStoreService. Moving the engine into
taskproc would give two services write access to the same tables.

Modules, one concern each:
- `states`: the stored states, Python enums equal to the proto enums;
- `repository`: every SQL statement (named parameters, states by name);
- `scheduling`: retries and backoff, dead letters, timeouts, the sweep;
- `timers`: the loop that fires due timers (sleep, signal timeouts) on every replica;
- `watches`: watch inboxes, WaitForWork subscribers, wake-ups across replicas;
- `messages`: rows to protobuf messages, ids, page tokens;
- `servicer`: the gRPC servicer (validation, then the above);
- `schedules`: ScheduleStoreService and the ticker that submits schedules' workflows;
- `retention`: the loop that deletes finished workflows past their retention.
"""

from dataplatform.workflows.servicer import WorkflowStore

__all__ = ["WorkflowStore"]
