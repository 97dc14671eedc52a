"""Splits long texts into overlapping chunks, cutting at whitespace where possible."""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s")


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Returns chunks of at most `size` characters, each sharing about `overlap` with the last.

    A chunk ends at the last whitespace in its second half when there is one (so words stay
    whole) and the next one starts at a word boundary `overlap` characters back. Texts that
    fit in one chunk come back whole (stripped).

    Args:
        text: The text to split.
        size: Maximum chunk length in characters.
        overlap: Characters repeated between neighbours; must be under half of `size`.
    """
    if overlap * 2 >= size:
        raise ValueError(f"overlap ({overlap}) must be under half the chunk size ({size})")
    text = text.strip()
    if len(text) <= size:
        return [text] if text else []
    chunks: list[str] = []
    start = 0
    # Each pass advances by at least size/2 - overlap > 0 characters: bounded by len(text).
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = _last_space(text, start + size // 2, end)
            if cut is not None:
                end = cut
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        next_start = end - overlap
        space = _SPACE.search(text, next_start, end)
        start = space.end() if space else next_start
    return chunks


def _last_space(text: str, lo: int, hi: int) -> int | None:
    for i in range(hi - 1, lo - 1, -1):
        if text[i].isspace():
            return i
    return None
