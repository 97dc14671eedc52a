"""A sentence-embedding model on ONNX Runtime, tokenized with Hugging Face `tokenizers`.

Pooling follows the sentence-transformers model cards of this class (all-MiniLM-L6-v2):
the token vectors of the last hidden state are averaged over the attention mask (padding
excluded), then L2-normalised, so a dot product is the cosine similarity.

Weights come from the configured `path`, else `<home>/models/<model>` (fetched there on
first use, `cognitive/model_store.py`); `WeightsUnavailable` tells the caller to fall back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aiwfe.runtime.config import ConfigError, EmbeddingBackendSettings, Settings
from cognitive import model_store
from cognitive.registry import embedding_kind

log = logging.getLogger("aiwfe.cognitive.onnx")

MODEL_FILE, TOKENIZER_FILE = "model.onnx", "tokenizer.json"
# Texts per inference call: sorted by length first, so little of each batch is padding.
BATCH = 32


class WeightsUnavailable(Exception):
    """The model's files are neither on disk nor fetchable; the message says how to fix it."""


class OnnxEmbedder:
    """Tokenizer + ONNX session + masked mean pooling + L2 normalisation (synchronous)."""

    def __init__(self, folder: Path, max_tokens: int, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer.no_padding()  # padded per batch below, to the batch's longest text
        pad = self._tokenizer.token_to_id("[PAD]")
        self._pad_id = 0 if pad is None else pad
        options = ort.SessionOptions()
        # One thread per core by default; at most what the machine has (CPU-bound work).
        self.threads = threads or min(4, os.cpu_count() or 1)
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Memory over a little speed (benchmarks/onnx_embedder.py): prepacked copies of the
        # weights cost ~30 MB, and an arena keeps a long batch's peak for good.
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(
            str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self._inputs
        if missing:
            raise ConfigError(
                f"{folder / MODEL_FILE} lacks the inputs {sorted(missing)} a BERT-style "
                "sentence encoder takes"
            )
        self.dimension = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit vectors for `texts`, in their order (batched by length, then put back)."""
        if not texts:
            return np.empty((0, getattr(self, "dimension", 0)), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        stacked = np.concatenate(
            [
                self._encode_batch([texts[i] for i in order[start : start + BATCH]])
                for start in range(0, len(order), BATCH)
            ]
        )
        out = np.empty_like(stacked)
        out[order] = stacked
        return out

    def _encode_batch(self, texts: list[str]) -> npt.NDArray[np.float32]:
        encodings = self._tokenizer.encode_batch(texts)
        width = max(1, *(len(e.ids) for e in encodings))  # an all-empty batch still runs
        ids = np.full((len(texts), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        types = np.zeros((len(texts), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}
        hidden = np.asarray(self._session.run(None, feeds)[0], dtype=np.float32)
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


def model_folder(name: str, cfg: EmbeddingBackendSettings, settings: Settings) -> Path:
    """Where the backend's files are, fetching them on first use.

    Raises:
        WeightsUnavailable: not on disk and not fetchable (offline, download off, bad sum).
        ConfigError: the configuration cannot work at all (unknown model, missing files in
            a configured path).
    """
    key = f"cognitive.embedding.backends.{name}"
    if cfg.path:
        folder = Path(cfg.path).expanduser()
        absent = [f for f in (MODEL_FILE, TOKENIZER_FILE) if not (folder / f).is_file()]
        if absent:
            raise ConfigError(f"configuration key '{key}.path' ({folder}) lacks {absent}")
        return folder
    spec = model_store.CATALOGUE.get(cfg.model or "")
    if spec is None:
        raise ConfigError(
            f"configuration key '{key}.model' is {cfg.model!r}: name one of "
            f"{sorted(model_store.CATALOGUE)}, or set '{key}.path' to a folder holding "
            f"{MODEL_FILE} and {TOKENIZER_FILE}"
        )
    root = settings.home_path / "models"
    if not model_store.missing_files(root, spec):
        return model_store.model_dir(root, spec)
    fix = (
        f"run `aiwfe models pull` where the network is reachable, or set '{key}.mirror' "
        f"(a URL) or '{key}.path' (a folder with {MODEL_FILE} and {TOKENIZER_FILE})"
    )
    if not settings.cognitive.embedding.download:
        raise WeightsUnavailable(f"{spec.name} is not in {root} and downloads are off: {fix}")
    log.info("fetching %s into %s (first use)", spec.name, root)
    try:
        return model_store.pull(spec, root, cfg.mirror, _LogProgress())
    except model_store.FetchError as exc:
        raise WeightsUnavailable(f"{spec.name} could not be fetched ({exc}): {fix}") from None


class _LogProgress:
    """Logs a fetch at each quarter (a service's log is no terminal for a bar)."""

    def __init__(self) -> None:
        self._last: tuple[str, int] = ("", -1)

    def __call__(self, name: str, done: int, total: int | None) -> None:
        quarter = done * 4 // total if total else -1
        if quarter >= 0 and (name, quarter) != self._last:
            self._last = (name, quarter)
            mb = (total or 0) / 1e6
            log.info("fetching %s: %d%% of %.1f MB", name, done * 100 // (total or 1), mb)


class OnnxBackend:
    """The `onnx` kind: a local sentence encoder, named `onnx/<model>` in responses."""

    def __init__(self, name: str, cfg: EmbeddingBackendSettings, settings: Settings) -> None:
        folder = model_folder(name, cfg, settings)
        spec = model_store.CATALOGUE.get(cfg.model or "")
        max_tokens = min(cfg.max_tokens, spec.max_tokens) if spec else cfg.max_tokens
        self.name = name
        self.model_name = cfg.model or folder.name
        self.model = f"onnx/{self.model_name}"
        self.embedder = OnnxEmbedder(folder, max_tokens, cfg.threads)
        self.dimension = self.embedder.dimension
        expected = cfg.dimension or (spec.dimension if spec else None)
        if expected is not None and expected != self.dimension:
            raise ConfigError(
                f"configuration key 'cognitive.embedding.backends.{name}' expects "
                f"{expected}-d vectors but {folder / MODEL_FILE} produces {self.dimension}-d"
            )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        matrix = await asyncio.to_thread(self.embedder.encode, list(texts))
        return matrix.tolist()

    async def close(self) -> None:
        return None


@embedding_kind("onnx")
def make_onnx_backend(name: str, cfg: EmbeddingBackendSettings, settings: Settings) -> Any:
    return OnnxBackend(name, cfg, settings)
