"""`aiwfe collections ls|share|unshare|rm` as a user runs them against a running suite."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from aiwfe.app.suite import Suite
from tests.cli.test_cli import aiwfe, assert_one_error_line, cli_env, login_as
from tests.conftest import ADMIN_PASSWORD

__all__ = ["cli_env"]  # the fixture, shared with test_cli.py
USER_PASSWORD = "dave-password-1234"


async def test_collections_ls_share_unshare_rm(suite: Suite, cli_env, tmp_path: Path) -> None:
    """The admin's collection appears in a user's `collections ls` (and searches) only while
    shared with it, by user or by role; `share` needs --user or --role; `rm` deletes it."""
    gw = suite.address("gateway")
    user = f"dave{uuid.uuid4().hex[:8]}"
    name = f"cli-private-{uuid.uuid4().hex[:8]}"
    await login_as(cli_env, gw, "admin", ADMIN_PASSWORD)
    (tmp_path / "plan.txt").write_text("The launch plan: the rocket ships on Friday.")
    made = await aiwfe(
        cli_env, "users", "create", user, "--role", "user", "--password-stdin", "--gateway", gw,
        stdin=USER_PASSWORD + "\n",
    )  # fmt: skip
    assert made.code == 0, made
    indexed = await aiwfe(
        cli_env, "index", str(tmp_path / "plan.txt"), "--collection", name, "--gateway", gw
    )
    assert indexed.code == 0, indexed
    user_env = {**cli_env, "AIWFE_CREDENTIALS": str(tmp_path / "user" / "credentials.json")}
    await login_as(user_env, gw, user, USER_PASSWORD)

    async def user_sees() -> list[dict]:
        result = await aiwfe(user_env, "collections", "ls", "--json", "--gateway", gw)
        assert result.code == 0, result
        return [c for c in json.loads(result.out).get("collections", []) if c["name"] == name]

    search = ("search", "rocket launch", "--collection", name, "--gateway", gw)
    assert await user_sees() == []
    assert_one_error_line(await aiwfe(user_env, *search), "NOT_FOUND")

    shared = await aiwfe(cli_env, "collections", "share", name, "--user", user, "--gateway", gw)
    assert shared.code == 0, shared
    assert f"shared with: user {user}" in shared.out
    [seen] = await user_sees()
    assert (seen["owner"], seen.get("writable", False)) == ("admin", False)
    assert (await aiwfe(user_env, *search)).code == 0

    unshared = await aiwfe(cli_env, "collections", "unshare", name, "--user", user, "--gateway", gw)
    assert unshared.code == 0 and "shared with" not in unshared.out, unshared
    assert await user_sees() == []
    assert_one_error_line(await aiwfe(user_env, *search), "NOT_FOUND")

    by_role = await aiwfe(
        cli_env, "collections", "share", name, "--role", "user", "--write", "--gateway", gw
    )
    assert "shared with: role user (write)" in by_role.out, by_role
    # Write access, but the seed's `user` role lacks cognitive:index: still read-only.
    assert [(c["owner"], c.get("writable", False)) for c in await user_sees()] == [("admin", False)]

    both = await aiwfe(cli_env, "collections", "share", name, "--gateway", gw)
    assert both.code == 2 and "--user" in both.err, both
    removed = await aiwfe(cli_env, "collections", "rm", name, "--gateway", gw)
    assert removed.code == 0, removed
    assert await user_sees() == []
    assert_one_error_line(await aiwfe(cli_env, *search), "NOT_FOUND")
