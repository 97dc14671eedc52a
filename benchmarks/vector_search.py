"""Embedded vector store benchmark: upsert throughput, index build, search latency and recall.

Dataset: 1,000 Gaussian cluster centres on the unit sphere; each point is a centre plus isotropic
noise of about the same norm, normalised (so same-cluster cosine is ~0.5, like real embeddings
rather than pure Gaussian noise). Chunk ``i`` is drawn from its own seeded generator, so any
run regenerates the same data without ever holding more than one chunk (5,000 x dim float32).
Queries are fresh draws from the same distribution. Recall@10 is measured against exact
brute-force top-10 in numpy, accumulated chunk by chunk while the points are upserted.

The collection is built with the product's settings (``qdrant.performance`` through
``dataplatform.vector_service.index_options``, seed defaults unless configured), loaded in bulk
as documented in ``dataplatform/vectors/edge.py``: auto-optimize off, one ``optimize`` at the
end (in a child process, as the product does). The query phase always runs in a fresh child
process that only opens the collection and searches, so its RSS is the serving process's: no
generator, no ingest leftovers. It reports CPU time per query (all threads of that process)
beside the wall-clock latency, because wall clock on a shared machine is pessimistic.

Goal (issue #23): at 1,000,000 x 768 Cosine, p50 <= 5 ms and p99 <= 15 ms at recall@10 >= 0.95
with the serving process's RSS <= 1.5 GB.

Usage::

    nice -n 19 python -m benchmarks.vector_search --vector-n 1000000 --keep /work/tmp-vectors/1m
    python -m benchmarks.vector_search --reuse /work/tmp-vectors/1m        # query phase only
    python -m benchmarks.vector_search --reuse DIR --ef 64,128,256        # sweep hnsw_ef
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiwfe.runtime.config import load_settings
from dataplatform.vector_service import index_options
from dataplatform.vectors import CollectionSpec, EdgeVectorStore, VectorPoint

CHUNK = 5_000
CLUSTERS = 1_000
SEED = 42
COLLECTION = "bench"
K = 10
GOAL = {"p50_ms": 5.0, "p99_ms": 15.0, "recall": 0.95, "rss_mb": 1536}


def _centres(dim: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, 0])
    centres = rng.normal(size=(CLUSTERS, dim)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _draw(rng: np.random.Generator, centres: np.ndarray, size: int) -> np.ndarray:
    """Clustered, normalised float32 vectors."""
    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), size)]
    x = x + rng.normal(scale=1.0 / np.sqrt(dim), size=(size, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chunk(centres: np.ndarray, index: int, size: int) -> np.ndarray:
    """Chunk ``index`` of the data set; its own generator makes it reproducible alone."""
    return _draw(np.random.default_rng([SEED, 1, index]), centres, size)


def _memory() -> dict[str, int]:
    """This process's resident memory in MB (file-backed = mmap'd pages now resident)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
    return out


def _machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def _options(**override: Any) -> dict[str, Any]:
    """The product's store settings (config file + env), with the overrides not None."""
    options = index_options(load_settings().qdrant.performance)
    options.update({k: v for k, v in override.items() if v is not None})
    return options


def _store(root: Path, options: dict[str, Any]) -> EdgeVectorStore:
    """The embedded store, auto-optimize off (bulk load: one optimize at the end)."""
    return EdgeVectorStore(root, auto_optimize_threshold=None, **options)


# ------------------------------------------------------------------------------- build


