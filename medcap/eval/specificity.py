"""Specificity figures of a caption set: does each caption fit its own image better than the others?

BERTScore alone rewards generic text: on a hidden MedPix split one constant caption for every
image scored above every medcap caption set. So results are read beside three figures:

- **specificity** of caption i: S(c_i, r_i) - mean over j != i of S(c_i, r_j), with S the suite's
  BERTScore (same model, layer, idf weights, measure and preprocessing). A constant caption has
  corpus specificity 0 exactly; a caption that fits its own image better than the others > 0.
- **own rank** of caption i: 1 + the number of other references that score strictly higher with
  c_i than r_i does (1 = the own reference is the best match); the corpus figure is the median.
- **distinct**: the number of distinct captions as written (corpus only).

These are the figures of ``shared/tools/reference_score.py`` (BERTScore F1, no idf, MiniLM
layer 6, exact n x n), which agrees with them on the same inputs (``docs/metrics.md``).

Scoring every caption against every reference costs n^2 pairs: fine up to ``exact_max`` images
(2,000: 4M pairs), not for an ImageCLEF test set (17,237: 297M). Beyond, the images are put in groups
of ``group`` captions of similar length; each group is scored against ``sample`` references drawn
without replacement (an image's own reference is left out of its comparison when drawn), so
each caption is compared with ~``sample`` others drawn uniformly: an unbiased estimate of its
mean over all others and of its rank, ``1 + (n - 1) * share of sampled references scoring higher``.
Why 1,000 is enough: a caption's BERTScore to unrelated references varies little (sd 0.066,
median over the nearest-neighbour captions of MedPix valid, MiniLM F1), so its mean over 1,000
drawn others has a standard error of ~0.002; the corpus specificity's error is at most
0.002 * sqrt(group / n) even if the errors of a group (which share a draw) were fully correlated:
~1.3e-4 at n = 17,237, far below its own bootstrap interval (+-0.013 at n = 191 on MedPix). A
rank is estimated to within (n - 1) / 1000 ranks at the top and ~10% around the median, and the
median over thousands of images is tighter still. The cost is n x (sample + group) pairs, not n^2.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medcap.eval.bertscore import BertScorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecificityConfig:
    """How the caption x reference comparison is sized."""

    exact_max: int = 2000  # every caption against every reference up to this many images
    sample: int = 1000  # beyond: references drawn per group of captions
    group: int = 64  # captions that share one draw (one matrix product)
    seed: int = 0


@dataclass(frozen=True)
class Specificity:
    """Per-image specificity and own-reference rank (in the order of the inputs)."""

    specificity: np.ndarray
    own_rank: np.ndarray
    own: np.ndarray  # the caption's score to its own reference
    compared: int  # other references each caption was compared with (n - 1 when exact, ~sample otherwise)
    exact: bool

    @property
    def median_rank(self) -> float:
        return float(np.median(self.own_rank))


def distinct_captions(captions: Sequence[str]) -> int:
    """How many different captions there are, as written."""
    return len(set(captions))


def specificity(
    scorer: BertScorer,
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    measure: str = "f1",
    cfg: SpecificityConfig | None = None,
) -> Specificity:
    """Specificity and own rank of ``hyps[i]`` (its own reference ``refs[i]``), scored by ``scorer`` as given.

    Texts are scored as they are: preprocess them first, and set the scorer's idf weights, as
    the suite's BERTScore does. Needs at least two images.
    """
    cfg = cfg or SpecificityConfig()
    n = len(hyps)
    if n != len(refs):
        raise ValueError(f"specificity needs one reference per caption: {n} captions, {len(refs)} references")
    if n < 2:
        raise ValueError("specificity needs at least two images (a caption's own reference against the others)")
    if n <= cfg.exact_max:
        matrix = scorer.block(hyps, refs, measure)
        own = np.diag(matrix).copy()
        others = (matrix.sum(axis=1) - own) / (n - 1)
        higher = (matrix > own[:, None]).sum(axis=1)  # the diagonal is never above itself
        return Specificity(own - others, higher + 1.0, own, n - 1, True)
    return _sampled(scorer, hyps, refs, measure, cfg)


def _sampled(
    scorer: BertScorer, hyps: Sequence[str], refs: Sequence[str], measure: str, cfg: SpecificityConfig
) -> Specificity:
    n = len(hyps)
    rng = np.random.default_rng(cfg.seed)
    # groups of similar length pad little in one matrix product; which captions share a draw
    # does not bias anyone's estimate (each draw is uniform and independent of the group)
    order = np.lexsort((rng.permutation(n), [len(h.split()) for h in hyps]))
    spec, rank, own_all = np.empty(n), np.empty(n), np.empty(n)
    k = min(cfg.sample, n)
    compared = []
    for start in range(0, n, cfg.group):
        members = order[start : start + cfg.group]
        drawn = rng.choice(n, size=k, replace=False)
        # the members' own references first, then the draw: one block gives both
        matrix = scorer.block([hyps[i] for i in members], [refs[j] for j in (*members, *drawn)], measure)
        own = matrix[np.arange(len(members)), np.arange(len(members))]
        others = matrix[:, len(members) :]
        keep = drawn[None, :] != members[:, None]  # an image's own reference is not one of its others
        count = keep.sum(axis=1)
        spec[members] = own - np.where(keep, others, 0.0).sum(axis=1) / count
        share = np.where(keep, others > own[:, None], False).sum(axis=1) / count
        rank[members] = 1.0 + (n - 1) * share
        own_all[members] = own
        compared.extend(count.tolist())
    log.info("specificity: %d images, each against ~%d sampled references (exact up to %d)", n, k, cfg.exact_max)
    return Specificity(spec, rank, own_all, int(np.median(compared)), False)
