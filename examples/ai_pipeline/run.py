"""Runs the example AI pipeline end to end (from the repository root):

    python -m examples.ai_pipeline.run [--question "..."] [--gateway ADDR]

Without `--gateway` it starts a fake LLM (an HTTP server speaking Ollama's `/api/chat`
wire format: NDJSON lines ending with `"done": true`) and `aiwfe up` with a configuration
pointing cognitive's generation at it, in a home of its own and on free ports. Then it
submits `pipeline.yaml`, waits for the `approve` step, plays the reviewer (approves every
non-empty answer, with the passage it came from in its metadata), and prints what was
indexed. With `--gateway` it uses a suite already running (and the LLM it is configured
with). It logs in as `admin` with `$AIWFE_ADMIN_PASSWORD` (on a fresh database `aiwfe up`
makes that the admin's password; without it one is generated for this run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from aiwfe.app.embedded import free_port
from aiwfe.sdk.client import AsyncClient
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from tests.cognitive.fake_llm import FakeLLMServer, Reply, ndjson

SPEC_PATH = Path(__file__).with_name("pipeline.yaml")
SERVICES = ("gateway", "cognitive", "taskproc", "dataplatform")
FAKE_MODEL = "fake-llama"

Review = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def load_spec(path: Path = SPEC_PATH, **inputs: Any) -> wf_pb.WorkflowSpec:
    """The pipeline's WorkflowSpec, with `inputs` replacing entries of its `input`."""
    data = yaml.safe_load(path.read_text())
    data.setdefault("input", {}).update(inputs)
    return json_format.ParseDict(data, wf_pb.WorkflowSpec())


def answering_routes() -> dict[str, Callable[[dict[str, Any]], Reply]]:
    """Ollama's `/api/chat`, streamed, answering from the passage in the user message."""

    def chat(body: dict[str, Any]) -> Reply:
        passage = next(
            (m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), ""
        )
        answer = f"From the handbook: {passage.split('.')[0].strip()}."
        pieces = [answer[i : i + 24] for i in range(0, len(answer), 24)]
        lines: list[dict[str, Any]] = [
            {"model": body["model"], "message": {"role": "assistant", "content": p}, "done": False}
            for p in pieces
        ]
        lines.append(
            {"model": body["model"], "message": {"role": "assistant", "content": ""},
             "done": True, "done_reason": "stop"}
        )  # fmt: skip
        return 200, "application/x-ndjson", ndjson(*lines)

    return {"/api/chat": chat}


def llm_config(url: str) -> dict[str, Any]:
    """The configuration that makes cognitive generate with the (fake) Ollama at `url`."""
    return {
        "cognitive": {
            "generation": {"backends": {"fake": {"kind": "ollama", "url": url,
                                                 "model": FAKE_MODEL}}},
            "embedding": {"download": False},  # the built-in embedder: nothing to fetch
        }
    }  # fmt: skip


