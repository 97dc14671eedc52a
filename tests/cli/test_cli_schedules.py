"""`aiwfe schedule ...` as a user runs it: a subprocess against a running suite."""

from __future__ import annotations

import json

from aiwfe.app.suite import Suite
from tests.cli.test_cli import aiwfe, assert_one_error_line, cli_env, login_as
from tests.conftest import ADMIN_PASSWORD

__all__ = ["cli_env"]  # the fixture, shared with test_cli.py


async def test_schedule_create_ls_pause_resume_trigger_delete(
    suite: Suite, cli_env, tmp_path
) -> None:
    """schedule create reads the spec file and the policies, ls lists it, pause/resume
    flip it, trigger submits its workflow now, delete removes it; a bad zone is one
    INVALID_ARGUMENT line."""
    gw = ["--gateway", suite.address("gateway")]
    await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: nightly\nsteps:\n  - name: first\n    op: noop\n")
    made = await aiwfe(
        cli_env,
        "schedule", "create", "nightly", "--cron", "0 3 * * *", "--tz", "Europe/Paris",
        "--file", str(spec), "--overlap", "buffer-one", "--catch-up", "latest", "--json", *gw,
    )  # fmt: skip
    assert made.code == 0, made
    created = json.loads(made.out)
    sid = created["schedule_id"]
    assert created["time_zone"] == "Europe/Paris" and created["cron"] == "0 3 * * *"
    assert created["overlap_policy"] == "OVERLAP_POLICY_BUFFER_ONE"
    assert created["catch_up_policy"] == "CATCH_UP_POLICY_LATEST"
    assert created["spec"]["steps"][0]["name"] == "first"
    listed = await aiwfe(cli_env, "schedule", "ls", *gw)
    assert sid in listed.out and "active" in listed.out, listed
    paused = await aiwfe(cli_env, "schedule", "pause", sid, *gw)
    assert paused.code == 0 and "paused" in paused.out, paused
    resumed = await aiwfe(cli_env, "schedule", "resume", sid, "--json", *gw)
    assert "paused" not in json.loads(resumed.out), resumed
    triggered = await aiwfe(cli_env, "schedule", "trigger", sid, "--json", *gw)
    assert triggered.code == 0, triggered
    reply = json.loads(triggered.out)
    assert reply["schedule"]["last_workflow_id"] == reply["workflow"]["workflow_id"]
    deleted = await aiwfe(cli_env, "schedule", "delete", sid, *gw)
    assert deleted.code == 0 and sid in deleted.out, deleted
    assert_one_error_line(await aiwfe(cli_env, "schedule", "get", sid, *gw), "NOT_FOUND")
    bad = await aiwfe(
        cli_env, "schedule", "create", "x", "--cron", "* * * * *", "--tz", "Nowhere/Land",
        "--file", str(spec), *gw,
    )  # fmt: skip
    assert_one_error_line(bad, "INVALID_ARGUMENT")
    assert "time_zone" in bad.err
