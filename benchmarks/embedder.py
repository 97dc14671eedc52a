"""Benchmark for the cognitive service's embedders (`--scenario embedder`).

Measures the built-in hashing embedder's throughput (texts/s, one core, batches of 64) and
retrieval quality on a small labelled set embedded in this file against random vectors, then
the default onnx embedder beside it (`benchmarks/onnx_embedder.py`: recall@10, texts/s at
batch 32, cognitive's idle RSS and cold start).

Run ``python benchmarks/embedder.py [seconds]`` from the repository root. Absolute numbers depend
on the machine; compare figures only across runs on the same host.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Allow running as a plain script from anywhere without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import onnx_embedder
from cognitive.builtin_embedder import HashingEmbedder

BATCH_SIZE = 64
RANDOM_BASELINE_DRAWS = 20

# Ten topics with six short documents each. Queries are phrased differently from the documents
# but share some vocabulary or morphology (e.g. "baking" vs "bake", "planted" vs "plants"), which
# is what a lexical model can exploit; pure synonyms would defeat it by design.
CORPUS: dict[str, list[str]] = {
    "baking": [
        "Bake the sourdough loaf at a high oven temperature for a crisp crust.",
        "Knead the bread dough until it is smooth and elastic, then let it rise.",
        "Yeast ferments the sugars in flour, producing gas that makes dough rise.",
        "A pinch of salt strengthens gluten and improves the flavour of bread.",
        "Cool the baked loaf on a wire rack before slicing it.",
        "Proofing baskets help a round loaf keep its shape while the dough rises.",
    ],
    "running": [
        "Marathon runners build endurance with long slow runs every weekend.",
        "Interval training alternates fast running with short recovery jogs.",
        "Good running shoes cushion the impact of each stride on hard roads.",
        "Stretch your hamstrings and calves after a run to reduce soreness.",
        "A beginner runner should increase weekly mileage gradually to avoid injury.",
        "Race pace is the speed a runner expects to hold during a competition.",
    ],
    "gardening": [
        "Plant tomato seedlings after the last frost when the soil has warmed.",
        "Compost enriches garden soil with organic matter and nutrients.",
        "Water vegetable beds deeply in the morning so roots grow downward.",
        "Mulch around the plants suppresses weeds and keeps moisture in the soil.",
        "Prune rose bushes in late winter to encourage healthy new growth.",
        "Rotate crops each season to keep soil diseases from building up.",
    ],
    "python": [
        "Python functions are defined with the def keyword and can return values.",
        "A virtual environment isolates the packages installed for each project.",
        "List comprehensions build a new list by transforming items of an iterable.",
        "Use pytest to write unit tests and run them from the command line.",
        "Exceptions are raised with raise and handled in try/except blocks.",
        "Type hints document the expected types of function arguments in Python code.",
    ],
    "astronomy": [
        "Telescopes gather light from distant galaxies and faint nebulae.",
        "The planets of the solar system orbit the Sun in elliptical paths.",
        "A light year is the distance light travels in one year through space.",
        "Stars form when clouds of gas collapse under their own gravity.",
        "Astronomers observe supernova explosions to measure cosmic distances.",
        "The Moon's phases depend on how much of its sunlit side faces Earth.",
    ],
    "taxes": [
        "File your income tax return before the April deadline to avoid penalties.",
        "Deductions reduce taxable income, lowering the tax you owe.",
        "Keep receipts for business expenses in case the tax office audits you.",
        "Employers withhold income tax from each paycheck during the year.",
        "A refund is issued when more tax was withheld than was owed.",
        "Self-employed workers pay estimated taxes in quarterly instalments.",
    ],
    "cars": [
        "Change the engine oil and oil filter every ten thousand kilometres.",
        "Worn brake pads squeal and reduce the car's stopping power.",
        "Check tyre pressure monthly; underinflated tyres waste fuel.",
        "A flat car battery often needs a jump start or a replacement.",
        "The timing belt must be replaced before it snaps and damages the engine.",
        "Coolant keeps the engine from overheating in summer traffic.",
    ],
    "vaccines": [
        "Vaccines train the immune system to recognise a virus before infection.",
        "A booster dose restores immunity that wanes over time after vaccination.",
        "Clinical trials test a vaccine's safety and efficacy in volunteers.",
        "Herd immunity protects people who cannot be vaccinated themselves.",
        "Mild fever and a sore arm are common side effects after a vaccine shot.",
        "Measles vaccination campaigns have sharply reduced childhood deaths.",
    ],
    "photography": [
        "A wide aperture blurs the background and isolates the subject of a photo.",
        "Shutter speed controls motion blur when photographing moving subjects.",
        "Raise the ISO in dim light, accepting more noise in the image.",
        "The rule of thirds places the subject off centre for a balanced composition.",
        "Shoot in RAW format to keep more detail for editing photographs later.",
        "Golden hour light gives portraits a warm, soft glow.",
    ],
    "guitar": [
        "Tune each guitar string with an electronic tuner before playing.",
        "Practise chord changes slowly until your fingers find the frets easily.",
        "Calluses form on the fingertips after weeks of regular guitar practice.",
        "Fingerpicking patterns let a guitarist play melody and bass together.",
        "Replace old strings when they sound dull or will not stay in tune.",
        "A capo clamps across the frets to change the key of the song.",
    ],
}

QUERIES: dict[str, str] = {
    "baking": "tips for baking bread: kneading, rising and proofing doughs",
    "running": "training plan for a first marathon, how far should runners run",
    "gardening": "when should I plant seedlings and how to improve garden soil",
    "python": "writing tests and typed functions in python projects",
    "astronomy": "how do astronomers measure the distance to faraway stars and galaxies",
    "taxes": "deadline for filing taxes and which expenses are deductible",
    "cars": "my car engine is overheating, should I check the coolant and oil",
    "vaccines": "are vaccinations safe and how long does immunity last after a booster",
    "photography": "photographing portraits: aperture, shutter and lighting settings",
    "guitar": "learning guitar chords and keeping strings tuned",
}

# Words for the synthetic throughput texts: a fixed English-like vocabulary, drawn with a Zipf
# distribution so the embedder's word cache sees a realistic mix of hits and misses.
_VOCAB_SEED_WORDS = " ".join(" ".join(docs) for docs in CORPUS.values()).lower().split()


def _machine() -> dict[str, object]:
    """Describe the host the figures were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """Build ``size`` distinct word-like tokens from corpus words plus random suffixes."""
    base = sorted({w.strip(".,:;'") for w in _VOCAB_SEED_WORDS if w.strip(".,:;'")})
    suffixes = ["", "s", "ed", "ing", "er", "ly", "ness", "ation", "ize", "able"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        stem = base[int(rng.integers(len(base)))]
        word = stem + suffixes[int(rng.integers(len(suffixes)))]
        if word in seen:
            # Mint a new pseudo-word so the vocabulary reaches the requested size.
            word = stem[: max(3, len(stem) - 2)] + "".join(
                chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=3)
            )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _make_texts(
    rng: np.random.Generator, vocab: Sequence[str], count: int, words_per_text: int
) -> list[str]:
    """Sample ``count`` texts of ``words_per_text`` Zipf-distributed words."""
    ranks = np.minimum(rng.zipf(1.2, size=count * words_per_text), len(vocab)) - 1
    tokens = [vocab[int(r)] for r in ranks]
    return [
        " ".join(tokens[i * words_per_text : (i + 1) * words_per_text]) + "." for i in range(count)
    ]


