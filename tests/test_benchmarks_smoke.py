"""Smoke test of the performance harness: it starts, measures and cleans up (no timing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Servers

REPO_ROOT = Path(__file__).resolve().parents[1]


def bench_env(servers: Servers) -> dict[str, str]:
    """The environment with this run's Redis for the benchmark servers (they default to
    127.0.0.1:6379; the run's PostgreSQL goes in --admin-dsn)."""
    env = dict(os.environ)
    if servers.redis_url is not None:
        env["AIWFE_BENCH_REDIS_URL"] = servers.redis_url
    return env


@pytest.mark.timeout(300)  # a whole benchmark run; CI runs two suites side by side
def test_quick_direct_and_gateway_run(tmp_path: Path, servers: Servers) -> None:
    """`python -m benchmarks --quick` measures direct and gateway Embed calls without errors."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--scenario",
            "direct",
            "--scenario",
            "gateway",
            "--json",
            str(out),
            "--admin-dsn",
            servers.admin_dsn,
        ],
        cwd=REPO_ROOT,
        env=bench_env(servers),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ratios to direct" in done.stdout
    doc = json.loads(out.read_text())
    for name in ("direct", "gateway"):
        scenario = doc["scenarios"][name]
        assert scenario["requests"] > 0, scenario
        assert scenario["p50_ms"] > 0, scenario
        assert scenario["errors"] == 0, scenario
    rss = doc["server"]["idle_rss_mb"]
    assert set(rss) >= {"gateway", "cognitive", "taskproc", "dataplatform"}
    assert all(mb > 0 for mb in rss.values())
    assert "gateway" in doc["ratios"]


@pytest.mark.timeout(300)  # a whole benchmark run; CI runs two suites side by side
def test_workflow_benchmark_runs_every_phase(servers: Servers) -> None:
    """`python -m benchmarks.workflows` with tiny counts runs the queue, both end-to-end
    paths, the latency phases, the external-worker phases (an SDK worker process), timer
    lateness and fan-out vs separate workflows, and accounts CPU to every service and the
    worker."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.workflows",
            "--jobs",
            "40",
            "--e2e",
            "20",
            "--latency",
            "3",
            "--tasks",
            "8",
            "--dispatch",
            "3",
            "--timers",
            "5",
            "--fan-out",
            "20",
            "--fan-out-rounds",
            "1",
            "--admin-dsn",
            servers.admin_dsn,
        ],
        cwd=REPO_ROOT,
        env=bench_env(servers),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["store-queue"]["jobs"] == 40 and doc["store-queue"]["jobs_per_s"] > 0
    for phase in ("e2e", "e2e_run"):
        e2e = doc[phase]
        assert e2e["workflows"] == 20 and e2e["workflows_per_s"] > 0, e2e
        cpu = e2e["cpu_ms_per_workflow"]
        # /proc counts CPU in 10 ms ticks: 20 workflows can cost the gateway's relay less.
        assert all(cpu[name] > 0 for name in ("taskproc", "dataplatform")), cpu
        assert cpu["gateway"] >= 0, cpu
        assert e2e["pg_transactions_per_workflow"] > 0, e2e
    for phase in ("latency_idle_ms", "latency_idle_run_ms"):
        assert doc[phase]["n"] == 3 and doc[phase]["p50"] > 0, doc[phase]
    external = doc["external"]
    assert external["dispatch_ms"]["p50"] > 0, external
    # Dispatch is timed from the insert's commit, marked by the store, hop by hop; a sample
    # no poller waited for (not eagerly dispatched) is left out and counted.
    dispatched = external["dispatch_ms"]["n"]
    assert dispatched >= 1 and dispatched + external["dispatch_not_eager"] == 3, external
    hops = external["dispatch_hops_ms"]
    assert list(hops) == ["committed", "leased_to_taskproc", "poll_answered", "received"]
    assert all(h["n"] == dispatched and h["p50"] > 0 for h in hops.values()), hops
    # Ready -> claimed is 0 when the step is leased in the transaction that made it ready
    # (eager dispatch); never negative.
    for phase in ("task_claim_ms", "noop_claim_ms"):
        assert external[phase]["n"] == 3 and external[phase]["p50"] >= 0, external
    for half in ("noop", "task"):
        assert external[half]["workflows"] == 8 and external[half]["workflows_per_s"] > 0
    assert "worker" in external["task"]["cpu_ms_per_workflow"], external
    assert external["task_vs_noop"] > 0, external
    for load in ("idle", "busy"):
        timers = doc["timers"][load]
        assert timers["timers"] == 5 and timers["late_max_ms"] >= timers["late_p50_ms"], timers
    fan_out = doc["fanout"]
    assert fan_out["items"] == 20 and fan_out["fan_out_vs_separate"] > 0, fan_out


@pytest.mark.timeout(300)
def test_processes_benchmark_runs_both_groups(tmp_path: Path, servers: Servers) -> None:
    """`python -m benchmarks.processes` for one short round: 1 and 2 gateway processes on
    one port each answer every call OK, unpinned and pinned, both of the 2 answer some (16
    connections: all on one process is a 1 in 2**15 chance), CPU is accounted."""
    if shutil.which("h2load") is None:
        pytest.skip("h2load not installed (nghttp2-client)")
    out = tmp_path / "processes.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.processes", "--rounds", "1", "--seconds", "1",
            "--connections", "16", "--streams", "4", "--json", str(out),
            "--admin-dsn", servers.admin_dsn,
        ],
        cwd=REPO_ROOT, env=bench_env(servers), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["anchors"]["bare_skip_locked_jobs_per_s"] > 0
    assert set(doc["placements"]) == {"unpinned", "pinned"}
    for placement in doc["placements"].values():
        for n, runs in placement["runs"].items():
            (run,) = runs
            assert run["calls_not_ok"] == {}, run
            assert len(run["calls_ok_by_process"]) == int(n), run
            assert all(calls > 0 for calls in run["calls_ok_by_process"].values()), run
            assert all(p["user_us_per_call"] > 0 for p in run["process_stats"].values()), run
        assert placement["projected_ratio_on_idle_cores"] > 0


@pytest.mark.timeout(300)
def test_vector_search_keeps_a_collection_and_queries_it_again(tmp_path: Path) -> None:
    """`python -m benchmarks.vector_search --keep DIR` builds a collection with the product's
    settings and leaves it; `--reuse DIR` runs only the query phase on it (a fresh process),
    with the same exact answers, so both report the same recall."""
    kept = tmp_path / "kept"
    base = [sys.executable, "-m", "benchmarks.vector_search", "--dim", "32", "--warmup", "2"]
    runs = []
    for extra in (
        ["--vector-n", "3000", "--queries", "20", "--keep", str(kept)],
        ["--reuse", str(kept), "--ef", "16,64"],
    ):
        out = tmp_path / "result.json"
        done = subprocess.run(
            [*base, *extra, "--json", str(out)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append(json.loads(out.read_text()))
    built, reused = runs
    assert built["build"] == reused["build"]
    assert built["build"]["points"] == 3000
    assert built["settings"]["vectors_on_disk"] is True
    assert [q["hnsw_ef"] for q in reused["query"]] == [16, 64]
    assert all(q["queries"] == 20 and q["rss_mb"]["after"]["VmRSS"] > 0 for q in reused["query"])
    assert reused["query"][1]["recall@10"] == built["query"][0]["recall@10"] >= 0.9
