"""The `aiwfe` CLI as a user runs it: a subprocess against a running suite. Login stores
its tokens 0600, whoami/embed answer in human and JSON form, and every gRPC failure is one
line on stderr with exit code 1 (usage errors exit 2 before any connection)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from aiwfe.app.cli import load_workflow_spec
from aiwfe.app.suite import Suite
from tests.conftest import ADMIN_PASSWORD

ERROR_LINE = re.compile(r"^aiwfe: [A-Z_]+: .+$")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIWFE_CREDENTIALS": str(tmp_path / "cfg" / "credentials.json"),
        "AIWFE_PASSWORD": ADMIN_PASSWORD,
    }


def store_of(env: dict[str, str]) -> Path:
    return Path(env["AIWFE_CREDENTIALS"])


def read_store(env: dict[str, str]) -> dict:
    return json.loads(store_of(env).read_text())


def write_store(env: dict[str, str], data: dict) -> None:
    store_of(env).write_text(json.dumps(data))


def store_mode(env: dict[str, str]) -> int:
    return stat.S_IMODE(store_of(env).stat().st_mode)


async def aiwfe(env: dict[str, str], *args: str, stdin: str | None = None) -> Result:
    """Runs `python -m aiwfe ARGS` and returns its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiwfe",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), 60
    )
    return Result(proc.returncode or 0, out.decode(), err.decode())


def assert_one_error_line(result: Result, code: str | None = None) -> None:
    """Exit 1 and exactly one `aiwfe: CODE: details` line on stderr."""
    lines = result.err.strip().splitlines()
    assert result.code == 1, result
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), result.err
    if code:
        assert lines[0].startswith(f"aiwfe: {code}:"), lines[0]


async def test_login_whoami_embed_end_to_end(suite: Suite, cli_env) -> None:
    """login stores the tokens 0600; whoami and embed answer in human and --json form."""
    gw = ["--gateway", suite.address("gateway")]
    login = await aiwfe(cli_env, "login", *gw, "-u", "admin")
    assert login.code == 0, login
    assert "logged in" in login.out and "as admin" in login.out
    assert store_mode(cli_env) == 0o600
    stored = read_store(cli_env)[suite.address("gateway")]
    assert stored["access_token"] and stored["expires_at"] > 0

    who = await aiwfe(cli_env, "whoami", *gw)
    assert who.code == 0 and who.out.startswith("admin ("), who
    who_json = json.loads((await aiwfe(cli_env, "whoami", *gw, "--json")).out)
    assert who_json["username"] == "admin" and "admin" in who_json["roles"]

    embed = await aiwfe(cli_env, "embed", *gw, "--json", "hello", "world")
    assert embed.code == 0, embed
    reply = json.loads(embed.out)
    assert reply["dimension"] == 768 and len(reply["embeddings"]) == 2
    assert len(reply["embeddings"][0]["values"]) == 768
    human = await aiwfe(cli_env, "embed", *gw, "hello")
    assert human.out.startswith("1 embeddings, dimension 768"), human


async def test_password_from_stdin_and_wrong_password(suite: Suite, cli_env) -> None:
    """--password-stdin logs in; a wrong password is one UNAUTHENTICATED line, exit 1,
    and no token is stored."""
    gw = ["--gateway", suite.address("gateway")]
    env = {k: v for k, v in cli_env.items() if k != "AIWFE_PASSWORD"}
    ok = await aiwfe(env, "login", *gw, "--password-stdin", "--json", stdin=ADMIN_PASSWORD + "\n")
    assert ok.code == 0 and json.loads(ok.out)["access_token"], ok
    write_store(env, {})
    bad = await aiwfe(env, "login", *gw, "--password-stdin", stdin="wrong-password-123\n")
    assert_one_error_line(bad, "UNAUTHENTICATED")
    assert read_store(env) == {}


