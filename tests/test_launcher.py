"""The launcher's restart policy with a real child process that dies on cue: backoff that
doubles up to its cap, resets after a long enough life, and a crash loop that ends it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from aiwfe.app.launcher import Supervisor
from aiwfe.runtime.config import LauncherSettings

# Prints its readiness line, lives for the uptime its start number is given, then fails.
_CHILD = """
import os, sys, time
from pathlib import Path
count = Path(os.environ["FLAKY_COUNT"])
n = int(count.read_text() or 0) + 1 if count.exists() else 1
count.write_text(str(n))
print("flaky_child: ready", flush=True)
uptimes = [float(u) for u in os.environ["FLAKY_UPTIMES"].split(",")]
time.sleep(uptimes[n - 1] if n <= len(uptimes) else 0)
print(f"boom {n}", file=sys.stderr, flush=True)
sys.exit(3)
"""


def _flaky_child(tmp_path: Path, uptimes: str) -> dict[str, str]:
    """Writes the `flaky_child` module; returns the environment that runs it with `uptimes`
    (seconds, per start) and counts its starts in tmp_path/count."""
    (tmp_path / "flaky_child.py").write_text(_CHILD)
    return {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "FLAKY_COUNT": str(tmp_path / "count"),
        "FLAKY_UPTIMES": uptimes,
    }


async def test_backoff_doubles_to_its_cap_resets_after_a_long_life_then_crash_loop(
    tmp_path: Path, capsys
) -> None:
    """Restart delays go 0.05, 0.1 s, back to 0.05 s after a life longer than the reset
    time, then 0.1, 0.2 and 0.2 s (the cap); the 7th death (6 restarts in the window) is a
    crash loop whose message names the child, its exit and its last stderr lines."""
    env = _flaky_child(tmp_path, "0,0,1.0,0,0,0,0")  # the 3rd start outlives the reset time
    settings = LauncherSettings(
        restart_backoff=0.05,
        restart_backoff_max=0.2,
        backoff_reset_after=0.6,
        crash_loop_restarts=6,
        crash_loop_window=60,
        stderr_lines=2,
    )
    stop = asyncio.Event()
    supervisor = Supervisor(settings, env, stop)
    assert await supervisor.start("flaky_child")
    message = await asyncio.wait_for(supervisor.watch(supervisor.children[0]), 60)
    out = capsys.readouterr().out
    delays = [line.rsplit(" in ", 1)[1] for line in out.splitlines() if "restart attempt" in line]
    assert delays == ["0.05 s", "0.1 s", "0.05 s", "0.1 s", "0.2 s", "0.2 s"], out
    assert (tmp_path / "count").read_text() == "7"
    assert message is not None and message.startswith("aiwfe: flaky_child is crash-looping")
    assert "exit code 3 after 6 restarts within 60 s" in message, message
    assert message.endswith("    boom 6\n    boom 7"), message  # the last 2 stderr lines


async def test_stopping_during_a_backoff_restarts_nothing(tmp_path: Path, capsys) -> None:
    """A stop (Ctrl-C/SIGTERM) that comes while a dead child waits out its backoff ends
    the wait at once, and the child is not started again."""
    env = _flaky_child(tmp_path, "0")
    stop = asyncio.Event()
    supervisor = Supervisor(LauncherSettings(restart_backoff=2.0), env, stop)
    assert await supervisor.start("flaky_child")
    watcher = asyncio.create_task(supervisor.watch(supervisor.children[0]))
    proc = supervisor.children[0].proc
    assert proc is not None and await asyncio.wait_for(proc.wait(), 10) == 3
    await asyncio.sleep(0.2)  # the watcher is now inside its 2 s backoff
    assert "restart attempt 1 in 2 s" in capsys.readouterr().out
    stopped = time.monotonic()
    stop.set()
    assert await asyncio.wait_for(watcher, 10) is None
    assert time.monotonic() - stopped < 1
    await asyncio.sleep(2.5)  # past the backoff: still no second start
    assert (tmp_path / "count").read_text() == "1"
    assert supervisor.children[0].proc is proc
