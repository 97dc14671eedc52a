"""Built-in text embedder that needs no model download.

The cognitive service falls back to this when no neural embedding model is configured. It is a
feature-hashing model: it captures lexical and morphological overlap (shared words, shared word
stems via character n-grams, shared phrases via word bigrams), not deeper semantics such as
synonyms. Its output is deterministic across processes, machines and Python versions, so vectors
stored yesterday stay comparable with vectors computed today.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt

__all__ = ["HashingEmbedder"]

# Bumping this string changes every hash, so it is part of the model name: vectors produced by
# different versions must never be mixed in one collection.
_VERSION = "v1"

# Feature groups. Each group is L2-normalised separately and then scaled by its weight, so the
# many character n-grams of a text cannot drown out its few words (IDF-free weighting by type).
_UNIGRAM, _BIGRAM, _CHARGRAM = 0, 1, 2
_N_GROUPS = 3
_GROUP_WEIGHTS = np.array([1.0, 0.5, 0.8], dtype=np.float64)

# Character n-gram sizes taken from each word wrapped in boundary markers ("<word>").
_CHAR_NGRAM_SIZES = (3, 4, 5)

# Tokens are runs of letters/digits; underscores split too, so snake_case identifiers yield words.
_TOKEN_RE = re.compile(r"[^\W_]+")

# Without IDF, very frequent function words would make unrelated texts look similar. They keep a
# small unigram weight (so a text made only of them still gets a vector) but contribute no
# character n-grams or bigrams. Negations are deliberately absent: they carry meaning.
_STOPWORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its
    itself just me more most my myself of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while
    who whom why will with would you your yours yourself yourselves""".split()
)
_STOPWORD_WEIGHT = 0.2

# Bounded per-instance caches: words follow a Zipf distribution, so a modest cache absorbs most of
# the hashing cost without growing with the corpus.
_WORD_CACHE_SIZE = 32_768
_BIGRAM_CACHE_SIZE = 32_768

_SIGN_SHIFT = np.uint64(63)
_EMPTY_U64 = np.empty(0, dtype=np.uint64)
_EMPTY_U64.setflags(write=False)


