"""Smoke test of the performance harness: it starts, measures and cleans up (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quick_direct_and_gateway_run(tmp_path: Path) -> None:
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
        ],
        cwd=REPO_ROOT,
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
