"""The example pipeline (examples/ai_pipeline): index documents -> search -> for_each
generate -> wait_for_signal approval -> index the approved answers, against the real suite
with a fake LLM speaking Ollama's wire format; and its runner script with `aiwfe up`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiwfe.app.suite import start_suite
from aiwfe.runtime.config import Settings
from aiwfe.sdk.client import AsyncClient
from examples.ai_pipeline.run import (
    FAKE_MODEL,
    SPEC_PATH,
    answering_routes,
    llm_config,
    load_spec,
    run_pipeline,
)
from taskproc.spec import validate
from tests.cognitive.fake_llm import FakeLLMServer
from tests.conftest import ADMIN_PASSWORD

ROOT = Path(__file__).resolve().parents[1]


def _documents() -> dict[str, str]:
    data = yaml.safe_load(SPEC_PATH.read_text())
    return {d["id"]: d["text"] for d in data["input"]["documents"]}


def test_the_example_spec_passes_submit_validation() -> None:
    """pipeline.yaml parses and passes the same validation as SubmitWorkflow."""
    spec = validate(load_spec(), Settings().taskproc)
    assert [s.op for s in spec.steps] == [
        "cognitive.index",
        "cognitive.search",
        "cognitive.generate",
        "wait_for_signal",
        "cognitive.index",
    ]


async def test_the_example_pipeline_runs_end_to_end(base_overrides) -> None:
    """Against the suite with a fake Ollama: one generation per search hit (3, in hit
    order, each answering from its own passage), the approval signal carries the approved
    answers, and they end up indexed and searchable in the answers collection."""
    llm = await FakeLLMServer(answering_routes()).start()
    overrides = {
        **base_overrides,
        "cognitive": {**base_overrides["cognitive"], **llm_config(llm.url)["cognitive"]},
    }
    suite = await start_suite(overrides)
    try:
        async with AsyncClient(suite.address("gateway"), timeout=30) as client:
            await client.login("admin", ADMIN_PASSWORD)
            lines: list[str] = []
            result = await asyncio.wait_for(run_pipeline(client, load_spec(), say=lines.append), 90)
            assert result["state"] == "WORKFLOW_STATE_SUCCEEDED", result["error"]
            documents = _documents()
            answers = result["answers"]
            assert len(answers) == 3
            for a in answers:  # each answer came from the passage of its own hit
                first = documents[a["source"]].split(".")[0].strip()
                assert a["text"] == f"From the handbook: {first}.", a
            assert answers[0]["source"] in {"key-rotation", "incident-response", "on-call"}
            chats = [body for path, body in llm.requests if path == "/api/chat"]
            assert len(chats) == 3 and {b["model"] for b in chats} == {FAKE_MODEL}
            assert all("rotate the signing keys" in b["messages"][0]["content"] for b in chats)
            assert result["indexed"]["document_count"] == 3
            found = await client.search("example-answers", "signing keys rotated", top_k=5)
            assert {h.document_id for h in found.hits} == {"answer-0", "answer-1", "answer-2"}
    finally:
        await suite.stop()
        await llm.stop()


@pytest.mark.slow
async def test_the_runner_script_works_with_aiwfe_up(database_dsn, tmp_path) -> None:
    """`python -m examples.ai_pipeline.run` starts its fake LLM and `aiwfe up --config`
    itself, approves, and prints a succeeded workflow with the answers indexed."""
    env = {
        **os.environ,
        "AIWFE_DATABASE__POSTGRES__DSN": database_dsn,
        "AIWFE_DATABASE__POSTGRES__POOL_SIZE": "2",
        "AIWFE_ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.ai_pipeline.run",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 110)
    text = out.decode()
    assert proc.returncode == 0, (text, err.decode()[-2000:])
    summary: dict[str, Any] = json.loads(text[text.index("\n{") + 1 :])
    assert summary["state"] == "WORKFLOW_STATE_SUCCEEDED"
    assert summary["indexed"]["document_count"] == len(summary["approved"]) == 3
    assert "approved 3 answer(s) (delivered: True)" in text