def _throughput(
    make_embedder: Callable[[], HashingEmbedder],
    texts: Sequence[str],
    seconds: float,
    fresh_per_batch: bool = False,
) -> float:
    """Return texts/s embedding ``texts`` in batches until ``seconds`` have elapsed."""
    embedder = make_embedder()
    embedder.embed(texts[:BATCH_SIZE])  # warm-up: imports, allocator, branch caches
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    offset = 0
    while True:
        if fresh_per_batch:
            # A new instance has an empty word cache: this measures the cold hashing path.
            embedder = make_embedder()
        if offset + BATCH_SIZE > len(texts):
            offset = 0
        embedder.embed(texts[offset : offset + BATCH_SIZE])
        offset += BATCH_SIZE
        done += BATCH_SIZE
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def _rank_metrics(
    doc_vectors: np.ndarray,
    doc_labels: Sequence[str],
    query_vectors: np.ndarray,
    query_labels: Sequence[str],
    k: int = 10,
) -> tuple[float, float]:
    """Return mean recall@k and MRR for cosine retrieval of the labelled documents."""
    labels = np.array(doc_labels)
    scores = query_vectors @ doc_vectors.T
    recalls, reciprocal_ranks = [], []
    for qi, label in enumerate(query_labels):
        # Stable sort so ties (e.g. all-zero similarities) resolve identically every run.
        order = np.argsort(-scores[qi], kind="stable")
        relevant = labels[order] == label
        recalls.append(relevant[:k].sum() / relevant.sum())
        reciprocal_ranks.append(1.0 / (int(np.argmax(relevant)) + 1))
    return float(np.mean(recalls)), float(np.mean(reciprocal_ranks))


