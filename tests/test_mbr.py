"""Training-free fusion: MBR picks the hand-computed winner; reranking picks the closest caption."""

import numpy as np
import pytest

from medcap.config import FuserConfig
from medcap.fuser.mbr import mbr_fuse, rerank_fuse


def test_mbr_picks_the_hand_computed_winner_with_rouge1():
    cands = {
        "a": "ct of the chest shows a mass",  # 7 words: all 7 in b, 5 in c
        "b": "ct of the chest shows a small mass",  # 8 words
        "c": "mri of the brain shows a mass",  # 7 words
    }
    # ROUGE-1 F1 by hand: a-b = 2*7/(7+8) = 0.933, a-c = 2*5/14 = 0.714, b-c = 2*5/15 = 0.667
    # expected utility: a = (0.933+0.714)/2 = 0.824, b = 0.800, c = 0.690 -> a wins
    [out] = mbr_fuse(FuserConfig(name="mbr", utility="rouge1"), [("img1", cands)])
    assert (out.id, out.caption, out.generator, out.extra["source"]) == ("img1", cands["a"], "mbr", "a")
    assert out.extra["utility"] == pytest.approx((14 / 15 + 10 / 14) / 2, abs=1e-6)


def test_mbr_with_one_or_two_candidates_keeps_the_first():
    cfg = FuserConfig()
    assert mbr_fuse(cfg, [("x", {"g": "only one"})])[0].caption == "only one"
    assert mbr_fuse(cfg, [("x", {"g1": "first caption", "g2": "second caption"})])[0].extra["source"] == "g1"
    with pytest.raises(ValueError, match="image x: no candidates"):
        mbr_fuse(cfg, [("x", {})])


def test_mbr_with_embedding_utility_prefers_the_paraphrase_cluster():
    cands = {
        "a": "A large mass in the left lung.",
        "b": "There is a big mass in the left lung.",
        "c": "Normal brain MRI without abnormality.",
    }
    [out] = mbr_fuse(FuserConfig(utility="embedding"), [("q", cands)])
    assert out.extra["source"] in ("a", "b")


class FakeTextEncoder:
    """A bag-of-letters text embedding: enough to check that reranking takes the argmax cosine."""

    def encode_texts(self, texts):
        vecs = np.array([[t.count(c) for c in "abc"] for t in texts], dtype=np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def test_rerank_picks_the_caption_closest_to_the_image():
    image = np.array([0.0, 1.0, 0.0], dtype=np.float32)  # "b"-like
    [out] = rerank_fuse(
        FuserConfig(name="rr", kind="rerank"),
        [("q", {"g1": "aaa", "g2": "bbb a", "g3": "ccc"})],
        {"q": image},
        FakeTextEncoder(),
    )
    assert out.extra["source"] == "g2" and out.generator == "rr"
    assert out.extra["similarity"] == pytest.approx(3 / np.sqrt(10), abs=1e-5)