def approve_all(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reviewer: every non-empty answer, as a document to index."""
    return [
        {
            "id": f"answer-{i}",
            "text": a["text"],
            "metadata": {"source": a["source"], "question": a["question"]},
        }
        for i, a in enumerate(answers)
        if a["text"].strip()
    ]


async def run_pipeline(
    client: AsyncClient,
    spec: wf_pb.WorkflowSpec,
    review: Review = approve_all,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Submits `spec`, waits until it waits for approval, sends the reviewer's choice as
    the `approval` signal, follows it to the end; returns a summary."""
    submitted = await client.submit_workflow(spec)
    wid = submitted.workflow.workflow_id
    say(f"submitted {wid}")
    seen = 0
    async with contextlib.aclosing(client.watch_workflow(wid)) as events:  # type: ignore[type-var]
        async for event in events:
            seen = event.sequence
            _show(event, say)
            if event.step_name == "generate" and event.step_state == wf_pb.STEP_STATE_SUCCEEDED:
                break  # the approval step waits now
            if event.workflow_state not in (
                wf_pb.WORKFLOW_STATE_PENDING,
                wf_pb.WORKFLOW_STATE_RUNNING,
            ):
                raise RuntimeError(f"workflow ended before approval: {event.message}")
    workflow = (await client.get_workflow(wid)).workflow
    outputs = {s.name: json_format.MessageToDict(s.output) for s in workflow.steps}
    question = spec.input["question"]
    answers = [
        {"text": item["text"], "source": hit["document_id"], "question": question}
        for item, hit in zip(outputs["generate"]["items"], outputs["search"]["hits"], strict=True)
    ]
    for a in answers:
        say(f"  answer from {a['source']}: {a['text']}")
    documents = review(answers)
    sent = await client.signal_workflow(
        wid, "approval", {"approved": True, "documents": documents}, signal_id=f"{wid}:review"
    )
    say(f"approved {len(documents)} answer(s) (delivered: {sent.delivered})")
    async for event in client.watch_workflow(wid, after_sequence=seen):
        _show(event, say)
    workflow = (await client.get_workflow(wid)).workflow
    outputs = {s.name: json_format.MessageToDict(s.output) for s in workflow.steps}
    return {
        "workflow_id": wid,
        "state": wf_pb.WorkflowState.Name(workflow.state),
        "error": workflow.error,
        "answers": answers,
        "approved": documents,
        "indexed": {k: int(v) for k, v in outputs.get("index_answers", {}).items()},
    }


def _show(event: wf_pb.WatchWorkflowResponse, say: Callable[[str], None]) -> None:
    if event.step_name:
        say(f"  {event.step_name}: {wf_pb.StepState.Name(event.step_state)[11:]}")


@contextlib.asynccontextmanager
async def aiwfe_up(config: dict[str, Any], password: str, home: Path) -> AsyncIterator[str]:
    """`aiwfe up --config` (the environment passes through, e.g. a database DSN) in
    `home` on free ports; yields the gateway's address, stops it with SIGTERM."""
    config_path = home / "aiwfe.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        "AIWFE_HOME": str(home / "home"),
        "AIWFE_ADMIN_PASSWORD": password,
        **{f"AIWFE_SERVICES__{n.upper()}__PORT": str(p) for n, p in ports.items()},
        **{f"AIWFE_SERVICES__{n.upper()}__METRICS_PORT": "null" for n in SERVICES},
    }
    log = (home / "services.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiwfe", "up", "--config", str(config_path),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        if proc.stdout is None:
            raise RuntimeError("no stdout pipe")
        while True:  # the banner ends with the Ctrl-C line once every service serves
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            if not line:
                raise RuntimeError(f"aiwfe up exited; see {home / 'services.log'}")
            if line.startswith("Ctrl-C"):
                break
        yield f"127.0.0.1:{ports['gateway']}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # it stops its services in order
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        log.close()


async def main(opts: argparse.Namespace) -> int:
    password = os.environ.get("AIWFE_ADMIN_PASSWORD") or secrets.token_urlsafe(18)
    spec = load_spec(**({"question": opts.question} if opts.question else {}))
    async with contextlib.AsyncExitStack() as stack:
        gateway = opts.gateway
        if gateway is None:
            llm = await FakeLLMServer(answering_routes()).start()
            stack.push_async_callback(llm.stop)
            print(f"fake LLM (Ollama wire format): {llm.url}")
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiwfe-ex-")))
            gateway = await stack.enter_async_context(aiwfe_up(llm_config(llm.url), password, home))
            print(f"aiwfe up: gateway {gateway}")
        client = await stack.enter_async_context(AsyncClient(gateway, timeout=30))
        await client.login("admin", password)
        result = await run_pipeline(client, spec)
    print(json.dumps(result, indent=2))
    return 0 if result["state"] == "WORKFLOW_STATE_SUCCEEDED" else 1


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", help="replaces the input's question")
    parser.add_argument("--gateway", help="use a running suite (no fake LLM, no aiwfe up)")
    sys.exit(asyncio.run(main(parser.parse_args())))


if __name__ == "__main__":
    cli()
