"""Fetching model files from a local HTTP server: resume with Range, checksum mismatch,
atomic rename; first use through the backend and `aiwfe models pull`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from aiwfe.app.cli import main
from aiwfe.runtime.config import Settings
from cognitive import model_store
from cognitive.backends import Backends
from cognitive.models_command import prefetch
from tests.cognitive import tiny_model


@dataclass
class FileServer:
    """Serves `files` by path; honours `Range: bytes=N-` unless `ignore_range`, and cuts
    the connection after `cut_after` body bytes when set (an interrupted transfer)."""

    files: dict[str, bytes]
    cut_after: int | None = None
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(part[: server.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the peer sees a short body
                    return
                self.wfile.write(part)

            def log_message(self, *args: object) -> None:
                return None

        return Handler


@pytest.fixture
def serve() -> Iterator[FileServer]:
    state = FileServer({})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("tiny"))


def _spec(tiny: Path, base_url: str) -> model_store.ModelSpec:
    files = tuple(
        model_store.ModelFile(f"files/{name}", name, tiny_model.sha256(tiny / name))
        for name in ("model.onnx", "tokenizer.json")
    )
    return model_store.ModelSpec("tiny-test", base_url, files, tiny_model.DIM, 256)


def _publish(serve: FileServer, tiny: Path, prefix: str = "/m") -> None:
    for name in ("model.onnx", "tokenizer.json"):
        serve.files[f"{prefix}/files/{name}"] = (tiny / name).read_bytes()


def test_pull_fetches_checks_and_renames_into_place(serve, tiny, tmp_path) -> None:
    """Both files land under their final names, byte-identical, with no `.part` left."""
    _publish(serve, tiny)
    seen: list[tuple[str, int, int | None]] = []
    folder = model_store.pull(
        _spec(tiny, serve.url + "/m"), tmp_path, progress=lambda *a: seen.append(a)
    )
    for name in ("model.onnx", "tokenizer.json"):
        assert (folder / name).read_bytes() == (tiny / name).read_bytes()
    assert not list(folder.glob("*.part"))
    size = len((tiny / "model.onnx").read_bytes())
    assert ("model.onnx", size, size) in seen  # progress reaches the whole size


def test_interrupted_fetch_resumes_with_a_range_request(serve, tiny, tmp_path) -> None:
    """A cut transfer leaves only `.part` (never the final name); the next pull asks for
    the rest with `Range: bytes=N-` and completes the verified file."""
    body = (tiny / "model.onnx").read_bytes()
    serve.files["/m/files/model.onnx"] = body
    dest = tmp_path / "model.onnx"
    sha = tiny_model.sha256(tiny / "model.onnx")
    serve.cut_after = 100
    with httpx.Client() as client, pytest.raises(model_store.FetchError):
        model_store.download(client, serve.url + "/m/files/model.onnx", dest, sha)
    part = tmp_path / "model.onnx.part"
    assert part.read_bytes() == body[:100]
    assert not dest.exists()
    serve.cut_after = None
    with httpx.Client() as client:
        model_store.download(client, serve.url + "/m/files/model.onnx", dest, sha)
    assert serve.requests[-1] == ("/m/files/model.onnx", "bytes=100-")
    assert dest.read_bytes() == body
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(serve, tiny, tmp_path) -> None:
    """A server that answers 200 to a range request sends the whole file: the stale part
    is overwritten, not appended to."""
    body = (tiny / "tokenizer.json").read_bytes()
    serve.files["/t"] = body
    serve.ignore_range = True
    (tmp_path / "tokenizer.json.part").write_bytes(b"stale bytes")
    with httpx.Client() as client:
        model_store.download(
            client,
            serve.url + "/t",
            tmp_path / "tokenizer.json",
            tiny_model.sha256(tiny / "tokenizer.json"),
        )
    assert serve.requests[-1][1] == "bytes=11-"
    assert (tmp_path / "tokenizer.json").read_bytes() == body


def test_whole_part_is_verified_when_the_server_says_416(serve, tiny, tmp_path) -> None:
    """A part already whole (416 to its range) is checked and renamed, not fetched again."""
    body = (tiny / "tokenizer.json").read_bytes()
    serve.files["/t"] = body
    (tmp_path / "tokenizer.json.part").write_bytes(body)
    with httpx.Client() as client:
        model_store.download(
            client,
            serve.url + "/t",
            tmp_path / "tokenizer.json",
            tiny_model.sha256(tiny / "tokenizer.json"),
        )
    assert (tmp_path / "tokenizer.json").read_bytes() == body


def test_checksum_mismatch_keeps_nothing(serve, tiny, tmp_path) -> None:
    """Bytes that are not the catalogue's file raise ChecksumMismatch and leave neither the
    final file nor a part to resume from."""
    serve.files["/m/files/model.onnx"] = b"not the model" * 100
    dest = tmp_path / "model.onnx"
    with httpx.Client() as client, pytest.raises(model_store.ChecksumMismatch, match="sha256"):
        model_store.download(
            client, serve.url + "/m/files/model.onnx", dest, tiny_model.sha256(tiny / "model.onnx")
        )
    assert not dest.exists()
    assert not (tmp_path / "model.onnx.part").exists()


def test_http_error_is_a_fetch_error(serve, tiny, tmp_path) -> None:
    """A 404 from the mirror is a FetchError naming the URL."""
    with httpx.Client() as client, pytest.raises(model_store.FetchError, match="HTTP 404"):
        model_store.download(client, serve.url + "/nope", tmp_path / "x", "0" * 64)


def test_first_use_fetches_from_the_mirror_into_the_home(
    serve, tiny, tmp_path, monkeypatch
) -> None:
    """An onnx backend whose weights are missing fetches them from its mirror into
    `<home>/models/<model>` at start-up and serves from them."""
    spec = _spec(tiny, "http://127.0.0.1:9/unreachable")
    monkeypatch.setitem(model_store.CATALOGUE, spec.name, spec)
    _publish(serve, tiny, "/mirror")
    backend = {"kind": "onnx", "model": spec.name, "mirror": serve.url + "/mirror"}
    settings = Settings.model_validate(
        {
            "home": str(tmp_path),
            "cognitive": {"embedding": {"default": "t", "backends": {"t": backend}}},
        }
    )
    backends = Backends(settings)
    assert backends.default_embedding.model == f"onnx/{spec.name}"
    assert (tmp_path / "models" / spec.name / "model.onnx").is_file()


def test_first_use_with_a_bad_checksum_falls_back(serve, tiny, tmp_path, monkeypatch) -> None:
    """A mirror serving other bytes is not trusted: the hashing embedder answers and the
    reason names the checksum."""
    spec = _spec(tiny, "http://127.0.0.1:9/unreachable")
    monkeypatch.setitem(model_store.CATALOGUE, spec.name, spec)
    serve.files["/mirror/files/model.onnx"] = b"tampered"
    serve.files["/mirror/files/tokenizer.json"] = (tiny / "tokenizer.json").read_bytes()
    backend = {"kind": "onnx", "model": spec.name, "mirror": serve.url + "/mirror"}
    settings = Settings.model_validate(
        {
            "home": str(tmp_path),
            "cognitive": {"embedding": {"default": "t", "backends": {"t": backend}}},
        }
    )
    backends = Backends(settings)
    assert backends.default_embedding.name == "builtin"
    assert "sha256" in backends.fallback_reason
    assert not (tmp_path / "models" / spec.name / "model.onnx").exists()


def test_models_pull_command(serve, tiny, tmp_path, monkeypatch, capsys) -> None:
    """`aiwfe models pull --model M --mirror URL` fetches into the home and says where;
    a failing mirror is one line and exit 1."""
    spec = _spec(tiny, "http://127.0.0.1:9/unreachable")
    monkeypatch.setitem(model_store.CATALOGUE, spec.name, spec)
    monkeypatch.setenv("AIWFE_HOME", str(tmp_path))
    _publish(serve, tiny)
    with pytest.raises(SystemExit) as done:
        main(["models", "pull", "--model", spec.name, "--mirror", serve.url + "/m"])
    assert done.value.code == 0
    out = capsys.readouterr()
    assert f"{spec.name}: ready in {tmp_path / 'models' / spec.name}" in out.out
    assert "model.onnx" in out.err  # progress
    assert (tmp_path / "models" / spec.name / "tokenizer.json").is_file()
    (tmp_path / "models" / spec.name / "model.onnx").unlink()
    with pytest.raises(SystemExit) as failed:
        main(["models", "pull", "--model", spec.name, "--mirror", serve.url + "/gone"])
    assert failed.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 404" in err[0]
    with pytest.raises(SystemExit) as unknown:
        main(["models", "pull", "--model", "no-such-model"])
    assert unknown.value.code == 2
    assert "unknown model no-such-model; known: " in capsys.readouterr().err


def test_up_prefetch_fetches_or_says_how_to_fix(serve, tiny, tmp_path, monkeypatch) -> None:
    """`aiwfe up`'s step fetches the default's weights and names the model in the banner
    line; when the fetch fails the line names the fall-back and the fix."""
    spec = _spec(tiny, "http://127.0.0.1:9/unreachable")
    monkeypatch.setitem(model_store.CATALOGUE, spec.name, spec)
    _publish(serve, tiny)

    def settings(home: Path, mirror: str) -> Settings:
        backend = {"kind": "onnx", "model": spec.name, "mirror": mirror}
        embedding = {"default": "t", "backends": {"t": backend}}
        return Settings.model_validate({"home": str(home), "cognitive": {"embedding": embedding}})

    gone = prefetch(settings(tmp_path / "a", serve.url + "/gone"))
    assert gone.startswith("embedding: built-in hashing embedder"), gone
    assert "HTTP 404" in gone and "aiwfe models pull" in gone
    fetched = prefetch(settings(tmp_path / "b", serve.url + "/m"))
    assert fetched == f"embedding: {spec.name} (onnx, {tmp_path / 'b' / 'models' / spec.name})"


def test_models_pull_checks_the_configured_model(serve, tiny, tmp_path, monkeypatch, capsys):
    """Without --model, `aiwfe models pull` fetches the configured default
    (all-MiniLM-L6-v2) and refuses bytes that fail the catalogue's sha256: exit 1, one
    line, nothing left in the home."""
    monkeypatch.setenv("AIWFE_HOME", str(tmp_path))
    serve.files["/m/onnx/model.onnx"] = (tiny / "model.onnx").read_bytes()
    with pytest.raises(SystemExit) as failed:
        main(["models", "pull", "--mirror", serve.url + "/m"])
    assert failed.value.code == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("aiwfe:")]
    assert len(err) == 1 and err[0].startswith("aiwfe: all-MiniLM-L6-v2: ") and "sha256" in err[0]
    assert serve.requests[0][0] == "/m/onnx/model.onnx"
    assert not list((tmp_path / "models").rglob("model.onnx*"))
