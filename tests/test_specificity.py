"""BertScorer blocks against bert-score, and the specificity figures against their definitions."""

import numpy as np
import pytest

from medcap.eval.bertscore import BertScorer, idf_weights
from medcap.eval.imageclef import preprocess
from medcap.eval.specificity import SpecificityConfig, distinct_captions, specificity

CAPTIONS = [
    "CT of the chest shows a mass in the left lung.",
    "MRI of the brain: no infarct.",
    "Chest X-ray with pleural effusion.",
    "Axial CT of the abdomen shows free fluid.",
    "MRI of the knee shows a torn meniscus.",
    "CT of the head shows a subdural hematoma.",
    "Ultrasound of the liver shows a cyst.",
    "Chest X-ray: pneumothorax on the right.",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A seeded random 2-layer BERT (hidden 32) with a WordPiece vocabulary of the caption words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("models") / "tiny_bert"
    path.mkdir()
    words = sorted({w for s in CAPTIONS for w in preprocess(s).split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).eval().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def scorer(tiny_bert) -> BertScorer:
    return BertScorer(tiny_bert, 2, batch_size=3, device="cpu")


REFS = [preprocess(c) for c in CAPTIONS]
HYPS = [preprocess(c) for c in CAPTIONS[3:] + CAPTIONS[:3]]


def test_block_equals_bert_score_one_pair_at_a_time(scorer, tiny_bert):
    import bert_score

    matrix = scorer.block(HYPS[:2], REFS[:3], "f1")
    recall = scorer.block(HYPS[:2], REFS[:3], "recall")
    for i in range(2):
        for j in range(3):
            # alone, a pair has no padding: bert-score's numbers without its batch effects
            p, r, f = bert_score.score([HYPS[i]], [REFS[j]], model_type=tiny_bert, num_layers=2, device="cpu")
            assert matrix[i, j] == pytest.approx(f.item(), abs=1e-5)
            assert recall[i, j] == pytest.approx(r.item(), abs=1e-5)


def test_block_matches_pairs_with_idf_and_blanks(scorer):
    scorer.idf = idf_weights(scorer.tokenizer, REFS)
    try:
        hyps, refs = [*HYPS[:4], "", HYPS[0]], [*REFS[:3], "", "   "]
        matrix = scorer.block(hyps, refs)
        for i, h in enumerate(hyps):
            assert matrix[i] == pytest.approx(scorer.pairs([h] * len(refs), refs)[:, 2], abs=1e-5)
        assert matrix[4, 3] == 1.0 and matrix[4, 4] == 1.0  # blank against blank: the organisers' 1
        assert matrix[4, 0] == 0.0 and matrix[0, 3] == 0.0  # blank against text: 0
        assert np.array_equal(matrix[0], matrix[5])  # the same text gives the same row
    finally:
        scorer.idf = None
    with pytest.raises(ValueError, match="measure"):
        scorer.block(HYPS, REFS, "recal")


def test_specificity_is_the_definition(scorer):
    result = specificity(scorer, HYPS, REFS)
    matrix = scorer.block(HYPS, REFS)
    n = len(REFS)
    for i in range(n):
        others = [matrix[i, j] for j in range(n) if j != i]
        assert result.specificity[i] == pytest.approx(matrix[i, i] - np.mean(others))
        assert result.own_rank[i] == 1 + sum(v > matrix[i, i] for v in others)
    assert result.exact and result.compared == n - 1
    assert result.median_rank == float(np.median(result.own_rank))


def test_perfect_and_constant_captions(scorer):
    perfect = specificity(scorer, REFS, REFS)
    assert np.all(perfect.own_rank == 1.0) and np.all(perfect.specificity > 0)
    constant = specificity(scorer, [HYPS[0]] * len(REFS), REFS)
    # a caption that is the same for every image: its mean specificity is 0 by construction
    assert constant.specificity.mean() == pytest.approx(0.0, abs=1e-12)
    assert constant.median_rank > 1
    assert distinct_captions([HYPS[0]] * 8) == 1 and distinct_captions(["a", "A", "a "]) == 3


def test_sampled_estimate(scorer):
    exact = specificity(scorer, HYPS, REFS)
    # drawing every reference for every group gives the exact figures
    full = specificity(scorer, HYPS, REFS, cfg=SpecificityConfig(exact_max=2, sample=len(REFS), group=3))
    assert not full.exact and full.compared == len(REFS) - 1
    assert full.specificity == pytest.approx(exact.specificity, abs=1e-9)
    assert full.own_rank == pytest.approx(exact.own_rank)
    # a smaller draw: the same seed gives the same estimate, ranks stay within 1..n
    cfg = SpecificityConfig(exact_max=2, sample=5, group=2, seed=3)
    a, b = specificity(scorer, HYPS, REFS, cfg=cfg), specificity(scorer, HYPS, REFS, cfg=cfg)
    assert np.array_equal(a.specificity, b.specificity) and np.array_equal(a.own_rank, b.own_rank)
    assert np.all((a.own_rank >= 1) & (a.own_rank <= len(REFS)))
    assert a.own == pytest.approx(exact.own, abs=1e-6)


def test_bad_inputs(scorer):
    with pytest.raises(ValueError, match="one reference per caption"):
        specificity(scorer, HYPS, REFS[:3])
    with pytest.raises(ValueError, match="at least two"):
        specificity(scorer, HYPS[:1], REFS[:1])
