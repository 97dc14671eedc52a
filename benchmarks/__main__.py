"""`python -m benchmarks`: run named scenarios, print a table, write or print the JSON.

Examples:
    python -m benchmarks                                  # everything that applies
    python -m benchmarks --scenario direct --scenario gateway --json /tmp/bench.json
    python -m benchmarks --quick                          # ~0.5 s phases (the smoke test)
    python -m benchmarks --scenario vector-search --vector-n 100000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

# The harness starts processes while its gRPC channels are live; gRPC's fork handlers are
# of no use to a child that execs at once and can abort it. Set before grpc is imported;
# child processes inherit it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from benchmarks import harness, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="aiwfe performance harness: direct vs gateway vs nginx hops, embedder, "
        "vector search.",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=harness.ALL_SCENARIOS,
        help="scenario to run (repeatable; default: all that apply)",
    )
    parser.add_argument("--json", type=Path, help="write the JSON results to this file")
    parser.add_argument("--quick", action="store_true", help="very short runs (~0.5 s phases)")
    parser.add_argument("--seconds", type=float, help="measured seconds per phase (default 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per phase (default 0.5)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="calls in flight, throughput phase"
    )
    parser.add_argument(
        "--latency-concurrency", type=int, default=1, help="calls in flight, latency phase"
    )
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="request cap per phase")
    parser.add_argument(
        "--vector-n", type=int, help="points for vector-search (default 20000; 2000 with --quick)"
    )
    parser.add_argument(
        "--admin-dsn",
        default=harness.servers.DEFAULT_ADMIN_DSN,
        help="PostgreSQL DSN used to create and drop the benchmark database",
    )
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> tuple[harness.Options, list[str]]:
    """Options from the command line, plus notes about what was adjusted."""
    notes = []
    scenarios = list(dict.fromkeys(args.scenario or harness.ALL_SCENARIOS))
    hops = [s for s in scenarios if s in harness.RPC_SCENARIOS and s != "direct"]
    if hops and "direct" not in scenarios:
        # Ratios are only meaningful against a baseline measured in the same run.
        scenarios.insert(0, "direct")
        notes.append("added `direct`: the hop scenarios are reported as ratios to it")
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 0.5)
    vector_n = args.vector_n if args.vector_n is not None else (2_000 if args.quick else 20_000)
    opts = harness.Options(
        scenarios=tuple(scenarios),
        seconds=seconds,
        warmup_seconds=warmup,
        concurrency=args.concurrency,
        latency_concurrency=args.latency_concurrency,
        max_requests=args.max_requests,
        vector_n=vector_n,
        embedder_seconds=1.5 if args.quick else 3.0,
        admin_dsn=args.admin_dsn,
    )
    return opts, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts, notes = options(args)
    result = harness.run(opts)
    scenarios = result["scenarios"]
    doc = {
        "machine": report.machine(),
        "note": report.VARIANCE_NOTE,
        "options": {**dataclasses.asdict(opts), "admin_dsn": None},
        "server": result["server"],
        "scenarios": scenarios,
        "ratios": report.ratios(scenarios),
        "notes": notes + result["notes"],
    }
    print(report.render(doc))
    text = json.dumps(doc, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
        print(f"\nJSON written to {args.json}")
    else:
        print("\n" + text)
    failed = [
        name
        for name, s in scenarios.items()
        if isinstance(s, dict) and (s.get("failed") or s.get("errors"))
    ]
    if failed:
        print(f"\nfailed or had errors: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