async def _build(n: int, dim: int, queries: int, root: Path) -> dict[str, Any]:
    centres = _centres(dim)
    qvecs = _draw(np.random.default_rng([SEED, 2]), centres, queries)
    store = _store(root / "store", _options())
    try:
        await store.create_collection(CollectionSpec(COLLECTION, dimension=dim))
        # Exact top-k accumulated chunk by chunk: the full matrix is never held.
        best_scores = np.full((queries, K), -np.inf, dtype=np.float32)
        best_ids = np.zeros((queries, K), dtype=np.int64)
        upsert_s = upsert_cpu = truth_cpu = 0.0
        for index, start in enumerate(range(0, n, CHUNK)):
            size = min(CHUNK, n - start)
            data = _chunk(centres, index, size)
            points = [VectorPoint(str(start + i), data[i], {}) for i in range(size)]
            t0, c0 = time.perf_counter(), time.process_time()
            await store.upsert(COLLECTION, points)
            upsert_s += time.perf_counter() - t0
            upsert_cpu += time.process_time() - c0
            c0 = time.process_time()
            scores = qvecs @ data.T
            all_scores = np.concatenate([best_scores, scores], axis=1)
            all_ids = np.concatenate(
                [best_ids, np.broadcast_to(np.arange(start, start + size), scores.shape)], axis=1
            )
            top = np.argpartition(-all_scores, K - 1, axis=1)[:, :K]
            best_scores = np.take_along_axis(all_scores, top, axis=1)
            best_ids = np.take_along_axis(all_ids, top, axis=1)
            truth_cpu += time.process_time() - c0
            if index % 20 == 19:
                print(
                    f"  upserted {start + size:,} (load {_machine()['loadavg']})",
                    file=sys.stderr,
                    flush=True,
                )
        ingest_memory = _memory()
        print(f"  optimizing {n:,} points ...", file=sys.stderr, flush=True)
        t0, c0 = time.perf_counter(), _children_cpu()
        await store.optimize(COLLECTION)
        build_s = time.perf_counter() - t0
        build_cpu = _children_cpu() - c0  # the optimize child's, all its threads
        stats = await store.stats(COLLECTION)
    finally:
        await store.close()
    np.save(root / "queries.npy", qvecs)
    np.save(root / "truth.npy", best_ids)
    build = {
        "n": n,
        "dim": dim,
        "upsert_points_per_s": round(n / upsert_s),
        "upsert_points_per_cpu_s": round(n / upsert_cpu),
        "index_build_s": round(build_s, 1),
        "index_build_cpu_s": round(build_cpu, 1),
        "points": stats["points"],
        "segments": stats["segments"],
        "indexed_vectors": stats["indexed_vectors"],
        "ingest_process_mb": ingest_memory,
        # The optimize child is the largest child so far: its peak is the index build's.
        "build_process_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "truth_cpu_s": round(truth_cpu, 1),
        "disk_mb": _du_mb(root / "store"),
        "loadavg_after": _machine()["loadavg"],
    }
    (root / "build.json").write_text(json.dumps(build, indent=2))
    return build


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _du_mb(path: Path) -> int:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total // (1 << 20)


# ------------------------------------------------------------------------------- query


async def _query(
    root: Path, ef: int | None, warmup: int, oversampling: float | None
) -> dict[str, Any]:
    """Search every saved query once; runs in its own process (see module docstring)."""
    qvecs = np.load(root / "queries.npy")
    truth = np.load(root / "truth.npy")
    before_open = _memory()
    options = _options(hnsw_ef=ef, oversampling=oversampling)
    store = _store(root / "store", options)
    try:
        t0 = time.perf_counter()
        await store.stats(COLLECTION)  # opens (loads) the shard
        load_s = time.perf_counter() - t0
        after_load = _memory()
        rng = np.random.default_rng([SEED, 3])
        for q in _draw(rng, _centres(qvecs.shape[1]), warmup):  # not the measured queries
            await store.search(COLLECTION, q, top_k=K)
        latencies, recalls = [], []
        c0 = time.process_time()
        w0 = time.perf_counter()
        for q, expected in zip(qvecs, truth, strict=True):
            t0 = time.perf_counter()
            hits = await store.search(COLLECTION, q, top_k=K)
            latencies.append(time.perf_counter() - t0)
            recalls.append(len({int(h.id) for h in hits} & set(expected.tolist())) / K)
        cpu_s = time.process_time() - c0
        wall_s = time.perf_counter() - w0
        after_queries = _memory()
    finally:
        await store.close()
    lat = np.array(latencies) * 1e3
    p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
    recall = float(np.mean(recalls))
    rss = after_queries["VmRSS"]
    return {
        "hnsw_ef": options["hnsw_ef"],
        "oversampling": options["oversampling"],
        "queries": len(qvecs),
        "load_s": round(load_s, 2),
        "search_p50_ms": round(p50, 3),
        "search_p99_ms": round(p99, 3),
        "search_mean_ms": round(float(lat.mean()), 3),
        "cpu_ms_per_query": round(cpu_s / len(qvecs) * 1e3, 3),
        "cpu_share": round(cpu_s / wall_s, 2),
        f"recall@{K}": round(recall, 4),
        "rss_mb": {"before_open": before_open, "after_load": after_load, "after": after_queries},
        "loadavg": _machine()["loadavg"],
        "goal_met": p50 <= GOAL["p50_ms"]
        and p99 <= GOAL["p99_ms"]
        and recall >= GOAL["recall"]
        and rss <= GOAL["rss_mb"],
    }