def _retrieval(dimension: int = 768) -> dict[str, float]:
    """Evaluate the built-in embedder and a random-vector baseline on the labelled set."""
    doc_texts = [doc for docs in CORPUS.values() for doc in docs]
    doc_labels = [topic for topic, docs in CORPUS.items() for _ in docs]
    query_labels = list(QUERIES)
    query_texts = [QUERIES[t] for t in query_labels]

    embedder = HashingEmbedder(dimension)
    recall, mrr = _rank_metrics(
        embedder.embed(doc_texts), doc_labels, embedder.embed(query_texts), query_labels
    )

    # Random unit vectors: the floor any useful embedder must clear. Averaged over several
    # seeded draws so the baseline itself is not a lucky or unlucky single sample.
    rand_recalls, rand_mrrs = [], []
    for seed in range(RANDOM_BASELINE_DRAWS):
        rng = np.random.default_rng(seed)
        docs = rng.standard_normal((len(doc_texts), dimension))
        queries = rng.standard_normal((len(query_texts), dimension))
        docs /= np.linalg.norm(docs, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        r, m = _rank_metrics(docs, doc_labels, queries, query_labels)
        rand_recalls.append(r)
        rand_mrrs.append(m)

    out = {
        "documents": len(doc_texts),
        "queries": len(query_texts),
        "builtin_recall_at_10": recall,
        "builtin_mrr": mrr,
        "random_recall_at_10": float(np.mean(rand_recalls)),
        "random_mrr": float(np.mean(rand_mrrs)),
    }
    return out


def labelled_retrieval(encode: Callable[[list[str]], Any]) -> tuple[float, float]:
    """recall@10 and MRR of any encoder (texts -> unit vectors) on the labelled set."""
    doc_texts = [doc for docs in CORPUS.values() for doc in docs]
    doc_labels = [topic for topic, docs in CORPUS.items() for _ in docs]
    query_labels = list(QUERIES)
    queries = np.asarray(encode([QUERIES[t] for t in query_labels]))
    return _rank_metrics(np.asarray(encode(doc_texts)), doc_labels, queries, query_labels)


def run(seconds: float = 3.0) -> dict:
    """Run the benchmark and return its figures.

    Args:
        seconds: Total wall-clock budget for the throughput measurements, split evenly between
            the short, long and cold-cache scenarios.

    Returns:
        A flat-ish dict: throughput figures in texts/s, retrieval metrics for the built-in
        embedder and the random baseline, and a ``machine`` description.
    """
    rng = np.random.default_rng(20240601)
    vocab = _vocabulary(rng, 20_000)
    short_texts = _make_texts(rng, vocab, 4096, 10)
    long_texts = _make_texts(rng, vocab, 512, 200)
    # Cold path: every word in a batch is new to a freshly created embedder.
    cold_texts = [
        " ".join(f"{vocab[(i * 10 + j) % len(vocab)]}{i}" for j in range(10)) for i in range(4096)
    ]

    share = seconds / 3
    model = HashingEmbedder()
    results: dict = {
        "model": model.model,
        "dimension": model.dimension,
        "batch_size": BATCH_SIZE,
        "short_words_per_text": 10,
        "long_words_per_text": 200,
        "short_texts_per_s": _throughput(HashingEmbedder, short_texts, share),
        "long_texts_per_s": _throughput(HashingEmbedder, long_texts, share),
        "short_cold_cache_texts_per_s": _throughput(
            HashingEmbedder, cold_texts, share, fresh_per_batch=True
        ),
    }
    results.update(_retrieval(model.dimension))
    # The default (onnx) embedder beside the built-in, same texts, same labelled set.
    results["default_vs_builtin"] = onnx_embedder.run(share, short_texts, labelled_retrieval)
    results["machine"] = _machine()
    return results


def main() -> None:
    """Print the benchmark figures."""
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    r = run(seconds)
    m = r["machine"]
    print(f"machine: {m['cpu_count']} CPUs, Python {m['python']}, numpy {m['numpy']}")
    print(f"         {m['platform']}")
    print(f"model:   {r['model']} (batch size {r['batch_size']}, single thread)")
    print("throughput:")
    print(f"  short (~10 words):          {r['short_texts_per_s']:>10,.0f} texts/s")
    print(f"  long (~200 words):          {r['long_texts_per_s']:>10,.0f} texts/s")
    print(f"  short, cold word cache:     {r['short_cold_cache_texts_per_s']:>10,.0f} texts/s")
    print(f"retrieval ({r['documents']} docs, {r['queries']} queries, 6 relevant per query):")
    print(f"  built-in: recall@10 {r['builtin_recall_at_10']:.3f}   MRR {r['builtin_mrr']:.3f}")
    print(
        f"  random:   recall@10 {r['random_recall_at_10']:.3f}   MRR {r['random_mrr']:.3f}"
        f"   (mean of {RANDOM_BASELINE_DRAWS} draws)"
    )
    for line in onnx_embedder.render(r["default_vs_builtin"]):
        print(line)
    print("note: absolute numbers vary with the machine and its load; compare runs on one host.")


if __name__ == "__main__":
    main()
