"""The onnx embedding backend on a tiny model the tests build (`tiny_model.py`), the kind
registry, and the fall-back to the hashing embedder when weights cannot be had."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as pb_grpc
from aiwfe.runtime.config import ConfigError, Settings
from cognitive import model_store
from cognitive.backends import Backends
from cognitive.onnx_backend import OnnxEmbedder
from tests.cognitive import tiny_model
from tests.conftest import bearer, login


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Unpack(info))
    return info


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("tiny"))


def _settings(home: Path, embedding: dict[str, Any]) -> Settings:
    return Settings.model_validate({"home": str(home), "cognitive": {"embedding": embedding}})


def test_vectors_are_masked_mean_pooled_and_unit_length(tiny: Path) -> None:
    """Texts of different lengths in one batch get the hand-computed vectors: padding is
    left out of the mean and each vector has unit length."""
    texts = ["bug crash segfault the", "how", "feature add question how the bug zebra"]
    got = OnnxEmbedder(tiny, max_tokens=256).encode(texts)
    want = np.stack([tiny_model.expected(t) for t in texts])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_long_texts_are_truncated_to_max_tokens(tiny: Path) -> None:
    """Only the first `max_tokens` tokens count, as the model card's max_seq_length says."""
    text = "bug crash " + "feature " * 20
    got = OnnxEmbedder(tiny, max_tokens=2).encode([text])[0]
    np.testing.assert_allclose(got, tiny_model.expected("bug crash"), rtol=1e-5, atol=1e-6)


