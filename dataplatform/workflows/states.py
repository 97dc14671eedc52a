"""The workflow and step states as stored: Python enums mirroring the proto enums
(`WorkflowState`, `StepState`; tests/dataplatform/test_workflow_states.py checks them equal),
so the engine's code and SQL read as names, not numbers.

SQL gets them as literals (`sql(...)`), never as parameters: the partial indexes of
migration 004 (`WHERE state IN (1, 6)`, `WHERE state = 2`) only serve queries whose
predicate the planner can see.
"""

from __future__ import annotations

from enum import IntEnum


class WorkflowState(IntEnum):
    """aiwfe.taskproc.v1.WorkflowState without its prefix (UNSPECIFIED is never stored)."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    TIMED_OUT = 6


class StepState(IntEnum):
    """aiwfe.taskproc.v1.StepState without its prefix; 0 marks a workflow-level event."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    RETRYING = 6
    SKIPPED = 7  # its condition was false, or a dependency was skipped (policy SKIP)


WORKFLOW_EVENT = 0  # an event's step_state when it is about the workflow, not a step
ACTIVE = (WorkflowState.PENDING, WorkflowState.RUNNING)
CLAIMABLE = (StepState.PENDING, StepState.RETRYING)  # and no unmet dependency
UNFINISHED = (StepState.PENDING, StepState.RUNNING, StepState.RETRYING)
FINISHED = (
    WorkflowState.SUCCEEDED,
    WorkflowState.FAILED,
    WorkflowState.CANCELLED,
    WorkflowState.TIMED_OUT,
)
# RetryWorkflow re-runs these (a cancelled or timed-out workflow resumes where it stopped);
# a succeeded one has nothing to re-run, an active one is still running.
RETRYABLE = (WorkflowState.FAILED, WorkflowState.CANCELLED, WorkflowState.TIMED_OUT)
# The steps a retry runs again; succeeded steps keep their outputs.
RERUN = (StepState.FAILED, StepState.CANCELLED)
DONE = (StepState.SUCCEEDED, StepState.SKIPPED)  # a workflow whose steps all are has SUCCEEDED


def sql(*states: IntEnum) -> str:
    """States as a SQL literal list: `sql(*CLAIMABLE)` is "1, 6"."""
    return ", ".join(str(int(s)) for s in states)