def _hash64(data: bytes) -> int:
    """Return a stable unsigned 64-bit hash of ``data``.

    Python's built-in ``hash()`` is salted per process, so it would make vectors irreproducible.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _normalise(text: str) -> str:
    """Return ``text`` NFKC-normalised and case-folded (a stronger, Unicode-aware lower())."""
    return unicodedata.normalize("NFKC", text).casefold()


class HashingEmbedder:
    """Deterministic hashed bag-of-n-grams embedder.

    Features per text: word unigrams, word bigrams, and character 3-5-grams inside each word with
    ``<``/``>`` boundary markers. Term frequencies are damped as ``1 + log(tf)``; each feature is
    hashed with BLAKE2b into ``dimension`` buckets with a hash-derived sign, so colliding features
    cancel on average instead of biasing the dot product.

    Attributes:
        dimension: Length of every embedding vector.
        model: Versioned model name, including the dimension.
    """

    def __init__(self, dimension: int = 768) -> None:
        """Create an embedder.

        Args:
            dimension: Number of hash buckets (vector length); must be positive.

        Raises:
            ValueError: If ``dimension`` is not a positive integer.
        """
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension <= 0:
            raise ValueError(f"dimension must be a positive integer, got {dimension!r}")
        self.dimension: int = dimension
        self.model: str = f"aiwfe-hashing-ngram-{_VERSION}-{dimension}"
        # Caches are built per instance (not module-level) so they die with the embedder.
        self._word_features = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(_word_features)
        self._bigram_hash = functools.lru_cache(maxsize=_BIGRAM_CACHE_SIZE)(_bigram_hash)

    def __repr__(self) -> str:
        """Return a short description."""
        return f"HashingEmbedder(dimension={self.dimension})"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch of texts.

        Args:
            texts: The texts to embed.

        Returns:
            A float32 array of shape ``(len(texts), dimension)``. Each row has unit L2 norm,
            except rows for texts with no features (empty or punctuation/whitespace only), which
            are all zeros.

        Raises:
            TypeError: If ``texts`` is a single string, or an element is not a string.
        """
        if isinstance(texts, str):
            # A str is a Sequence[str]; embedding it character by character is never intended.
            raise TypeError("embed() takes a sequence of strings, not a single string")
        n = len(texts)
        dim = self.dimension
        if n == 0:
            return np.zeros((0, dim), dtype=np.float32)

        # Gather (row, hash, group, base weight) for every feature occurrence. Python only does
        # tokenising and cache lookups; all arithmetic happens below in a few numpy passes.
        word_hashes: list[int] = []
        word_weights: list[float] = []
        word_rows: list[int] = []
        bigram_hashes: list[int] = []
        bigram_rows: list[int] = []
        char_arrays: list[np.ndarray] = []
        char_counts: list[int] = []
        word_features = self._word_features
        bigram_hash = self._bigram_hash
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            previous: str | None = None
            for token in _TOKEN_RE.findall(_normalise(text)):
                uni_hash, weight, chars = word_features(token)
                word_hashes.append(uni_hash)
                word_weights.append(weight)
                word_rows.append(row)
                char_arrays.append(chars)
                char_counts.append(len(chars))
                if weight == 1.0:
                    if previous is not None:
                        bigram_hashes.append(bigram_hash(previous, token))
                        bigram_rows.append(row)
                    previous = token
                else:
                    # A stopword breaks the phrase: "state of the art" yields no bigram.
                    previous = None

        if not word_hashes:
            return np.zeros((n, dim), dtype=np.float32)

        n_chars = sum(char_counts)
        hashes = np.concatenate(
            [
                np.array(word_hashes, dtype=np.uint64),
                np.array(bigram_hashes, dtype=np.uint64),
                np.concatenate(char_arrays) if n_chars else _EMPTY_U64,
            ]
        )
        token_rows = np.array(word_rows, dtype=np.int64)
        rows = np.concatenate(
            [
                token_rows,
                np.array(bigram_rows, dtype=np.int64),
                np.repeat(token_rows, char_counts),
            ]
        )
        groups = np.concatenate(
            [
                np.full(len(word_hashes), _UNIGRAM, dtype=np.int64),
                np.full(len(bigram_hashes), _BIGRAM, dtype=np.int64),
                np.full(n_chars, _CHARGRAM, dtype=np.int64),
            ]
        )
        base = np.concatenate(
            [
                np.array(word_weights, dtype=np.float64),
                np.ones(len(bigram_hashes) + n_chars, dtype=np.float64),
            ]
        )

        # Term frequency per (row, feature). Ranking the hashes first turns (row, hash) into one
        # exact int64 key; two plain sorts measured faster than np.lexsort on (hash, row).
        # The hash identifies the feature (type prefixes keep groups apart), so the group and base
        # weight of a run can be read from any of its elements.
        _, hash_rank = np.unique(hashes, return_inverse=True)
        key = hash_rank.reshape(-1).astype(np.int64) * n + rows
        order = np.argsort(key)
        sorted_key = key[order]
        is_start = np.empty(len(sorted_key), dtype=bool)
        is_start[0] = True
        np.not_equal(sorted_key[1:], sorted_key[:-1], out=is_start[1:])
        starts = np.flatnonzero(is_start)
        tf = np.diff(np.append(starts, len(sorted_key)))
        first = order[starts]
        hashes, rows, groups, base = hashes[first], rows[first], groups[first], base[first]
        values = base * (1.0 + np.log(tf))

        # Scale each (row, group) block to unit norm times the group weight, before hashing, so
        # a block's contribution does not depend on how many features it happened to produce.
        block = rows * _N_GROUPS + groups
        block_sq = np.bincount(block, weights=values * values, minlength=n * _N_GROUPS)
        block_scale = np.zeros_like(block_sq)
        present = block_sq > 0
        block_scale[present] = np.tile(_GROUP_WEIGHTS, n)[present] / np.sqrt(block_sq[present])
        values *= block_scale[block]

        # Signed hashing trick: the top bit picks the sign, the value modulo dim picks the bucket.
        signs = 1.0 - 2.0 * (hashes >> _SIGN_SHIFT).astype(np.float64)
        buckets = (hashes % np.uint64(dim)).astype(np.int64)
        # With weights bincount returns float64; numpy's stub always says intp.
        flat = cast(
            "npt.NDArray[np.float64]",
            np.bincount(rows * dim + buckets, weights=values * signs, minlength=n * dim),
        )
        out = flat.reshape(n, dim)

        norms = np.sqrt(np.einsum("ij,ij->i", out, out))
        # Dividing by 1 keeps featureless rows at exactly zero instead of producing NaN.
        out /= np.where(norms > 0, norms, 1.0)[:, None]
        return out.astype(np.float32)


def _word_features(token: str) -> tuple[int, float, np.ndarray]:
    """Return the unigram hash, unigram weight and character n-gram hashes of one token.

    Args:
        token: A normalised token.

    Returns:
        ``(unigram_hash, weight, char_ngram_hashes)``; stopwords get a reduced weight and no
        character n-grams.
    """
    uni_hash = _hash64(b"w\x00" + token.encode("utf-8"))
    if token in _STOPWORDS:
        return uni_hash, _STOPWORD_WEIGHT, _EMPTY_U64
    marked = f"<{token}>"
    grams = [
        marked[i : i + size] for size in _CHAR_NGRAM_SIZES for i in range(len(marked) - size + 1)
    ]
    chars = np.fromiter(
        (_hash64(b"c\x00" + gram.encode("utf-8")) for gram in grams),
        dtype=np.uint64,
        count=len(grams),
    )
    # The array is shared through the cache, so guard it against accidental in-place edits.
    chars.setflags(write=False)
    return uni_hash, 1.0, chars


def _bigram_hash(first: str, second: str) -> int:
    """Return the hash of the word bigram ``first second``."""
    return _hash64(b"b\x00" + first.encode("utf-8") + b"\x00" + second.encode("utf-8"))
