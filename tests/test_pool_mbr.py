"""Pool MBR: hypotheses, evidence weights, penalties and the own-case rule, against scores computed by hand."""

import numpy as np
import pytest

from medcap.config import FuserConfig
from medcap.eval.imageclef import preprocess
from medcap.fuser.pool_mbr import PoolMBR, build_pool, index_hypotheses, ntokens, sentence_hypotheses
from medcap.records import Neighbour, NeighbourList

CAPTIONS = [
    ("Axial CT shows a large mass in the liver. There is no ascites.", "c1"),
    ("Axial CT of the liver with a hypodense mass.", "c2"),
    ("MRI of the brain shows a ring enhancing lesion.", "c3"),
    ("Brain MRI: ring enhancing lesion in the left frontal lobe. Mild edema. No shift.", "c4"),
    ("Chest radiograph with a right lower lobe consolidation.", "c5"),
]


@pytest.fixture(scope="module")
def scorer():
    from medcap.eval.metrics import load_bertscorer

    return load_bertscorer("minilm", batch_size=16, device="cpu")


def test_sentences_and_hypotheses():
    assert sentence_hypotheses("One. Two") == ["One.", "Two"]
    assert sentence_hypotheses("A b c. D e f! G h i?") == ["A b c.", "D e f!", "G h i?", "A b c. D e f!"]
    assert sentence_hypotheses("Only one sentence.") == []
    raw, text, groups = index_hypotheses(CAPTIONS + [("axial ct of the liver with a hypodense mass", "c9")], True)
    assert text[:5] == [preprocess(c) for c, _ in CAPTIONS]  # whole captions first, deduplicated on preprocessed text
    assert groups[1] == {"c2", "c9"}
    assert "there is no ascites" in text and "mild edema" not in text  # fewer than 3 words: not a hypothesis
    assert ntokens("") == 1 and ntokens("a b c") == 3


def _neighbours(qid, order, scores):
    return NeighbourList(qid, tuple(Neighbour(f"i{j}", s, CAPTIONS[j][0]) for j, s in zip(order, scores, strict=True)))


def test_neighbour_mbr_is_classic_mbr(scorer):
    cfg = FuserConfig(name="b", kind="pool-mbr", pool="neighbours", tau=None, genericity=0, length_penalty=0,
                      image_text=0, evidence_k=4)  # fmt: skip
    pool = build_pool(cfg, CAPTIONS, scorer, None, neighbours_only=True)
    fuse = PoolMBR(cfg, pool, scorer, None, {}, {"q": "cq"})
    nl = _neighbours("q", [0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6])
    out = fuse([("q", {}, nl)])[0]
    texts = [preprocess(CAPTIONS[j][0]) for j in range(4)]
    bs = scorer.block(texts, texts)
    expected = [(bs[i].sum() - bs[i, i]) / 3 for i in range(4)]  # mean BERTScore to the other three
    assert out.caption == CAPTIONS[int(np.argmax(expected))][0]
    assert out.extra["score"] == pytest.approx(max(expected), abs=1e-6)


def test_index_pool_scores_every_caption_and_sentence(scorer):
    cfg = FuserConfig(name="p", kind="pool-mbr", tau=0.05, genericity=0.1, length_penalty=0.01, image_text=0,
                      evidence_k=3)  # fmt: skip
    pool = build_pool(cfg, CAPTIONS, scorer, None, neighbours_only=False)
    fuse = PoolMBR(cfg, pool, scorer, None, {}, {"q": "c3"})
    nl = _neighbours("q", [3, 2, 0], [0.9, 0.85, 0.2])
    out = fuse([("q", {"nearest": CAPTIONS[3][0]}, nl)])[0]

    distinct = sorted({preprocess(c) for c, _ in CAPTIONS})
    bs = scorer.block(pool.text, distinct)
    w = np.exp((np.array([0.9, 0.85, 0.2]) - 0.9) / 0.05)
    w /= w.sum()
    cols = [distinct.index(preprocess(CAPTIONS[j][0])) for j in (3, 2, 0)]
    med = np.median([np.log(ntokens(preprocess(CAPTIONS[j][0]))) for j in (3, 2, 0)])
    score = (
        bs[:, cols] @ w
        - 0.1 * bs[:, [distinct.index(preprocess(c)) for c, _ in CAPTIONS]].mean(1)
        - 0.01 * np.abs(np.log([ntokens(t) for t in pool.text]) - med)
    )
    only_c3 = [h for h, g in enumerate(pool.groups) if g == {"c3"}]
    score[only_c3] = -np.inf  # the query's own case wrote these: never offered
    best = int(np.argmax(score))
    assert preprocess(out.caption) == pool.text[best]
    assert out.extra["score"] == pytest.approx(score[best], abs=1e-6)
    assert pool.groups[best] != {"c3"}


def test_a_candidate_outside_the_pool_competes_on_the_same_score(scorer):
    cfg = FuserConfig(name="p", kind="pool-mbr", tau=None, genericity=0, length_penalty=0, image_text=0, evidence_k=2,
                      sentences=False)  # fmt: skip
    pool = build_pool(cfg, CAPTIONS, scorer, None, neighbours_only=False)
    fuse = PoolMBR(cfg, pool, scorer, None, {}, {"q": "cq"})
    nl = _neighbours("q", [2, 3], [0.9, 0.9])
    merged = "MRI of the brain: ring enhancing lesion in the left frontal lobe."
    out = fuse([("q", {"gen": merged}, nl)])[0]
    distinct = sorted({preprocess(c) for c, _ in CAPTIONS})
    cols = [distinct.index(preprocess(CAPTIONS[j][0])) for j in (2, 3)]
    mine = scorer.block([preprocess(merged)], distinct)[0, cols].mean()
    pooled = scorer.block(pool.text, distinct)[:, cols].mean(1).max()
    assert out.extra["score"] == pytest.approx(max(mine, pooled), abs=1e-6)
    assert (out.caption == merged) == (mine > pooled) and (out.extra["source"] == "gen") == (mine > pooled)
    # with the candidate's own words as the evidence, it wins over every index caption
    nl2 = NeighbourList("q", (Neighbour("i2", 0.9, CAPTIONS[2][0]),))
    out2 = fuse([("q", {"gen": merged}, nl2)])[0]
    assert out2.caption == CAPTIONS[2][0]  # the pool's exact match scores 1: nothing beats it
    assert out2.extra["score"] == pytest.approx(1.0, abs=1e-6)