def _query_in_child(
    root: Path, ef: int | None, warmup: int, oversampling: float | None
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.vector_search", "--query-child", str(root)]
    cmd += ["--warmup", str(warmup)] + ([] if ef is None else ["--ef", str(ef)])
    cmd += [] if oversampling is None else ["--oversampling", str(oversampling)]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    return json.loads(out.stdout)


def run(
    n: int = 100_000,
    dim: int = 768,
    queries: int = 1000,
    *,
    keep: Path | None = None,
    reuse: Path | None = None,
    efs: tuple[int | None, ...] = (None,),
    build_only: bool = False,
    warmup: int = 50,
    oversampling: float | None = None,
) -> dict[str, Any]:
    """Build (unless ``reuse``), then run the query phase once per ``hnsw_ef`` in a child.

    Args:
        n: Points to index.
        dim: Vector dimension.
        queries: Top-10 queries timed (their exact answers are computed while building).
        keep: Build into this directory and leave it there for ``reuse``.
        reuse: Directory of an earlier ``keep`` run: skip the build.
        efs: Search-time ``hnsw_ef`` values (``None`` = configured default).
        build_only: Skip the query phase.
        warmup: Untimed queries per query phase, drawn apart from the measured ones.
        oversampling: Overrides the configured ``qdrant.performance.oversampling``.

    Returns:
        Build figures (upsert rate, index build time, memory) and one entry per ``hnsw_ef``.
    """
    given = reuse or keep
    scratch = tempfile.TemporaryDirectory(prefix="vecbench-") if given is None else None
    with scratch or contextlib.nullcontext():
        root = given or Path(scratch.name)  # type: ignore[union-attr]
        if reuse is None:
            if (root / "store").exists():
                raise SystemExit(f"{root / 'store'} exists: pass --reuse to query it")
            build = asyncio.run(_build(n, dim, queries, root))
        else:
            build = json.loads((root / "build.json").read_text())
        results = (
            [] if build_only else [_query_in_child(root, ef, warmup, oversampling) for ef in efs]
        )
    return {
        "build": build,
        "query": results,
        "settings": _options(),
        "machine": _machine(),
    }


def render(result: dict[str, Any]) -> list[str]:
    """One line for the build and one per query phase."""
    b = result["build"]
    lines = [
        f"vector-search (n={b['n']:,}, dim {b['dim']}): upsert {b['upsert_points_per_s']:,} "
        f"points/s ({b.get('upsert_points_per_cpu_s', 'n/a')} per CPU s), index build "
        f"{b['index_build_s']} s ({b.get('index_build_cpu_s', 'n/a')} CPU s, {b['segments']} "
        f"segments), build process peak {b['build_process_peak_mb']} MB"
    ]
    for q in result["query"]:
        rss = q["rss_mb"]["after"]
        lines.append(
            f"  hnsw_ef {q['hnsw_ef']}, oversampling {q['oversampling']}: p50 "
            f"{q['search_p50_ms']} ms, p99 {q['search_p99_ms']} ms, CPU "
            f"{q['cpu_ms_per_query']} ms/query, recall@{K} {q[f'recall@{K}']}, RSS "
            f"{rss['VmRSS']} MB (anon {rss['RssAnon']}, file {rss['RssFile']}), load "
            f"{q['loadavg']}, goal met: {q['goal_met']}"
        )
    return lines


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--vector-n", "--n", dest="n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--ef", default="", help="comma-separated hnsw_ef values to sweep (default: configured)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--keep", type=Path, help="build into DIR and keep it for --reuse")
    where.add_argument("--reuse", type=Path, help="query the collection an earlier --keep built")
    where.add_argument("--query-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--oversampling", type=float, help="override the configured value")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the JSON result to this file")
    args = parser.parse_args()
    efs = tuple(int(e) for e in args.ef.split(",") if e) or (None,)
    if args.query_child:
        print(
            json.dumps(
                asyncio.run(_query(args.query_child, efs[0], args.warmup, args.oversampling))
            )
        )
        return
    m = _machine()
    print(f"machine: {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}, {m['platform']}")
    print(f"load average at start: {m['loadavg']}; goal: {GOAL}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    result = run(
        args.n,
        args.dim,
        args.queries,
        keep=args.keep,
        reuse=args.reuse,
        efs=efs,
        build_only=args.build_only,
        warmup=args.warmup,
        oversampling=args.oversampling,
    )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
