"""The default onnx embedder (all-MiniLM-L6-v2) beside the built-in hashing embedder.

Figures, each for both models in the same run: recall@10 and MRR on the labelled set in
`benchmarks/embedder.py`; texts/s at batch 32 on short texts; a cognitive process's idle
RSS with its default model loaded and its cold start (spawn to readiness line). Goals
(issue #25): recall@10 ≥ 0.95, ≥ 200 texts/s, ≤ 250 MB idle RSS.

The weights are looked for in `<home>/models/all-MiniLM-L6-v2` (`aiwfe models pull`); when
absent the onnx figures are reported as missing, never guessed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiwfe.app.embedded import free_port
from aiwfe.runtime.config import load_settings
from benchmarks import procstat
from cognitive import model_store

BATCH = 32
GOALS = {"recall_at_10": 0.95, "texts_per_s": 200.0, "idle_rss_mb": 250.0}
SETTLE_SECONDS = 2.0


def weights_folder() -> Path:
    """Where `aiwfe models pull` puts all-MiniLM-L6-v2 for the current home."""
    home = load_settings().home_path
    return model_store.model_dir(home / "models", model_store.MINILM)


def _rate(
    encode: Callable[[Sequence[str]], Any], texts: Sequence[str], seconds: float
) -> dict[str, float]:
    """texts/s encoding `texts` in batches of BATCH for about `seconds`: per wall-clock
    second, and per CPU second of this process (all its threads), which a busy shared
    machine disturbs far less than the wall clock."""
    encode(texts[:BATCH])  # warm-up
    done, offset = 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while (now := time.perf_counter()) - start < seconds or done == 0:
        if offset + BATCH > len(texts):
            offset = 0
        encode(texts[offset : offset + BATCH])
        offset += BATCH
        done += BATCH
    cpu = time.process_time() - cpu_start
    return {"texts_per_s": done / (now - start), "texts_per_cpu_s": done / max(cpu, 1e-9)}


def _service(default: str, folder: Path | None) -> dict[str, float]:
    """Cold start and idle RSS of `python -m cognitive` whose default backend is `default`."""
    env = {
        **os.environ,
        "AIWFE_HOME": tempfile.mkdtemp(prefix="aiwfe-bench-emb-"),
        "AIWFE_AUTHENTICATION__JWT__SECRET_KEY": secrets.token_urlsafe(32),
        "AIWFE_AUTHENTICATION__INTERNAL__SECRET_KEY": secrets.token_urlsafe(32),
        "AIWFE_SERVICES__COGNITIVE__PORT": str(free_port()),
        "AIWFE_SERVICES__COGNITIVE__METRICS_PORT": "null",
        "AIWFE_LOGGING__LEVEL": "WARNING",
        "AIWFE_COGNITIVE__EMBEDDING__DEFAULT": default,
        "AIWFE_COGNITIVE__EMBEDDING__DOWNLOAD": "false",
    }
    backends: dict[str, Any] = {"builtin": {"kind": "builtin"}}
    if folder is not None:
        backends["minilm"] = {"kind": "onnx", "model": "all-MiniLM-L6-v2", "path": str(folder)}
    env["AIWFE_COGNITIVE__EMBEDDING__BACKENDS"] = json.dumps(backends)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cognitive"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        cold = time.perf_counter() - start
        if not line.startswith("cognitive: "):
            raise RuntimeError(f"cognitive did not start (default {default}): {line!r}")
        time.sleep(SETTLE_SECONDS)
        return {"cold_start_s": cold, "idle_rss_mb": procstat.rss_mb(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(seconds: float, texts: Sequence[str], retrieval: Callable[[Any], tuple[float, float]]):
    """Figures for the onnx model and the built-in, or the onnx side marked missing.

    Args:
        seconds: budget for each throughput measurement.
        texts: short texts to embed for throughput.
        retrieval: (encode function) -> (recall@10, MRR) on the labelled set.
    """
    from cognitive.builtin_embedder import HashingEmbedder

    hashing = HashingEmbedder()
    out: dict[str, Any] = {"batch_size": BATCH, "goals": GOALS}
    out["load_average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    out["builtin"] = {
        "model": hashing.model,
        **_rate(hashing.embed, texts, seconds),
        **_service("builtin", None),
    }
    out["builtin"]["recall_at_10"], out["builtin"]["mrr"] = retrieval(hashing.embed)
    folder = weights_folder()
    if model_store.missing_files(folder.parent, model_store.MINILM):
        out["onnx"] = None
        out["onnx_missing"] = f"no weights in {folder}: run `aiwfe models pull`"
        return out
    from cognitive.onnx_backend import OnnxEmbedder

    embedder = OnnxEmbedder(folder, model_store.MINILM.max_tokens)
    recall, mrr = retrieval(embedder.encode)
    out["onnx"] = {
        "model": f"onnx/{model_store.MINILM.name}",
        "threads": embedder.threads,
        "recall_at_10": recall,
        "mrr": mrr,
        **_rate(embedder.encode, texts, seconds),
        **_service("minilm", folder),
    }
    return out


def render(r: dict[str, Any]) -> list[str]:
    """Lines for the report: both models side by side, with the goals."""
    rows = [("built-in", r["builtin"])]
    if r.get("onnx"):
        rows.insert(0, ("onnx", r["onnx"]))
    lines = [
        f"default embedder vs built-in (texts/s at batch {r['batch_size']}; goals: recall@10 "
        f">= {GOALS['recall_at_10']}, >= {GOALS['texts_per_s']:.0f} texts/s, idle RSS <= "
        f"{GOALS['idle_rss_mb']:.0f} MB):"
    ]
    for label, x in rows:
        lines.append(
            f"  {label:<8} {x['model']:<28} recall@10 {x['recall_at_10']:.3f}  MRR "
            f"{x['mrr']:.3f}  {x['texts_per_s']:>7,.0f} texts/s ({x['texts_per_cpu_s']:,.0f} "
            f"per CPU-s)  cognitive idle RSS "
            f"{x['idle_rss_mb']:.0f} MB  cold start {x['cold_start_s']:.2f} s"
        )
    if not r.get("onnx"):
        lines.append(f"  onnx     not measured: {r['onnx_missing']}")
    lines.append(f"  load average during the run: {r['load_average']}")
    return lines
