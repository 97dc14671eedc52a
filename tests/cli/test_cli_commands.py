"""The CLI's shape: one handler per command from a table, connection options on either
side of the subcommand, groups that print their help, a password prompt before any heavy
import, and "not logged in" when no credentials are stored."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest

from aiwfe.app import cli
from aiwfe.app.suite import Suite
from tests.cli.test_cli import aiwfe, assert_one_error_line, cli_env, store_of, write_store

__all__ = ["cli_env"]  # the fixture, shared with test_cli.py


@pytest.mark.parametrize(
    "argv",
    [
        ["--gateway", "h:1", "--json", "--timeout", "7", "users", "ls"],
        ["users", "ls", "--gateway", "h:1", "--json", "--timeout", "7"],
        ["--gateway", "h:1", "users", "ls", "--json", "--timeout", "7"],
        ["users", "--json", "ls", "--gateway", "h:1", "--timeout", "7"],
    ],
)
def test_connection_options_before_or_after_the_subcommand(argv: list[str]) -> None:
    """--gateway, --json and --timeout mean the same wherever they stand (git, kubectl)."""
    args = cli.build_parser().parse_args(argv)
    assert (args.gateway, args.json, args.timeout) == ("h:1", True, 7.0)
    assert args.handler is cli._users_ls


def test_an_option_given_twice_keeps_the_later() -> None:
    """The subcommand's copy of an option does not reset one given before it."""
    args = cli.build_parser().parse_args(["--gateway", "a:1", "whoami", "--gateway", "b:2"])
    assert args.gateway == "b:2"
    args = cli.build_parser().parse_args(["--gateway", "a:1", "whoami"])
    assert args.gateway == "a:1"


def test_every_command_has_its_own_handler() -> None:
    """The table maps each command to one handler; no two commands share one."""
    handlers = [c.handler for c in cli.COMMANDS]
    assert len(handlers) == len(set(handlers))
    assert {" ".join(c.words) for c in cli.COMMANDS} >= {
        "up", "serve", "health", "login", "logout", "whoami", "embed", "index", "search",
        "classify", "generate", "collections ls", "collections share", "collections rm",
        "workflow submit", "workflow watch", "users create", "users ls", "breakers", "bench",
    }  # fmt: skip


def test_adding_a_command_is_one_decorated_function(capsys: pytest.CaptureFixture[str]) -> None:
    """A new group and command (as `aiwfe models pull` is) need nothing but @command."""
    before = list(cli.COMMANDS)
    try:

        @cli.command(
            "datasets fetch",
            "fetch a data set",
            lambda p: p.add_argument("name"),
            api=False,
        )
        def pull(args: argparse.Namespace) -> int:
            print(f"pulled {args.name}")
            return 0

        with pytest.raises(SystemExit) as done:
            cli.main(["datasets", "fetch", "e5-small"])
        assert done.value.code == 0
        assert capsys.readouterr().out == "pulled e5-small\n"
    finally:
        cli.COMMANDS[:] = before


@pytest.mark.parametrize(("group", "commands"), [
    ("users", ["create", "ls", "set-roles", "disable"]),
    ("workflow", ["submit", "ls", "get", "cancel", "retry", "watch"]),
    ("collections", ["ls", "share", "unshare", "rm"]),
])  # fmt: skip
def test_a_group_without_a_subcommand_prints_its_help(group: str, commands: list[str]) -> None:
    """`aiwfe users` shows the users commands and exits 0, instead of an argparse error."""
    result = subprocess.run(
        [sys.executable, "-m", "aiwfe", group], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"usage: aiwfe {group}")
    for name in commands:
        assert name in result.stdout


_PROMPT_PROBE = textwrap.dedent(
    """
    import getpass, io, sys

    class Tty(io.StringIO):
        def isatty(self):
            return True

    def prompt(text):
        heavy = sorted(m for m in ("grpc", "pydantic", "aiwfe.sdk.client", "aiwfe.runtime.config")
                       if m in sys.modules)
        print("PROMPT", text, "loaded:", ",".join(heavy) or "-", file=sys.stderr)
        raise KeyboardInterrupt  # stop here: only the prompt's moment matters

    sys.stdin = Tty()
    getpass.getpass = prompt
    from aiwfe.app.cli import main
    main(sys.argv[1:])
    """
)


@pytest.mark.parametrize(
    "argv", [["login", "-u", "ann"], ["users", "create", "bob"]], ids=["login", "users-create"]
)
def test_the_password_prompt_comes_before_any_heavy_import(
    argv: list[str], cli_env: dict[str, str]
) -> None:
    """The prompt is shown before gRPC, pydantic or the client are loaded (seconds on a
    busy machine), so it appears at once."""
    env = {k: v for k, v in cli_env.items() if k != "AIWFE_PASSWORD"}
    result = subprocess.run(
        [sys.executable, "-c", _PROMPT_PROBE, *argv, "--gateway", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 130, result
    assert "PROMPT password for" in result.stderr
    assert "loaded: -" in result.stderr, result.stderr


async def test_a_stale_token_gets_the_servers_answer_not_not_logged_in(
    suite: Suite,
    cli_env: dict[str, str],
) -> None:
    """With credentials stored (here a token the gateway rejects), the server's
    UNAUTHENTICATED line is shown: "not logged in" only when nothing is stored."""
    gateway = suite.address("gateway")
    store_of(cli_env).parent.mkdir(parents=True)
    write_store(cli_env, {gateway: {"access_token": "not-a-jwt", "expires_at": 4e9}})
    result = await aiwfe(cli_env, "whoami", "--gateway", gateway)
    assert_one_error_line(result, "UNAUTHENTICATED")
    assert "not logged in" not in result.err
