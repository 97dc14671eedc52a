"""Every workflow spec the README shows (each ```yaml block with `steps`) passes the same
validation as SubmitWorkflow, so no example of "Workflow language" drifts from the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from aiwfe.runtime.config import TaskProcSettings
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from taskproc.spec import validate

README = Path(__file__).resolve().parents[2] / "README.md"
# One per feature of the workflow language, plus the SDK's and the worker's examples.
EXPECTED = {
    "rag",
    "summarize",
    "review-answer",
    "nightly-report",
    "cool-down-then-approve",
    "triage",
    "answer-each-hit",
    "answer-ticket",
}


def readme_specs() -> dict[str, dict[str, Any]]:
    """The README's YAML blocks that are workflow specs, by their `name`."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    specs = [yaml.safe_load(block) for block in blocks]
    return {s["name"]: s for s in specs if isinstance(s, dict) and "steps" in s}


def test_the_readme_shows_a_spec_per_feature() -> None:
    """The extraction finds every example (so the check below cannot pass on nothing)."""
    assert EXPECTED <= set(readme_specs()), sorted(readme_specs())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_readme_spec_passes_submit_validation(name: str) -> None:
    """The README's spec `name` parses as a WorkflowSpec and passes submit validation."""
    example = readme_specs()[name]
    checked = validate(json_format.ParseDict(example, wf_pb.WorkflowSpec()), TaskProcSettings())
    assert [s.name for s in checked.steps] == [s["name"] for s in example["steps"]]