async def test_health_command(suite: Suite, cli_env) -> None:
    """`aiwfe health ADDR` prints SERVING and exits 0; an unreachable address exits 1."""
    ok = await aiwfe(cli_env, "health", suite.address("cognitive"))
    assert (ok.code, ok.out.strip()) == (0, "SERVING")
    down = await aiwfe(cli_env, "health", "127.0.0.1:1", "--timeout", "1")
    assert down.code == 1 and len(down.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["whoami"],
        ["embed", "x"],
        ["search", "q", "--collection", "c"],
        ["classify", "t", "-l", "a", "-l", "b"],
        ["generate", "hi"],
        ["workflow", "ls"],
        ["workflow", "get", "wf-1"],
        ["workflow", "cancel", "wf-1"],
        ["workflow", "retry", "wf-1"],
        ["users", "ls"],
        ["breakers"],
    ],
)
async def test_without_login_every_command_is_one_unauthenticated_line(
    suite: Suite, cli_env, args
) -> None:
    """Each API command without a stored token fails with one UNAUTHENTICATED line, exit 1."""
    gateway = suite.address("gateway")
    result = await aiwfe(cli_env, *args, "--gateway", gateway)
    assert_one_error_line(result, "UNAUTHENTICATED")
    assert f"not logged in to {gateway} \N{EM DASH} run `aiwfe login`" in result.err


async def login_as(env: dict[str, str], gateway: str, user: str, password: str) -> None:
    result = await aiwfe(
        env, "login", "--gateway", gateway, "-u", user, "--password-stdin", stdin=password + "\n"
    )
    assert result.code == 0, result


async def test_users_admin_end_to_end(suite: Suite, cli_env, tmp_path) -> None:
    """users create/ls/set-roles/disable work for the admin; a plain user gets one
    PERMISSION_DENIED line; a disabled user can no longer log in."""
    gw = suite.address("gateway")
    await login_as(cli_env, gw, "admin", ADMIN_PASSWORD)
    made = await aiwfe(
        cli_env,
        "users",
        "create",
        "carol.cli",
        "--role",
        "user",
        "--password-stdin",
        "--json",
        "--gateway",
        gw,
        stdin="carol-password-123\n",
    )
    assert made.code == 0, made
    assert json.loads(made.out)["user"]["roles"] == ["user"]
    listed = json.loads((await aiwfe(cli_env, "users", "ls", "--json", "--gateway", gw)).out)
    assert "carol.cli" in {u["username"] for u in listed["users"]}

    carol = {**cli_env, "AIWFE_CREDENTIALS": str(tmp_path / "carol.json")}
    await login_as(carol, gw, "carol.cli", "carol-password-123")
    assert_one_error_line(await aiwfe(carol, "users", "ls", "--gateway", gw), "PERMISSION_DENIED")

    roles = await aiwfe(cli_env, "users", "set-roles", "carol.cli", "readonly", "--gateway", gw)
    assert roles.code == 0 and "readonly" in roles.out, roles
    off = await aiwfe(cli_env, "users", "disable", "carol.cli", "--json", "--gateway", gw)
    assert json.loads(off.out)["user"]["disabled"] is True
    again = await aiwfe(
        carol,
        "login",
        "--gateway",
        gw,
        "-u",
        "carol.cli",
        "--password-stdin",
        stdin="carol-password-123\n",
    )
    assert_one_error_line(again, "UNAUTHENTICATED")


async def test_index_search_classify_end_to_end(suite: Suite, cli_env, tmp_path) -> None:
    """index reads files into a collection, search finds the matching one first, classify
    ranks the fitting label first."""
    gw = ["--gateway", suite.address("gateway")]
    await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
    (tmp_path / "pg.txt").write_text("PostgreSQL is a relational database with SQL queries.")
    (tmp_path / "bread.txt").write_text("Knead the dough, let it rise, then bake the bread.")
    indexed = await aiwfe(
        cli_env,
        "index",
        str(tmp_path / "pg.txt"),
        str(tmp_path / "bread.txt"),
        "--collection",
        "cli-docs",
        "--meta",
        "source=cli",
        "--json",
        *gw,
    )
    assert indexed.code == 0, indexed
    assert json.loads(indexed.out)["document_count"] == 2
    found = await aiwfe(
        cli_env,
        "search",
        "relational database SQL",
        "--collection",
        "cli-docs",
        "--top-k",
        "2",
        "--filter",
        "source=cli",
        "--json",
        *gw,
    )
    assert found.code == 0, found
    hits = json.loads(found.out)["hits"]
    assert hits[0]["document_id"] == "pg.txt"
    human = await aiwfe(cli_env, "search", "bake bread", "--collection", "cli-docs", *gw)
    assert human.out.splitlines()[0].split()[1] == "bread.txt", human.out
    ranked = await aiwfe(
        cli_env,
        "classify",
        "a relational database",
        "-l",
        "relational database",
        "-l",
        "baking bread",
        "--json",
        *gw,
    )
    assert json.loads(ranked.out)["labels"][0]["label"] == "relational database"


