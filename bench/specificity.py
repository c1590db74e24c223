"""Benchmark of the specificity figures' caption x reference BERTScore matrix (MiniLM, the offline model).

    python bench/specificity.py [--n 200] [--big 1800] [--sample 1000]     (--n 0 / --big 0: skip a part)

Part 1 scores n captions against n references (n^2 pairs) two ways on the same texts: the
baseline is bert-score's own batched ``BERTScorer.score`` over the flattened pairs (what
``shared/tools/reference_score.py`` does); medcap's :meth:`BertScorer.block` embeds each text once
and matches whole blocks in one matrix product. It prints both times, the speed-up, and the
largest difference (bert-score's batches pad with zero similarities, medcap's padding never wins:
the two differ only where a token's best cosine is negative).
Part 2 times :func:`specificity` on ``--big`` captions exactly (n^2 pairs) and sampled
(n x (sample + group) pairs) and prints the estimate's error against the exact figures.
Texts: MedPix 2.0 captions from ``../shared/data/medpix2`` (train, then valid), or phantom-style
generated captions when the data is absent.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medcap.eval.imageclef import preprocess  # noqa: E402
from medcap.eval.metrics import load_bertscorer, resolve_bertscore_model  # noqa: E402
from medcap.eval.specificity import SpecificityConfig, specificity  # noqa: E402

MEDPIX = Path(__file__).resolve().parents[2] / "shared" / "data" / "medpix2"


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` preprocessed captions: MedPix's when present, else generated ones."""
    texts: list[str] = []
    for split in ("train", "valid"):
        path = MEDPIX / f"{split}_captions.csv"
        if path.is_file():
            with path.open(newline="") as f:
                texts += [row["Caption"] for row in csv.DictReader(f)]
    if len(texts) < n:
        rng = np.random.default_rng(seed)
        organs, findings = ["chest", "brain", "liver", "knee", "kidney"], ["a mass", "no lesion", "a cyst", "fluid"]
        texts += [
            f"{rng.choice(['CT', 'MRI', 'X-ray'])} of the {rng.choice(organs)} shows {rng.choice(findings)} ({k} mm)"
            for k in range(n - len(texts))
        ]
    return [preprocess(t) for t in texts[:n]]


def part1(n: int) -> None:
    import bert_score
    import torch

    refs = captions(2 * n)
    hyps, refs = refs[n:], refs[:n]  # other captions of the set: the "others" of specificity
    model_type, layers = resolve_bertscore_model("minilm", None)
    start = time.perf_counter()
    baseline = bert_score.BERTScorer(model_type=model_type, num_layers=layers, device="cpu")
    load_base = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        flat = baseline.score([h for h in hyps for _ in refs], [r for _ in hyps for r in refs])[2]
    t_base = time.perf_counter() - start
    scorer = load_bertscorer("minilm", device="cpu")
    start = time.perf_counter()
    matrix = scorer.block(hyps, refs)
    t_block = time.perf_counter() - start
    diff = np.abs(matrix - flat.numpy().reshape(n, n))
    print(f"part 1: {n} x {n} = {n * n:,} pairs (model load {load_base:.1f} s, not timed)")
    print(f"  bert-score BERTScorer.score (flattened pairs): {t_base:8.2f} s")
    print(f"  medcap BertScorer.block:                        {t_block:8.2f} s   speed-up x{t_base / t_block:.1f}")
    print(f"  max |difference| {diff.max():.4f}; pairs differing by > 1e-4: {(diff > 1e-4).mean():.2%}")


def part2(n: int, sample: int) -> None:
    texts = captions(n + 1)
    hyps, refs = texts[1:] + texts[:1], texts[:n]  # each caption is another image's: specificity near 0
    hyps = hyps[:n]
    scorer = load_bertscorer("minilm", device="cpu")
    scorer.embed(hyps + refs)  # embeddings are shared by both runs: time the matching only
    start = time.perf_counter()
    exact = specificity(scorer, hyps, refs, cfg=SpecificityConfig(exact_max=n))
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    est = specificity(scorer, hyps, refs, cfg=SpecificityConfig(exact_max=0, sample=sample))
    t_sample = time.perf_counter() - start
    err = est.specificity - exact.specificity
    print(f"part 2: {n} captions, exact ({n * n:,} pairs) against sampled ({sample} references per caption)")
    print(f"  exact {t_exact:.1f} s, sampled {t_sample:.1f} s: x{t_exact / t_sample:.1f}")
    print(
        f"  specificity: exact {exact.specificity.mean():+.5f}, sampled {est.specificity.mean():+.5f};"
        f" per-image error sd {err.std():.5f}, max {np.abs(err).max():.5f}"
    )
    print(f"  median own rank: exact {exact.median_rank:.0f}, sampled {est.median_rank:.0f} (of {n})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--big", type=int, default=1800)
    parser.add_argument("--sample", type=int, default=1000)
    args = parser.parse_args()
    if args.n:
        part1(args.n)
    if args.big:
        part2(args.big, args.sample)


if __name__ == "__main__":
    main()
