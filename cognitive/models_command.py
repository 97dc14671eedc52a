"""`aiwfe models pull`: fetch the configured embedding models' weights ahead of time.

Also what `aiwfe up` runs before starting the services, so the first download shows a
progress bar on the terminal instead of holding up cognitive's readiness.
"""

from __future__ import annotations

import argparse
import sys

from aiwfe.runtime.config import ConfigError, Settings, load_settings
from cognitive import model_store


def wanted(settings: Settings) -> list[tuple[model_store.ModelSpec, str | None]]:
    """The catalogue models the configured onnx backends fetch (not those given a path),
    with each one's mirror."""
    out: dict[str, tuple[model_store.ModelSpec, str | None]] = {}
    for backend in settings.cognitive.embedding.backends.values():
        spec = model_store.CATALOGUE.get(backend.model or "")
        if backend.kind == "onnx" and not backend.path and spec is not None:
            out.setdefault(spec.name, (spec, backend.mirror))
    return list(out.values())


def run(args: argparse.Namespace) -> int:
    """Fetches each model; one line per model, exit 1 on the first that fails."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"aiwfe: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.model) - set(model_store.CATALOGUE))
    if unknown:
        known = ", ".join(sorted(model_store.CATALOGUE))
        print(f"aiwfe: unknown model {', '.join(unknown)}; known: {known}", file=sys.stderr)
        return 2
    root = settings.home_path / "models"
    models = [(model_store.CATALOGUE[name], None) for name in args.model] or wanted(settings)
    if not models:
        print("aiwfe: no onnx embedding backend to fetch in this configuration", file=sys.stderr)
        return 0
    for spec, mirror in models:
        try:
            folder = model_store.pull(
                spec, root, args.mirror or mirror, model_store.TerminalProgress()
            )
        except model_store.FetchError as exc:
            print(f"aiwfe: {spec.name}: {exc}", file=sys.stderr)
            return 1
        print(f"{spec.name}: ready in {folder}")
    return 0


def prefetch(settings: Settings) -> str:
    """`aiwfe up`'s step: fetches the default backend's weights, with a progress bar, if
    they are missing; returns the banner's `embedding:` line (the fall-back and its fix
    when they could not be had: cognitive then starts on the hashing embedder)."""
    emb = settings.cognitive.embedding
    backend = emb.backends.get(emb.default)
    spec = model_store.CATALOGUE.get(backend.model or "") if backend else None
    if backend is None or backend.kind != "onnx" or backend.path or spec is None:
        return f"embedding: {emb.default}"
    root = settings.home_path / "models"
    error = ""
    if model_store.missing_files(root, spec) and emb.download:
        try:
            model_store.pull(spec, root, backend.mirror, model_store.TerminalProgress(sys.stdout))
        except model_store.FetchError as exc:
            error = f" ({exc})"
    if not model_store.missing_files(root, spec):
        return f"embedding: {spec.name} (onnx, {root / spec.name})"
    if not emb.fallback_to_builtin:
        return f"embedding: {spec.name} weights missing{error}: cognitive will refuse to start"
    return (
        f"embedding: built-in hashing embedder (lower quality) because the {spec.name} weights "
        f"are not in {root}{error}; fix: `aiwfe models pull` where the network is reachable, or "
        f"set cognitive.embedding.backends.{emb.default}.mirror (URL) or .path (folder)"
    )
