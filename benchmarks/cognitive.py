"""Cognitive service benchmark: cached Embed latency, embedder throughput, Search end to end
on a large collection, and retrieval quality (recall@10).

All four services run in this process (`aiwfe.app.suite.start_suite`) on the local PostgreSQL and
Redis, so client and servers share one event loop and one core: latencies are upper bounds of
what separate processes give. Scenarios:

* cached Embed: one short text, cognitive's L1 holds it. "gateway" goes client → gateway
  (JWT, RBAC, response cache miss) → cognitive; "gateway, response cache" repeats one request
  so the gateway's own API cache answers; "direct" calls cognitive with an internal identity.
  The seed's cache_lookup goal is 5 ms; ours is ≤ 1 ms beyond the gateway hop.
* cache layers, direct: L1, L2 (Redis, L1 cleared) and L3 (PostgreSQL, L1 and Redis cleared).
* embedder throughput and recall@10: `benchmarks/embedder.py` (the built-in, and the default
  onnx model beside it when its weights are in the home).
* Search: a collection of `--n` short synthetic documents indexed through cognitive, then
  Search through the gateway (embed the query via the cache, vector search, hits).

Usage::

    python -m benchmarks.cognitive [--n 100000] [--samples 500] [--index-budget 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity, Principal
from benchmarks import embedder as embedder_bench

ADMIN_DSN = os.environ.get(
    "AIWFE_BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("AIWFE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD = "benchmark-password-123"


def _pct(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


async def _timed(call: Any, requests: list[Any], metadata: Any) -> list[float]:
    out = []
    for request in requests:
        start = time.perf_counter()
        await call(request, metadata=metadata, timeout=30)
        out.append(time.perf_counter() - start)
    return out


async def _embed_latency(suite: Any, gw: Any, direct: Any, bearer: Any, internal: Any, n: int):
    service = suite.running["cognitive"].service
    texts = [f"cached embed probe number {i} {uuid.uuid4().hex[:6]}" for i in range(n)]
    for i in range(0, n, 200):  # warm cognitive's cache directly (the gateway never saw them)
        await direct.Embed(pb.EmbedRequest(texts=texts[i : i + 200]), metadata=internal())
    reqs = [pb.EmbedRequest(texts=[t]) for t in texts]
    results: dict[str, Any] = {
        "direct_l1": _pct(await _timed(direct.Embed, reqs, internal())),
        "gateway_l1": _pct(await _timed(gw.Embed, reqs, bearer)),
        "gateway_response_cache": _pct(await _timed(gw.Embed, [reqs[0]] * n, bearer)),
    }
    # Lower layers, measured directly: clear the layers above before each call.
    l2, l3 = [], []
    redis = service.redis.client
    for text, req in zip(texts[:200], reqs[:200], strict=True):
        service.cache.clear_memory()
        start = time.perf_counter()
        await direct.Embed(req, metadata=internal())
        l2.append(time.perf_counter() - start)
        service.cache.clear_memory()
        key = service.cache.key({"model": service.backends.default_embedding.model, "text": text})
        await redis.delete(service.redis.key(key))
        start = time.perf_counter()
        await direct.Embed(req, metadata=internal())
        l3.append(time.perf_counter() - start)
    results["direct_l2_redis"] = _pct(l2)
    results["direct_l3_postgres"] = _pct(l3)
    results["gateway_hop_ms"] = results["gateway_l1"]["p50_ms"] - results["direct_l1"]["p50_ms"]
    return results


async def _search(gw: Any, direct: Any, bearer: Any, internal: Any, n: int, budget: float):
    rng = np.random.default_rng(7)
    vocab = embedder_bench._vocabulary(rng, 20_000)
    collection = f"bench_{uuid.uuid4().hex[:8]}"
    indexed, start = 0, time.perf_counter()
    batch = 256
    corpus: list[str] = []
    while indexed < n and time.perf_counter() - start < budget:
        size = min(batch, n - indexed)
        texts = embedder_bench._make_texts(rng, vocab, size, 20)
        corpus.extend(texts)
        docs = [
            pb.Document(id=f"d{indexed + i}", text=t, metadata={"shard": str((indexed + i) % 10)})
            for i, t in enumerate(texts)
        ]
        await direct.IndexDocuments(
            pb.IndexDocumentsRequest(collection=collection, documents=docs),
            metadata=internal(),
        )
        indexed += size
    index_seconds = time.perf_counter() - start
    queries = [corpus[int(i)] for i in rng.integers(0, len(corpus), 200)]
    reqs = [pb.SearchRequest(collection=collection, query=q, top_k=10) for q in queries]
    await gw.Search(reqs[0], metadata=bearer, timeout=30)  # first search may load/optimize
    lat = await _timed(gw.Search, reqs, bearer)
    filtered = [
        pb.SearchRequest(collection=collection, query=q, top_k=10, filter={"shard": "3"})
        for q in queries[:100]
    ]
    flat = await _timed(gw.Search, filtered, bearer)
    # Sanity of the retrieval: the query text is a document, so it should be the top hit.
    top1 = 0
    for q in queries[:50]:
        reply = await gw.Search(
            pb.SearchRequest(collection=collection, query=q, top_k=1), metadata=bearer
        )
        top1 += bool(reply.hits) and reply.hits[0].text == q
    return {
        "collection_size": indexed,
        "requested_size": n,
        "index_seconds": index_seconds,
        "index_docs_per_s": indexed / index_seconds,
        "search_gateway": _pct(lat),
        "search_gateway_filtered": _pct(flat),
        "self_query_top1": top1 / 50,
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    db = f"aiwfe_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    home = Path(tempfile.mkdtemp(prefix="aiwfe-bench-"))
    overrides: dict[str, Any] = {
        "home": str(home),
        "authentication": {
            "jwt": {"secret_key": secrets.token_urlsafe(32)},
            "internal": {"secret_key": secrets.token_urlsafe(32)},
            "admin": {"username": "admin", "password": PASSWORD},
            # The benchmark sends thousands of calls as one user: lift the per-user API limit.
            "rate_limiting": {"api_requests": 1_000_000},
        },
        "database": {"postgres": {"dsn": ADMIN_DSN.rsplit("/", 1)[0] + f"/{db}"}},
        "redis": {"url": REDIS_URL, "key_prefix": f"aiwfe-bench:{db}:"},
        "logging": {"level": "WARNING", "json_format": False},
    }
    suite = await start_suite(overrides)
    results: dict[str, Any] = {}
    try:
        identity = InternalIdentity.from_settings(suite.settings)

        admin: Principal | None = None

        def internal() -> tuple[tuple[str, str], ...]:
            # Assertions are short-lived (60 s): mint one per use. Direct calls act for the
            # admin, who owns (and may index into) the benchmark's collection.
            return ((IDENTITY_METADATA_KEY, identity.assertion(admin, "bench")),)

        async with (
            grpc.aio.insecure_channel(suite.address("gateway")) as gch,
            grpc.aio.insecure_channel(suite.address("cognitive")) as cch,
        ):
            login = await auth_grpc.AuthServiceStub(gch).Login(
                auth_pb.LoginRequest(username="admin", password=PASSWORD), timeout=10
            )
            bearer = (("authorization", f"Bearer {login.access_token}"),)
            who = await auth_grpc.AuthServiceStub(gch).WhoAmI(
                auth_pb.WhoAmIRequest(), metadata=bearer, timeout=10
            )
            admin = Principal(who.user_id, who.username, tuple(who.roles))
            gw, direct = pb_grpc.CognitiveServiceStub(gch), pb_grpc.CognitiveServiceStub(cch)
            print("cached Embed ...", file=sys.stderr, flush=True)
            results["embed"] = await _embed_latency(
                suite, gw, direct, bearer, internal, args.samples
            )
            print(f"Search on up to {args.n} documents ...", file=sys.stderr, flush=True)
            results["search"] = await _search(
                gw, direct, bearer, internal, args.n, args.index_budget
            )
    finally:
        await suite.stop()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(home, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="documents in the Search collection")
    parser.add_argument("--samples", type=int, default=500, help="cached Embed calls per scenario")
    parser.add_argument("--index-budget", type=float, default=300, help="seconds for indexing")
    parser.add_argument("--embedder-seconds", type=float, default=3.0)
    args = parser.parse_args()

    print("built-in embedder ...", file=sys.stderr, flush=True)
    emb = embedder_bench.run(args.embedder_seconds)
    r = asyncio.run(_run(args))

    print(f"machine: {os.cpu_count()} CPUs; all services in this process (upper bounds)")
    e = r["embed"]
    print("cached Embed (one short text), ms:")
    for name in ("direct_l1", "gateway_l1", "gateway_response_cache", "direct_l2_redis",
                 "direct_l3_postgres"):  # fmt: skip
        print(f"  {name:<24} p50 {e[name]['p50_ms']:6.2f}   p99 {e[name]['p99_ms']:6.2f}"
              f"   (n={e[name]['n']})")  # fmt: skip
    print(f"  gateway hop (p50 gateway_l1 - direct_l1): {e['gateway_hop_ms']:.2f} ms")
    print("built-in embedder throughput (batches of 64, one thread):")
    print(f"  short (~10 words) {emb['short_texts_per_s']:,.0f} texts/s;"
          f" long (~200 words) {emb['long_texts_per_s']:,.0f} texts/s")  # fmt: skip
    print("retrieval quality (labelled set in benchmarks/embedder.py):")
    print(f"  built-in {emb['model']}: recall@10 {emb['builtin_recall_at_10']:.3f}"
          f"  MRR {emb['builtin_mrr']:.3f}"
          f"  (random vectors: {emb['random_recall_at_10']:.3f})")  # fmt: skip
    for line in embedder_bench.onnx_embedder.render(emb["default_vs_builtin"]):
        print(line)
    s = r["search"]
    print(f"Search end to end through the gateway on {s['collection_size']:,} documents"
          f" (asked {s['requested_size']:,}; indexed at {s['index_docs_per_s']:,.0f} docs/s"
          f" in {s['index_seconds']:.0f} s):")  # fmt: skip
    for name in ("search_gateway", "search_gateway_filtered"):
        print(f"  {name:<24} p50 {s[name]['p50_ms']:6.2f}   p99 {s[name]['p99_ms']:6.2f}"
              f"   (n={s[name]['n']})")  # fmt: skip
    print(f"  a document's own text as query ranks it first: {s['self_query_top1']:.0%}")


if __name__ == "__main__":
    main()