async def test_workflow_submit_watch_get_ls_cancel(suite: Suite, cli_env, tmp_path) -> None:
    """workflow submit --watch prints each step's progress and exits 0 on success; get and
    ls show it; cancelling an unknown id is one NOT_FOUND line."""
    gw = ["--gateway", suite.address("gateway")]
    await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
    spec = tmp_path / "wf.yaml"
    spec.write_text(
        "name: cli-demo\nsteps:\n  - name: first\n    op: noop\n"
        "  - name: second\n    op: noop\n    depends_on: [first]\n"
    )
    run = await aiwfe(cli_env, "workflow", "submit", str(spec), "--watch", *gw)
    assert run.code == 0, run
    assert "step first: SUCCEEDED" in run.out and "step second: SUCCEEDED" in run.out
    assert run.out.rstrip().splitlines()[-1].endswith("workflow: SUCCEEDED") or (
        "workflow: SUCCEEDED" in run.out
    )
    workflow_id = run.out.split()[0]
    got = json.loads((await aiwfe(cli_env, "workflow", "get", workflow_id, "--json", *gw)).out)
    assert got["state"] == "WORKFLOW_STATE_SUCCEEDED"
    assert [s["name"] for s in got["steps"]] == ["first", "second"]
    listed = await aiwfe(cli_env, "workflow", "ls", "--state", "succeeded", *gw)
    assert workflow_id in listed.out, listed
    missing = await aiwfe(
        cli_env, "workflow", "cancel", "00000000-0000-0000-0000-000000000000", *gw
    )
    assert_one_error_line(missing, "NOT_FOUND")


async def test_workflow_ls_filters_and_retry(suite: Suite, cli_env, tmp_path) -> None:
    """workflow ls --name/--since/--until/--state keep only matching workflows; workflow
    retry re-runs a failed one (RUNNING, then SUCCEEDED once its flaky step passes) and
    retrying it again is one FAILED_PRECONDITION line."""
    gw = ["--gateway", suite.address("gateway")]
    await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
    name = f"cli-retry-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "wf.yaml"
    spec.write_text(
        f"name: {name}\nsteps:\n  - name: flaky\n    op: noop\n    inputs: {{fail_times: 1}}\n"
        "    retry_policy: {max_attempts: 1}\n"
    )
    run = await aiwfe(cli_env, "workflow", "submit", str(spec), "--watch", *gw)
    assert run.code != 0 and "workflow: FAILED" in run.out, run
    workflow_id = run.out.split()[0]
    listed = await aiwfe(cli_env, "workflow", "ls", "--name", name, "--since", "10m", *gw)
    assert listed.code == 0 and listed.out.split()[0] == workflow_id, listed
    for args in (["--name", name + "x"], ["--name", name, "--until", "10m"]):
        empty = await aiwfe(cli_env, "workflow", "ls", *args, *gw)
        assert empty.out.strip() == "no workflows", (args, empty)
    retried = await aiwfe(cli_env, "workflow", "retry", workflow_id, "--json", *gw)
    assert retried.code == 0 and json.loads(retried.out)["state"] == "WORKFLOW_STATE_RUNNING"
    watched = await aiwfe(cli_env, "workflow", "watch", workflow_id, *gw)
    assert watched.code == 0 and "workflow: SUCCEEDED" in watched.out, watched
    state = ["--state", "succeeded", "--name", name]
    assert workflow_id in (await aiwfe(cli_env, "workflow", "ls", *state, *gw)).out
    assert_one_error_line(
        await aiwfe(cli_env, "workflow", "retry", workflow_id, *gw), "FAILED_PRECONDITION"
    )


