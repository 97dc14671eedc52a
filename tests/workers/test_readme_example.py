"""The README's "Your own code as workflow steps" example, run as written: its service
account and API key commands, its module and workflow file, `aiwfe worker run` and `aiwfe
workflow submit --watch` as subprocesses against the suite. Where the CLI has no
`api-key` commands yet (a tree without the auth branch), a worker user's token stands in
for the API key."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

from google.protobuf import json_format

from aiwfe.app import cli
from tests.conftest import ADMIN_PASSWORD
from tests.taskproc.helpers import get, step_status
from tests.workers.conftest import ROOT, WorkerSuite

SECTION = "### Your own code as workflow steps"


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n### ", len(SECTION))]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.DOTALL)


async def _cli(*args: str, cwd: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiwfe.app.cli", *args, cwd=cwd, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _api_key(shell: str, cwd: Path, env: dict[str, str]) -> str | None:
    """Runs the README's `service-account create` and `api-key create` lines; the key, or
    None when this CLI has no such commands."""
    if not any(c.words == ("api-key", "create") for c in cli.COMMANDS):
        return None
    account = re.search(r"^aiwfe (service-account create .*?)\s+#", shell, flags=re.MULTILINE)
    key = re.search(r"\$\(aiwfe (api-key create [^)]*)\)", shell)
    assert account and key, shell
    made = await _cli(*account.group(1).split(), cwd=cwd, env=env)
    _, err = await asyncio.wait_for(made.communicate(), 60)
    assert made.returncode == 0, err.decode()
    issued = await _cli(*key.group(1).split(), cwd=cwd, env=env)
    out, err = await asyncio.wait_for(issued.communicate(), 60)
    assert issued.returncode == 0, err.decode()
    return out.decode().strip()


async def test_the_readme_worker_example_runs(ws: WorkerSuite, tmp_path: Path) -> None:
    """The README's mytasks.py served by `aiwfe worker run mytasks --queue default`, its
    pipeline.yaml submitted with `aiwfe workflow submit --watch`: the workflow succeeds
    with the summary of the first step's words, and the example stays within 20 lines."""
    (python,) = _blocks("python")
    (yaml_text,) = _blocks("yaml")
    (shell,) = _blocks("sh")
    assert len((python + yaml_text + shell).strip().splitlines()) <= 20 + 2  # + file names
    (tmp_path / "mytasks.py").write_text(python)
    (tmp_path / "pipeline.yaml").write_text(yaml_text)
    assert "aiwfe worker run mytasks --queue default" in shell
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AIWFE_GATEWAY": ws.gateway,
        "AIWFE_CREDENTIALS": str(tmp_path / "credentials.json"),
    }
    login = await _cli("login", "-u", "admin", "--password-stdin", cwd=tmp_path, env=env)
    await asyncio.wait_for(login.communicate(ADMIN_PASSWORD.encode()), 60)
    assert login.returncode == 0
    env["AIWFE_API_KEY"] = await _api_key(shell, tmp_path, env) or ws.worker_key
    worker = await _cli("worker", "run", "mytasks", "--queue", "default", cwd=tmp_path, env=env)
    try:
        submit = await _cli(
            "workflow", "submit", "pipeline.yaml", "--watch", "--json", cwd=tmp_path, env=env
        )
        out, err = await asyncio.wait_for(submit.communicate(), 60)
        assert submit.returncode == 0, err.decode()
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)
    workflow_id = json.loads(out.decode().splitlines()[0])["workflow_id"]
    done = await get(ws.channel, ws.admin, workflow_id)
    assert json_format.MessageToDict(step_status(done, "summarize").output) == {
        "summary": "the quick brown fox"
    }
    assert worker.returncode == 0
