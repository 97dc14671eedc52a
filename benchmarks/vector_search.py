"""Embedded vector store benchmark: upsert throughput, index build, search latency and recall.

Dataset: 1,000 Gaussian cluster centres on the unit sphere; each point is a centre plus isotropic
noise of about the same norm, normalised (so same-cluster cosine is ~0.5, like real embeddings
rather than pure Gaussian noise). Queries are fresh draws from the same distribution. Recall@10
is measured against exact brute-force search in numpy on the same float32 data.

Goal: p50 <= 2 ms at recall@10 >= 0.95 (the design's seed target was 100 ms). Absolute figures
depend on the machine; compare runs on the same host only.

Usage::

    python benchmarks/vector_search.py --n 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataplatform.vectors import CollectionSpec, EdgeVectorStore, VectorPoint

CHUNK = 5_000
CLUSTERS = 1_000


def _chunk(rng: np.random.Generator, centres: np.ndarray, size: int) -> np.ndarray:
    """One chunk of clustered, normalised float32 vectors."""
    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), size)]
    x = x + rng.normal(scale=1.0 / np.sqrt(dim), size=(size, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


async def _run(n: int, dim: int, queries: int, k: int, root: Path) -> dict[str, object]:
    rng = np.random.default_rng(42)
    centres = rng.normal(size=(CLUSTERS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    qvecs = _chunk(rng, centres, queries)

    # Auto-optimize off: measure ingest and index build separately.
    store = EdgeVectorStore(root, auto_optimize_threshold=None)
    try:
        await store.create_collection(CollectionSpec("bench", dimension=dim))
        # Exact top-k is accumulated chunk by chunk so the full matrix is never held twice.
        best_scores = np.full((queries, k), -np.inf, dtype=np.float32)
        best_ids = np.zeros((queries, k), dtype=np.int64)
        upsert_s = 0.0
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            data = _chunk(rng, centres, size)
            points = [VectorPoint(str(start + i), data[i], {}) for i in range(size)]
            t0 = time.perf_counter()
            await store.upsert("bench", points)
            upsert_s += time.perf_counter() - t0
            scores = qvecs @ data.T
            all_scores = np.concatenate([best_scores, scores], axis=1)
            all_ids = np.concatenate(
                [best_ids, np.broadcast_to(np.arange(start, start + size), scores.shape)], axis=1
            )
            top = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(all_scores, top, axis=1)
            best_ids = np.take_along_axis(all_ids, top, axis=1)

        t0 = time.perf_counter()
        await store.optimize("bench")
        build_s = time.perf_counter() - t0
        stats = await store.stats("bench")

        for q in qvecs[:20]:  # warm caches (first queries page in the index)
            await store.search("bench", q, top_k=k)
        latencies, recalls = [], []
        for q, truth in zip(qvecs, best_ids, strict=True):
            t0 = time.perf_counter()
            hits = await store.search("bench", q, top_k=k)
            latencies.append(time.perf_counter() - t0)
            recalls.append(len({int(h.id) for h in hits} & set(truth.tolist())) / k)
    finally:
        await store.close()

    lat_ms = np.array(latencies) * 1e3
    return {
        "n": n,
        "dim": dim,
        "queries": queries,
        "upsert_points_per_s": round(n / upsert_s),
        "index_build_s": round(build_s, 2),
        "indexed_vectors": stats["indexed_vectors"],
        "search_p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
        "search_p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
        f"recall@{k}": round(float(np.mean(recalls)), 4),
        "goal_met": bool(np.percentile(lat_ms, 50) <= 2.0 and np.mean(recalls) >= 0.95),
        "machine": _machine(),
    }


def run(n: int = 100_000, dim: int = 768, queries: int = 200) -> dict:
    """Run the benchmark on a temporary directory.

    Args:
        n: Points to index.
        dim: Vector dimension.
        queries: Number of top-10 queries timed.

    Returns:
        Throughput, build time, latency percentiles, recall@10 and machine details.
    """
    with tempfile.TemporaryDirectory(prefix="vecbench-") as tmp:
        return asyncio.run(_run(n, dim, queries, 10, Path(tmp)))


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=100_000, help="points to index")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    m = _machine()
    print(f"machine: {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}, {m['platform']}")
    print("absolute figures vary by machine; goal: p50 <= 2 ms at recall@10 >= 0.95")
    print(json.dumps(run(args.n, args.dim, args.queries), indent=2))


if __name__ == "__main__":
    main()