async def test_embed_through_the_gateway_names_the_onnx_model(tiny: Path, base_overrides) -> None:
    """A suite whose default is the onnx backend answers Embed with its vectors and the
    name `onnx/<model>`; indexing creates the collection at the model's dimension."""
    overrides = copy.deepcopy(base_overrides)
    overrides["cognitive"] = {
        "embedding": {
            "default": "tiny",
            "backends": {
                "tiny": {"kind": "onnx", "model": "tiny", "path": str(tiny), "threads": 1},
                "builtin": {"kind": "builtin"},
            },
        }
    }
    suite = await start_suite(overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            meta = bearer(await login(channel))
            stub = pb_grpc.CognitiveServiceStub(channel)
            reply = await stub.Embed(pb.EmbedRequest(texts=["bug crash"]), metadata=meta)
            assert reply.model == "onnx/tiny"
            assert reply.dimension == tiny_model.DIM
            np.testing.assert_allclose(
                reply.embeddings[0].values, tiny_model.expected("bug crash"), rtol=1e-5
            )
            doc = pb.Document(id="d1", text="the segfault crash")
            await stub.IndexDocuments(
                pb.IndexDocumentsRequest(collection="tiny-docs", documents=[doc]), metadata=meta
            )
            found = await stub.Search(
                pb.SearchRequest(collection="tiny-docs", query="crash segfault"), metadata=meta
            )
            assert found.model == "onnx/tiny"
            assert found.hits[0].document_id == "d1"
            # A collection indexed by the 768-d hashing embedder (the fall-back) is refused
            # by the 8-d default, naming both; naming its model in the request works.
            await stub.IndexDocuments(
                pb.IndexDocumentsRequest(collection="old", documents=[doc], model="builtin"),
                metadata=meta,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Search(pb.SearchRequest(collection="old", query="crash"), metadata=meta)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_info(refused.value)
            assert info.reason == "DIMENSION_MISMATCH"
            assert dict(info.metadata) == {
                "collection": "old",
                "collectionDimension": "768",
                "model": "onnx/tiny",
                "modelDimension": str(tiny_model.DIM),
            }
            old = await stub.Search(
                pb.SearchRequest(collection="old", query="crash", model="builtin"), metadata=meta
            )
            assert old.model.startswith("aiwfe-hashing") and old.hits
    finally:
        await suite.stop()


def test_unknown_kind_lists_the_known_kinds(tmp_path: Path) -> None:
    """A kind no module registered stops start-up, naming the key and every known kind."""
    settings = _settings(tmp_path, {"default": "x", "backends": {"x": {"kind": "onxx"}}})
    with pytest.raises(ConfigError) as info:
        Backends(settings)
    message = str(info.value)
    assert "cognitive.embedding.backends.x.kind" in message
    assert "builtin, ollama, onnx, openai" in message


def test_unknown_generation_kind_lists_the_known_kinds(tmp_path: Path) -> None:
    """The same check applies to generation backends."""
    settings = Settings.model_validate(
        {
            "home": str(tmp_path),
            "cognitive": {
                "generation": {"backends": {"g": {"kind": "llamacpp", "url": "u", "model": "m"}}}
            },
        }
    )
    with pytest.raises(ConfigError, match="known generation kinds: ollama, openai"):
        Backends(settings)


def test_configured_dimension_must_match_the_model(tiny: Path, tmp_path: Path) -> None:
    """A configured dimension the model does not produce is refused at start-up, never
    padded or projected."""
    backend = {"kind": "onnx", "model": "tiny", "path": str(tiny), "dimension": 768}
    settings = _settings(tmp_path, {"default": "t", "backends": {"t": backend}})
    with pytest.raises(ConfigError, match=r"expects 768-d vectors but .* produces 8-d"):
        Backends(settings)


def test_unknown_catalogue_model_without_path_is_refused(tmp_path: Path) -> None:
    """A model name the catalogue lacks, with no path, is a configuration error naming the
    catalogue (not a fall-back: downloading could never fix it)."""
    backend = {"kind": "onnx", "model": "no-such-model"}
    settings = _settings(tmp_path, {"default": "t", "backends": {"t": backend}})
    with pytest.raises(ConfigError, match="all-MiniLM-L6-v2"):
        Backends(settings)


def test_default_config_without_weights_or_network_falls_back_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The default configuration with downloads off and no weights in the home starts with
    the hashing embedder and logs exactly one warning saying how to fix it."""
    settings = Settings.model_validate(
        {"home": str(tmp_path), "cognitive": {"embedding": {"download": False}}}
    )
    assert settings.cognitive.embedding.backends["minilm"].kind == "onnx"
    with caplog.at_level(logging.WARNING, logger="aiwfe.cognitive"):
        backends = Backends(settings)
    assert backends.default_embedding.model.startswith("aiwfe-hashing")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "falls back to the built-in hashing embedder" in warnings[0]
    assert "aiwfe models pull" in warnings[0]
    assert not (tmp_path / "models").exists()


async def test_unreachable_mirror_falls_back(tmp_path: Path, caplog) -> None:
    """A fetch that cannot connect (nothing listens on the mirror's port) falls back too."""
    from aiwfe.app.embedded import free_port

    backend = {"kind": "onnx", "model": "all-MiniLM-L6-v2"}
    backend["mirror"] = f"http://127.0.0.1:{free_port()}/m"
    settings = _settings(tmp_path, {"default": "m", "backends": {"m": backend}})
    with caplog.at_level(logging.WARNING, logger="aiwfe.cognitive"):
        backends = Backends(settings)
    assert backends.default_embedding.name == "builtin"
    assert "could not be fetched" in backends.fallback_reason
    assert not list((tmp_path / "models").rglob("model.onnx"))


def test_without_fallback_missing_weights_refuse_to_start(tmp_path: Path) -> None:
    """fallback_to_builtin off: missing weights stop start-up with the same explanation."""
    settings = Settings.model_validate(
        {
            "home": str(tmp_path),
            "cognitive": {"embedding": {"download": False, "fallback_to_builtin": False}},
        }
    )
    with pytest.raises(ConfigError, match="aiwfe models pull"):
        Backends(settings)


def test_weights_in_the_home_are_used_without_a_fetch(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files already under `<home>/models/<model>` load with downloads off, with the
    configured thread count."""
    spec = _tiny_spec(tiny, "http://127.0.0.1:9/unused")
    monkeypatch.setitem(model_store.CATALOGUE, spec.name, spec)
    folder = tmp_path / "models" / spec.name
    folder.mkdir(parents=True)
    for f in ("model.onnx", "tokenizer.json"):
        (folder / f).write_bytes((tiny / f).read_bytes())
    backend = {"kind": "onnx", "model": spec.name, "threads": 1}
    settings = _settings(tmp_path, {"default": "t", "backends": {"t": backend}, "download": False})
    loaded = Backends(settings).default_embedding
    assert loaded.model == f"onnx/{spec.name}"
    assert loaded.embedder.threads == 1  # type: ignore[attr-defined]


def _tiny_spec(tiny: Path, base_url: str) -> model_store.ModelSpec:
    files = tuple(
        model_store.ModelFile(f"files/{name}", name, tiny_model.sha256(tiny / name))
        for name in ("model.onnx", "tokenizer.json")
    )
    return model_store.ModelSpec("tiny-test", base_url, files, tiny_model.DIM, 256)


def test_backend_modules_import_without_a_cycle() -> None:
    """Each backend module imports on its own and never pulls in `cognitive.backends` (the
    registry holds what they share), and every kind is registered once it has."""
    import subprocess
    import sys

    code = (
        "import sys, cognitive.http_backends, cognitive.onnx_backend\n"
        "assert 'cognitive.backends' not in sys.modules, 'cycle'\n"
        "import cognitive.backends\n"
        "from cognitive.registry import embedding_kinds\n"
        "print(embedding_kinds())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['builtin', 'ollama', 'onnx', 'openai']"