async def test_generate_streams_from_the_configured_llm(base_overrides, cli_env) -> None:
    """generate prints the completion as the LLM streams it (a local server speaking
    Ollama's wire format); --json prints one message per line, the last one done."""
    import copy

    from aiwfe.app.suite import start_suite
    from tests.cognitive.fake_llm import FakeLLMServer, ollama_routes

    fake = await FakeLLMServer(ollama_routes()).start()
    overrides = copy.deepcopy(base_overrides)
    overrides["cognitive"] = {
        "generation": {
            "backends": {"chat": {"kind": "ollama", "url": fake.url, "model": "llama3.2"}}
        }
    }
    suite = await start_suite(overrides)
    try:
        gw = ["--gateway", suite.address("gateway")]
        await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
        text = await aiwfe(cli_env, "generate", "say hello", *gw)
        assert (text.code, text.out) == (0, "Hello world\n"), text
        lines = (await aiwfe(cli_env, "generate", "say hello", "--json", *gw)).out.splitlines()
        pieces = [json.loads(line) for line in lines]
        assert "".join(p.get("text", "") for p in pieces) == "Hello world"
        assert pieces[-1]["done"] is True
    finally:
        await suite.stop()
        await fake.stop()


async def test_generate_without_llm_is_one_line(suite: Suite, cli_env) -> None:
    """With no LLM configured, generate fails with one FAILED_PRECONDITION line."""
    gw = ["--gateway", suite.address("gateway")]
    await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
    assert_one_error_line(await aiwfe(cli_env, "generate", "hi", *gw), "FAILED_PRECONDITION")


async def test_expiring_token_is_refreshed_and_stored(suite: Suite, cli_env) -> None:
    """A stored access token about to expire is refreshed before the call; the rotated
    pair replaces it in the 0600 credentials file."""
    gw = suite.address("gateway")
    await login_as(cli_env, gw, "admin", ADMIN_PASSWORD)
    data = read_store(cli_env)
    before = data[gw]
    assert before["refresh_token"], "Login returns a refresh token"
    before["expires_at"] = 1.0  # long past: the CLI must refresh before calling
    write_store(cli_env, data)
    who = await aiwfe(cli_env, "whoami", "--gateway", gw)
    assert who.code == 0, who
    after = read_store(cli_env)[gw]
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]
    assert after["expires_at"] > 1.0
    assert store_mode(cli_env) == 0o600


async def test_logout_forgets_the_tokens(suite: Suite, cli_env) -> None:
    """logout revokes the session and removes the stored tokens; whoami then fails."""
    gw = suite.address("gateway")
    await login_as(cli_env, gw, "admin", ADMIN_PASSWORD)
    out = await aiwfe(cli_env, "logout", "--gateway", gw)
    assert out.code == 0, out
    assert gw not in read_store(cli_env)
    assert_one_error_line(await aiwfe(cli_env, "whoami", "--gateway", gw), "UNAUTHENTICATED")


async def test_invalid_argument_is_one_line(suite: Suite, cli_env) -> None:
    """A request the server rejects (an empty text) is one INVALID_ARGUMENT line naming
    the field."""
    gw = ["--gateway", suite.address("gateway")]
    assert (await aiwfe(cli_env, "login", *gw)).code == 0
    result = await aiwfe(cli_env, "embed", *gw, "")
    assert_one_error_line(result, "INVALID_ARGUMENT")
    assert "texts" in result.err


async def test_unreachable_gateway_is_one_unavailable_line(cli_env) -> None:
    """No gateway at the address: one UNAVAILABLE line, exit 1."""
    result = await aiwfe(cli_env, "whoami", "--gateway", "127.0.0.1:1", "--timeout", "2")
    assert_one_error_line(result, "UNAVAILABLE")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "text", "-l", "only-one"], "at least two --label"),
        (["search", "q", "--collection", "c", "--filter", "novalue"], "KEY=VALUE"),
        (["index", "/no/such/file.txt", "--collection", "c"], "No such file"),
        (["workflow", "submit", "/no/such/spec.yaml"], "No such file"),
        (["workflow", "ls", "--state", "SLEEPING"], "unknown --state"),
        (["workflow", "ls", "--since", "yesterday"], "--since expects"),
    ],
)
async def test_usage_errors_exit_2_without_connecting(cli_env, args, message) -> None:
    """Bad arguments or unreadable input exit 2 with one line, before any connection
    (the gateway address points nowhere)."""
    result = await aiwfe(cli_env, *args, "--gateway", "127.0.0.1:1")
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and message in lines[0], result


