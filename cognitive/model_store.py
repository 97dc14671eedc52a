"""Model weights on disk: the catalogue, and fetching files into `<home>/models`.

A file is fetched into `<name>.part` (an interrupted fetch resumes there with an HTTP Range
request), its sha256 checked against the catalogue, then renamed into place atomically, so
a file under its final name is always whole and verified. Shared by the cognitive service
(first use) and `aiwfe models pull` (ahead of time, with a progress bar).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

# Called as (file, bytes so far, total bytes or None) while a file downloads.
Progress = Callable[[str, int, int | None], None]

_CHUNK = 1 << 20
CONNECT_TIMEOUT = 10.0  # seconds: an offline machine must fall back quickly, not hang
READ_TIMEOUT = 60.0


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: where it lives upstream, its local name and its sha256."""

    remote: str  # path under the model's base URL (or a mirror's)
    local: str  # file name under `<home>/models/<model>/`
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    """A sentence-embedding model: where to get it and how its card says to use it."""

    name: str
    base_url: str
    files: tuple[ModelFile, ...]
    dimension: int
    max_tokens: int  # the model card's max_seq_length


# all-MiniLM-L6-v2 (Apache-2.0): 384-d, mean pooling then L2 normalisation (its model card).
# The ONNX export (90,405,214 bytes) and tokenizer (466,247 bytes) its publisher ships, at a
# pinned revision of its Hugging Face repository.
MINILM = ModelSpec(
    name="all-MiniLM-L6-v2",
    base_url=(
        "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/resolve/"
        "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
    ),
    files=(
        ModelFile(
            "onnx/model.onnx",
            "model.onnx",
            "6fd5d72fe4589f189f8ebc006442dbb529bb7ce38f8082112682524616046452",
        ),
        ModelFile(
            "tokenizer.json",
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
    ),
    dimension=384,
    max_tokens=256,
)

CATALOGUE: dict[str, ModelSpec] = {MINILM.name: MINILM}


class FetchError(Exception):
    """A model file could not be fetched or failed its checksum; the message says which."""


class ChecksumMismatch(FetchError):
    """The fetched bytes are not the catalogue's file (the partial file is removed)."""


def model_dir(models_root: Path, spec: ModelSpec) -> Path:
    return models_root / spec.name


def missing_files(models_root: Path, spec: ModelSpec) -> list[ModelFile]:
    """The files of `spec` not yet in place under `models_root`."""
    folder = model_dir(models_root, spec)
    return [f for f in spec.files if not (folder / f.local).is_file()]


def download(
    client: httpx.Client,
    url: str,
    dest: Path,
    sha256: str,
    progress: Progress | None = None,
) -> None:
    """Fetches `url` into `dest`: resumes `dest.part`, checks sha256, renames atomically.

    Raises:
        ChecksumMismatch: the whole file arrived but is not the expected one.
        FetchError: the server could not be reached or answered with an error.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"range": f"bytes={have}-"} if have else {}
    digest = hashlib.sha256()
    try:
        with client.stream("GET", url, headers=headers, follow_redirects=True) as reply:
            if reply.status_code == 416 and have:  # the part is whole already
                _hash_file(part, digest)
            elif reply.status_code >= 400:
                raise FetchError(f"{url} answered HTTP {reply.status_code}")
            else:
                if reply.status_code == 206:
                    _hash_file(part, digest)
                    mode = "ab"
                else:  # 200: the server ignored the range; start over
                    have, mode = 0, "wb"
                _receive(reply, part, mode, have, digest, dest.name, progress)
    except httpx.HTTPError as exc:
        raise FetchError(f"cannot fetch {url}: {exc!r}") from None
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{url} has sha256 {digest.hexdigest()}, expected {sha256}: not the catalogue's "
            "file (removed; check the mirror)"
        )
    os.replace(part, dest)
    _sync_dir(dest.parent)


def pull(
    spec: ModelSpec,
    models_root: Path,
    base_url: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetches the missing files of `spec` (from `base_url`, a mirror, when given) and
    returns the model's folder."""
    base = (base_url or spec.base_url).rstrip("/")
    timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
    folder = model_dir(models_root, spec)
    folder.mkdir(parents=True, exist_ok=True)
    # One fetcher per folder (aiwfe up and a cognitive replica may start together): the
    # second waits, then finds the files in place.
    with (folder / ".lock").open("w") as lock, httpx.Client(timeout=timeout) as client:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for file in missing_files(models_root, spec):
            download(client, f"{base}/{file.remote}", folder / file.local, file.sha256, progress)
    return folder


def _receive(
    reply: httpx.Response,
    part: Path,
    mode: str,
    have: int,
    digest: hashlib._Hash,
    name: str,
    progress: Progress | None,
) -> None:
    """Appends (or writes) the reply's body to `part`, hashing and reporting as it goes."""
    total = _total(reply, have)
    done = have
    with part.open(mode) as out:
        for chunk in reply.iter_bytes():  # as it arrives: a cut keeps all received
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(name, done, total)
        _sync(out)


def _total(reply: httpx.Response, have: int) -> int | None:
    length = reply.headers.get("content-length")
    return have + int(length) if length and length.isdigit() else None


def _hash_file(path: Path, digest: hashlib._Hash) -> None:
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)


def _sync(out: IO[bytes]) -> None:
    out.flush()
    os.fsync(out.fileno())


def _sync_dir(path: Path) -> None:
    """Makes the rename durable (POSIX: the directory entry must reach the disk too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TerminalProgress:
    """A one-line progress bar on a terminal; on anything else a line per 25 %."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._last: tuple[str, int] = ("", -1)
        self._shown = 0.0

    def __call__(self, name: str, done: int, total: int | None) -> None:
        pct = int(done * 100 / total) if total else -1
        if self._tty:
            now = time.monotonic()
            if now - self._shown < 0.1 and pct != 100:
                return
            self._shown = now
            width = 30
            filled = width * max(pct, 0) // 100
            bar = "#" * filled + "." * (width - filled)
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
            end = "\n" if pct == 100 else ""
            self._stream.write(f"\r{name} [{bar}] {size}{end}")
            self._stream.flush()
            return
        step = pct // 25 if pct >= 0 else -1
        if (name, step) != self._last and step >= 0:
            self._last = (name, step)
            self._stream.write(f"{name}: {pct}% of {(total or 0) / 1e6:.1f} MB\n")
            self._stream.flush()
