"""Tests for the built-in hashing embedder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cognitive.builtin_embedder import HashingEmbedder

REPO_ROOT = Path(__file__).resolve().parents[2]

SAMPLE_TEXTS = [
    "The runner was running along the river at dawn.",
    "Quarterly tax filing deadlines for small businesses.",
    "Ünïcödé straße ﬁle 東京タワー",
    "",
]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Return the cosine similarity of two unit (or zero) vectors."""
    return float(np.dot(a, b))


@pytest.fixture(scope="module")
def embedder() -> HashingEmbedder:
    """Provide a default-dimension embedder shared by the module's tests."""
    return HashingEmbedder()


def test_shape_dtype_and_model_name(embedder: HashingEmbedder) -> None:
    """The default embedder returns float32 rows of 768 and names its dimension in the model."""
    out = embedder.embed(SAMPLE_TEXTS)
    assert embedder.dimension == 768
    assert out.shape == (len(SAMPLE_TEXTS), 768)
    assert out.dtype == np.float32
    assert "768" in embedder.model
    assert "hashing" in embedder.model


def test_custom_dimension_is_honoured() -> None:
    """A custom dimension sets both the attribute, the model name and the output width."""
    small = HashingEmbedder(dimension=64)
    out = small.embed(["alpha beta", "gamma"])
    assert small.dimension == 64
    assert small.model.endswith("-64")
    assert out.shape == (2, 64)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "768"])
def test_invalid_dimension_rejected(bad: object) -> None:
    """Non-positive or non-integer dimensions raise ValueError."""
    with pytest.raises(ValueError):
        HashingEmbedder(dimension=bad)  # type: ignore[arg-type]


def test_rows_are_unit_norm(embedder: HashingEmbedder) -> None:
    """Every text with at least one token yields an L2-normalised row."""
    texts = ["a", "the", "x y z", "running " * 50, "Hello, World!", "42"]
    norms = np.linalg.norm(embedder.embed(texts), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "!!! ... ---", "_"])
def test_featureless_text_gives_zero_vector(embedder: HashingEmbedder, text: str) -> None:
    """Texts with no word characters give an all-zero row with no NaN."""
    out = embedder.embed([text, "non empty"])
    assert not np.isnan(out).any()
    assert not out[0].any()
    assert np.linalg.norm(out[1]) == pytest.approx(1.0, abs=1e-5)


def test_empty_batch(embedder: HashingEmbedder) -> None:
    """An empty batch returns a (0, dimension) float32 array."""
    out = embedder.embed([])
    assert out.shape == (0, 768)
    assert out.dtype == np.float32


def test_single_string_rejected(embedder: HashingEmbedder) -> None:
    """Passing a bare string instead of a list raises TypeError rather than embedding chars."""
    with pytest.raises(TypeError):
        embedder.embed("hello world")


def test_non_string_item_rejected(embedder: HashingEmbedder) -> None:
    """A non-string element in the batch raises TypeError."""
    with pytest.raises(TypeError):
        embedder.embed(["ok", 3])  # type: ignore[list-item]


def test_deterministic_across_instances() -> None:
    """Two independent instances produce bit-identical output."""
    a = HashingEmbedder().embed(SAMPLE_TEXTS)
    b = HashingEmbedder().embed(SAMPLE_TEXTS)
    assert a.tobytes() == b.tobytes()


def test_batch_composition_does_not_change_rows(embedder: HashingEmbedder) -> None:
    """A text embeds to the same vector alone as inside a larger, repetitive batch."""
    batch = embedder.embed(SAMPLE_TEXTS + SAMPLE_TEXTS[:2])
    for i, text in enumerate(SAMPLE_TEXTS):
        alone = embedder.embed([text])[0]
        np.testing.assert_allclose(batch[i], alone, rtol=0, atol=1e-7)
    np.testing.assert_allclose(batch[len(SAMPLE_TEXTS)], batch[0], rtol=0, atol=1e-7)


def test_deterministic_across_processes_and_hash_seeds(embedder: HashingEmbedder) -> None:
    """Fresh interpreters with different PYTHONHASHSEED values reproduce the exact bytes."""
    code = (
        "import sys\n"
        "from cognitive.builtin_embedder import HashingEmbedder\n"
        f"texts = {SAMPLE_TEXTS!r}\n"
        "sys.stdout.write(HashingEmbedder().embed(texts).tobytes().hex())\n"
    )
    expected = embedder.embed(SAMPLE_TEXTS).tobytes().hex()
    for seed in ("0", "4242"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stdout == expected


def test_hash_layout_is_stable() -> None:
    """The buckets and signs for a fixed word match recorded values, guarding stored vectors."""
    # If this fails, the model changed: bump _VERSION so old and new vectors are never mixed.
    vec = HashingEmbedder(dimension=64).embed(["Hello"])[0]
    nonzero = np.flatnonzero(vec)
    assert nonzero.tolist() == [11, 19, 32, 35, 42, 44, 50, 53, 56, 59]
    assert np.sign(vec[nonzero]).astype(int).tolist() == [1, 1, 1, -1, -1, -1, 1, 1, 1, 1]


def test_signed_hashing_produces_both_signs(embedder: HashingEmbedder) -> None:
    """Feature signs come from the hash, so a long text has positive and negative components."""
    vec = embedder.embed(["a reasonably long sentence about many different unrelated things"])[0]
    assert (vec > 0).any()
    assert (vec < 0).any()


def test_morphology_scores_higher_than_unrelated(embedder: HashingEmbedder) -> None:
    """Words sharing a stem are closer than words sharing nothing."""
    running, runner, invoice = embedder.embed(["running", "runner", "invoice"])
    assert _cos(running, runner) > _cos(running, invoice) + 0.2


def test_related_sentences_score_higher_than_unrelated(embedder: HashingEmbedder) -> None:
    """A query is closer to a document sharing its vocabulary than to an off-topic one."""
    query, related, unrelated = embedder.embed(
        [
            "how do I reset my account password",
            "Password resets: you can reset the password of your account from settings.",
            "The orchestra performed a symphony by Beethoven last night.",
        ]
    )
    assert _cos(query, related) > 0.3
    assert _cos(query, related) > _cos(query, unrelated) + 0.2


def test_stopwords_alone_do_not_make_texts_similar(embedder: HashingEmbedder) -> None:
    """Sharing only function words counts for little next to sharing content words."""
    base, same_stopwords, same_content = embedder.embed(
        [
            "the cat is on the mat",
            "the tax is on the invoice",
            "a cat sat by a mat",
        ]
    )
    assert _cos(base, same_content) > _cos(base, same_stopwords)


def test_unicode_normalisation_and_case(embedder: HashingEmbedder) -> None:
    """NFKC and case folding make compatibility forms and case variants embed identically."""
    # Ligature "fi", full-width "ABC" and sharp s, written as escapes to keep the source ASCII.
    out = embedder.embed(
        ["\ufb01le \uff21\uff22\uff23 Stra\u00dfe", "FILE abc STRASSE", "e\u0301t\u00e9"]
    )
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-7)
    # Decomposed "é" composes under NFKC, so "été" typed two ways matches too.
    np.testing.assert_allclose(out[2], embedder.embed(["\u00e9t\u00e9"])[0], rtol=0, atol=1e-7)


def test_non_latin_scripts_work(embedder: HashingEmbedder) -> None:
    """Non-Latin text gets a unit vector and shared characters raise similarity."""
    tower, station, greek = embedder.embed(["東京タワー", "東京駅", "καλημέρα κόσμε"])
    for vec in (tower, station, greek):
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    assert _cos(tower, station) > _cos(tower, greek)