def test_workflow_spec_from_yaml_and_json(tmp_path) -> None:
    """A YAML or JSON file becomes a WorkflowSpec (snake_case or camelCase names); an
    unknown field is a usage error naming it."""
    from aiwfe.app.cli import UsageError

    y = tmp_path / "wf.yaml"
    y.write_text(
        "name: rag\ntimeout_seconds: 60\nsteps:\n"
        "  - name: embed\n    op: cognitive.embed\n    inputs: {texts: [a, b]}\n"
        "  - name: search\n    op: cognitive.search\n    dependsOn: [embed]\n"
        "    retry_policy: {max_attempts: 5}\n"
    )
    spec = load_workflow_spec(y)
    assert spec.name == "rag" and spec.timeout_seconds == 60
    assert [s.name for s in spec.steps] == ["embed", "search"]
    assert list(spec.steps[0].inputs["texts"]) == ["a", "b"]
    assert list(spec.steps[1].depends_on) == ["embed"]
    assert spec.steps[1].retry_policy.max_attempts == 5
    j = tmp_path / "wf.json"
    j.write_text(json.dumps({"name": "x", "steps": [{"name": "a", "op": "noop"}]}))
    assert load_workflow_spec(j).steps[0].op == "noop"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstepz: []\n")
    with pytest.raises(UsageError, match="stepz"):
        load_workflow_spec(bad)


async def test_bench_delegates_to_the_harness(cli_env) -> None:
    """`aiwfe bench ARGS` runs `python -m benchmarks ARGS` (here its --help)."""
    result = await aiwfe(cli_env, "bench", "--help")
    assert result.code == 0 and "python -m benchmarks" in result.out, result


async def test_breakers_lists_every_service(suite: Suite, cli_env) -> None:
    """`aiwfe breakers --json` shows the gateway's breakers towards its back ends."""
    gw = suite.address("gateway")
    await login_as(cli_env, gw, "admin", ADMIN_PASSWORD)
    result = await aiwfe(cli_env, "breakers", "--json", "--gateway", gw)
    assert result.code == 0, result
    reply = json.loads(result.out)
    assert {"cognitive", "dataplatform"} <= {b["downstream"] for b in reply["breakers"]}


async def test_workflow_signal_approves_a_waiting_workflow(suite: Suite, cli_env, tmp_path) -> None:
    """`aiwfe workflow signal ID NAME --data JSON` is kept for (or delivered to) the
    workflow's wait_for_signal step, whose output it becomes; a resend with the same
    --signal-id says duplicate; --data that is not an object is a usage error."""
    gw = ["--gateway", suite.address("gateway")]
    await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
    spec = tmp_path / "approve.yaml"
    spec.write_text(
        "name: approve\nsteps:\n  - name: review\n    op: wait_for_signal\n"
        "    inputs: {name: approval, timeout_seconds: 30}\n"
    )
    submitted = await aiwfe(cli_env, "workflow", "submit", str(spec), *gw)
    workflow_id = submitted.out.split()[0]
    bad = await aiwfe(cli_env, "workflow", "signal", workflow_id, "approval", "--data", "[1]", *gw)
    assert bad.code == 2 and "JSON object" in bad.err
    args = ["workflow", "signal", workflow_id, "approval", "--data", '{"ok": true}']
    sent = await aiwfe(cli_env, *args, "--signal-id", "s1", *gw)
    assert sent.code == 0 and sent.out.strip() in {
        "signal approval: delivered",
        "signal approval: kept",
    }, sent
    again = await aiwfe(cli_env, *args, "--signal-id", "s1", *gw)
    assert again.out.strip() == "signal approval: duplicate", again
    watched = await aiwfe(cli_env, "workflow", "watch", workflow_id, *gw)
    assert "workflow: SUCCEEDED" in watched.out, watched
    got = json.loads((await aiwfe(cli_env, "workflow", "get", workflow_id, "--json", *gw)).out)
    assert got["steps"][0]["output"] == {"ok": True}
