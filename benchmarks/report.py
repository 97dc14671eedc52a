"""Machine description, ratios against the `direct` baseline, and the printed table."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import grpc
from google.protobuf import __version__ as protobuf_version
from google.protobuf.internal import api_implementation

HOP_SCENARIOS = (
    "gateway", "gateway-cached", "gateway-noauth", "gateway-asyncio", "gateway-grpc",
    "python-proxy", "nginx", "before",
)  # fmt: skip
VARIANCE_NOTE = (
    "Absolute figures vary between machines; the ratios to `direct` measured in the same run "
    "are the result."
)


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf_version,
        "protobuf_implementation": api_implementation.Type(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _measured(scenarios: dict[str, Any], name: str) -> dict[str, Any] | None:
    s = scenarios.get(name)
    if not s or s.get("failed") or s.get("skipped") or not s.get("p50_ms"):
        return None
    return s


def _total_cpu(s: dict[str, Any]) -> float | None:
    """Server CPU plus the proxy's (nginx runs outside the server process)."""
    if s.get("server_cpu_us_per_request") is None:
        return None
    return s["server_cpu_us_per_request"] + (s.get("proxy_cpu_us_per_request") or 0.0)


def ratios(scenarios: dict[str, Any]) -> dict[str, Any]:
    """Each hop against `direct`, gateway overhead ÷ nginx overhead, auth on vs off."""
    out: dict[str, Any] = {}
    direct = _measured(scenarios, "direct")
    if direct is None:
        return out
    nginx = _measured(scenarios, "nginx")
    nginx_overhead = nginx["p50_ms"] - direct["p50_ms"] if nginx else None
    for name in HOP_SCENARIOS:
        s = _measured(scenarios, name)
        if s is None:
            continue
        overhead = s["p50_ms"] - direct["p50_ms"]
        entry: dict[str, Any] = {
            "p50_ratio": round(s["p50_ms"] / direct["p50_ms"], 3),
            "p99_ratio": round(s["p99_ms"] / direct["p99_ms"], 3),
            "throughput_ratio": round(s["rps"] / direct["rps"], 3) if direct["rps"] else None,
            "hop_overhead_p50_ms": round(overhead, 4),
        }
        cpu, direct_cpu = _total_cpu(s), _total_cpu(direct)
        if cpu is not None and direct_cpu is not None:
            entry["hop_cpu_us_per_request"] = round(cpu - direct_cpu, 1)
        if name != "nginx" and nginx_overhead:
            entry["overhead_vs_nginx_overhead"] = round(overhead / nginx_overhead, 2)
        out[name] = entry
    gateway, noauth = _measured(scenarios, "gateway"), _measured(scenarios, "gateway-noauth")
    if gateway and noauth:
        out["auth_on_vs_off_p50_pct"] = round(
            (gateway["p50_ms"] - noauth["p50_ms"]) / noauth["p50_ms"] * 100, 1
        )
    before = _measured(scenarios, "before")
    if gateway and before:
        # The seed's PerformanceValidator: (baseline p50 - optimised p50) / baseline p50.
        improvement = (before["p50_ms"] - gateway["p50_ms"]) / before["p50_ms"]
        out["seed_validator"] = {
            "baseline_p50_ms": before["p50_ms"],
            "optimized_p50_ms": gateway["p50_ms"],
            "improvement": round(improvement, 4),
            "target": 0.5,
            "passed": improvement >= 0.5,
        }
    return out


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def render(doc: dict[str, Any]) -> str:
    """The human-readable report."""
    m, opts, server = doc["machine"], doc["options"], doc["server"]
    scenarios, rat = doc["scenarios"], doc["ratios"]
    out = [
        f"aiwfe benchmarks — {m['date']}",
        f"machine: {m['cores']} cores, Python {m['python']}, grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']} ({m['protobuf_implementation']}), {m['platform']}",
        VARIANCE_NOTE,
    ]
    if server:
        rss = ", ".join(f"{k} {v:.0f} MB" for k, v in server["idle_rss_mb"].items())
        out.append(
            "servers: each service in a process of its own, as `aiwfe up` runs them, plus "
            "gateways with authentication off, on asyncio, and with the relay off; "
            f"idle RSS {rss}"
        )
        out.append(
            f"load: grpc.aio in the harness process, {opts['warmup_seconds']} s warm-up then "
            f"{opts['seconds']} s per phase: latency at {opts['latency_concurrency']} in flight, "
            f"throughput and CPU at {opts['concurrency']} in flight, then an open loop at half "
            f"that throughput (@½max); latency in {opts['latency_slice_seconds']} s slices "
            "alternating between the scenarios; one cached Embed text; the harness's garbage "
            "collector held off while it measures; proxy CPU is the hop's own process (nginx, "
            "the gateway), server CPU the rest of the suite"
        )
    rpc_rows = []
    unmeasured: list[str] = []  # skipped or failed scenarios, listed under the table
    c = opts["concurrency"]
    for name in ("direct", *HOP_SCENARIOS):
        s = scenarios.get(name)
        if s is None:
            continue
        if s.get("skipped") or s.get("failed"):
            reason = f"skipped: {s['skipped']}" if s.get("skipped") else f"FAILED: {s['failed']}"
            unmeasured.append(f"{name}: {reason}")
            continue
        thr = s["phases"]["throughput"]
        rpc_rows.append(
            [
                name,
                _f(s["p50_ms"]),
                _f(s["p95_ms"]),
                _f(s["p99_ms"]),
                _f(s["rps"], 0),
                _f(thr["p50_ms"], 2),
                _f(thr["p99_ms"], 2),
                _f((s["phases"].get("half_load") or {}).get("p50_ms"), 2),
                _f((s["phases"].get("half_load") or {}).get("p99_ms"), 2),
                _f(s["server_cpu_us_per_request"], 0),
                _f(s.get("proxy_cpu_us_per_request"), 0),
                _f(s["client_cpu_us_per_request"], 0),
                str(s["errors"]),
            ]
        )
    if rpc_rows:
        out += [
            "",
            _table(
                [
                    "scenario",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "rps",
                    f"p50@{c} ms",
                    f"p99@{c} ms",
                    "p50@½max ms",
                    "p99@½max ms",
                    "server CPU µs/req",
                    "proxy CPU µs/req",
                    "client CPU µs/req",
                    "errors",
                ],
                rpc_rows,
            ),
        ]
    out += unmeasured
    hop_rows = [
        [
            name,
            _f(r["p50_ratio"], 2) + "x",
            _f(r["throughput_ratio"], 2) + "x",
            _f(r["hop_overhead_p50_ms"]),
            _f(r.get("hop_cpu_us_per_request"), 0),
            _f(r.get("overhead_vs_nginx_overhead"), 2),
        ]
        for name, r in rat.items()
        if isinstance(r, dict) and "p50_ratio" in r
    ]
    if hop_rows:
        out += [
            "",
            "ratios to direct (same run):",
            _table(
                [
                    "scenario",
                    "p50 ratio",
                    "rps ratio",
                    "hop p50 overhead ms",
                    "hop CPU µs/req",
                    "overhead ÷ nginx overhead",
                ],
                hop_rows,
            ),
        ]
    elif rpc_rows:
        out += ["", "ratios: need `direct` measured in the same run"]
    if "seed_validator" in rat:
        v = rat["seed_validator"]
        out.append(
            f"seed PerformanceValidator: before-topology p50 {v['baseline_p50_ms']:.3f} ms → "
            f"gateway p50 {v['optimized_p50_ms']:.3f} ms, improvement {v['improvement']:.1%} "
            f"(target ≥ 50%: {'met' if v['passed'] else 'NOT met'})"
        )
    if "auth_on_vs_off_p50_pct" in rat:
        out.append(
            f"auth on vs off: gateway p50 {rat['auth_on_vs_off_p50_pct']:+.1f}% vs gateway-noauth"
        )
    mem = scenarios.get("memory")
    if mem:
        per = ", ".join(f"{k} {v:.0f} MB" for k, v in mem["idle_rss_mb"].items())
        out += [
            "",
            f"idle RSS per service (aiwfe up, built-in embedder): {per} "
            f"(goal ≤ {mem['goal_mb']:.0f} MB each: {'met' if mem['goal_met'] else 'NOT met'})",
        ]
    tel = scenarios.get("telemetry")
    if tel and "p50_ratio_on_off" in tel:
        out += [
            "",
            f"telemetry through the gateway: p50 on {tel['on']['p50_ms']:.3f} ms vs off "
            f"{tel['off']['p50_ms']:.3f} ms = {tel['p50_ratio_on_off']:.2f}x with every trace "
            f"exported, {tel['p50_ratio_sampled_off']:.2f}x sampling 10% (goal ≤ 1.10x; medians "
            f"of {tel['rounds']} alternating rounds at 1 in flight); server CPU "
            f"{tel.get('cpu_ratio_on_off', 0):.2f}x; {tel['spans_exported']:,} spans exported "
            "over OTLP to a local collector",
        ]
    if scenarios.get("overload"):
        from benchmarks import overload

        out += overload.render(scenarios["overload"])
    emb = scenarios.get("embedder")
    if emb:
        out += [
            "",
            f"embedder ({emb['model']}, batches of {emb['batch_size']}): short "
            f"{emb['short_texts_per_s']:,.0f} texts/s, long {emb['long_texts_per_s']:,.0f} "
            f"texts/s, cold {emb['short_cold_cache_texts_per_s']:,.0f} texts/s; recall@10 "
            f"{emb['builtin_recall_at_10']:.3f} (random {emb['random_recall_at_10']:.3f}), "
            f"MRR {emb['builtin_mrr']:.3f}",
        ]
        if emb.get("default_vs_builtin"):
            from benchmarks import onnx_embedder

            out += onnx_embedder.render(emb["default_vs_builtin"])
    vec = scenarios.get("vector-search")
    if vec:
        from benchmarks import vector_search

        out += ["", *vector_search.render(vec)]
    for note in doc.get("notes", []):
        out += ["", note]
    return "\n".join(out)
