"""Chunking of long texts: bounded size, overlap, whole words, full coverage."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cognitive.chunking import chunk_text
from cognitive.http_backends import error_message


def test_short_text_is_one_chunk() -> None:
    """A text within the chunk size comes back whole and stripped."""
    assert chunk_text("  hello world  ", 100, 20) == ["hello world"]
    assert chunk_text("   ", 100, 20) == []


def test_long_text_chunks_overlap_at_word_boundaries() -> None:
    """Chunks stay within size, cut between words, and repeat the previous chunk's tail."""
    text = " ".join(f"w{i}" for i in range(400))
    chunks = chunk_text(text, 200, 50)
    assert len(chunks) > 5
    assert all(len(c) <= 200 for c in chunks)
    words = set(text.split())
    for a, b in itertools.pairwise(chunks):
        assert set(a.split()) <= words and set(b.split()) <= words  # no word cut in half
        assert a.split()[-1] in b.split()  # overlap
    assert chunks[0].startswith("w0 ") and chunks[-1].endswith("w399")


def test_overlap_must_be_under_half_the_size() -> None:
    """An overlap that could stall progress is refused."""
    with pytest.raises(ValueError):
        chunk_text("x" * 500, 100, 50)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=3000), st.integers(100, 400), st.integers(0, 49))
def test_chunks_cover_every_word(text: str, size: int, overlap: int) -> None:
    """Every non-space character run of the input appears in some chunk; sizes are bounded."""
    chunks = chunk_text(text, size, overlap)
    assert all(0 < len(c) <= size for c in chunks)
    joined = " ".join(chunks)
    for word in text.split():
        if len(word) <= size // 2:
            assert word in joined


def test_error_message_reads_ollama_and_openai_bodies() -> None:
    """Both error body shapes and plain text yield the human message."""
    assert error_message('{"error": "model not found"}') == "model not found"
    assert error_message('{"error": {"message": "bad key", "type": "auth"}}') == "bad key"
    assert error_message("upstream timeout") == "upstream timeout"
    assert error_message("") == "(empty body)"
