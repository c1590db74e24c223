"""ROUGE-L, BLEU, METEOR, CIDEr and BLEURT against hand-computed values and the libraries' own numbers."""

import math

import pytest

from medcap.eval import text_metrics as tm
from medcap.eval.imageclef import preprocess
from medcap.models.hub import ModelNotFoundError

GTS = {"a": ["The cat is on the mat."], "b": ["A chest X-ray, 2 views"]}
RES = {"a": ["the cat sat on the mat"], "b": ["Chest x ray"]}


def test_bleu1_by_hand_on_two_sentences():
    corpus, per = tm.bleu(GTS, RES, n=1)
    # a: clipped unigram matches the,the,cat,on,mat = 5 of 6, same length -> 5/6
    assert per["a"] == pytest.approx(5 / 6, abs=1e-8)
    # b: reference "a chest xray number views" (5 words), hypothesis "chest x ray": 1 of 3, BP exp(1 - 5/3)
    assert per["b"] == pytest.approx(1 / 3 * math.exp(1 - 5 / 3), abs=1e-8)
    # corpus: 6 of 9 unigrams, BP over total lengths exp(1 - 11/9)
    assert corpus == pytest.approx(6 / 9 * math.exp(1 - 11 / 9), abs=1e-8)
    mean, _ = tm.bleu(GTS, RES, n=1, aggregate="mean")
    assert mean == pytest.approx((per["a"] + per["b"]) / 2)


def test_bleu4_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    corpus, per = tm.bleu(GTS, RES, n=4)
    g = {k: [preprocess(v[0])] for k, v in GTS.items()}
    r = {k: [preprocess(v[0])] for k, v in RES.items()}
    score, scores = Bleu(4).compute_score(g, r, verbose=0)
    assert corpus == pytest.approx(score[3])
    assert [per["a"], per["b"]] == pytest.approx(scores[3])


def test_rouge_l_by_hand():
    _, per = tm.rouge_l(GTS, RES)
    assert per["a"] == pytest.approx(5 / 6)  # LCS "the cat on the mat" = 5 of 6 both ways
    corpus, per = tm.rouge_l({"x": ["b d e"]}, {"x": ["a b c d"]})
    p, r = 2 / 4, 2 / 3  # LCS "b d"
    assert per["x"] == pytest.approx(2 * p * r / (p + r)) == pytest.approx(corpus)


def test_cider_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    gts = {**GTS, "c": ["Axial CT of the chest shows a nodule"]}
    res = {**RES, "c": ["CT of the chest with a nodule"]}
    corpus, per = tm.cider(gts, res)
    g = {k: [preprocess(v[0])] for k, v in gts.items()}
    r = {k: [preprocess(v[0])] for k, v in res.items()}
    score, scores = Cider().compute_score(g, r)
    assert corpus == pytest.approx(score)
    assert list(per.values()) == pytest.approx(list(scores))
    assert per["c"] > per["b"]


def test_preprocessing_numbers_punctuation_case_and_empty():
    gts = {"n": ["Chest X-Ray: 2 views!"], "e": [""], "h": ["lung"]}
    res = {"n": ["chest xray 15 views"], "e": [""], "h": [""]}
    for metric in (tm.rouge_l, lambda g, r: tm.bleu(g, r, n=1)):
        _, per = metric(gts, res)
        assert per["n"] == pytest.approx(1.0, abs=1e-6)  # both become "chest xray number views"
        assert per["e"] == 1.0  # empty on both sides
        assert per["h"] == 0.0  # empty hypothesis
    _, raw = tm.rouge_l({"n": gts["n"]}, {"n": res["n"]}, clean=False)
    assert raw["n"] < 1.0
    _, per = tm.cider(gts, res)
    assert per["e"] == 1.0 and per["h"] == 0.0


def test_ids_must_match():
    with pytest.raises(ValueError, match="same IDs"):
        tm.rouge_l({"a": ["x"]}, {"b": ["x"]})


@pytest.mark.slow  # starts the Meteor jar twice: 5-50 s on a shared 2-core machine
def test_meteor_matches_pycocoevalcap_on_a_tiny_input():
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {**GTS, "e": [""], "h": ["lung"]}
    res = {**RES, "e": [""], "h": [""]}
    corpus, per = tm.meteor(gts, res)
    scorer = Meteor()
    g = {k: [preprocess(v[0])] for k, v in GTS.items()}
    r = {k: [preprocess(v[0])] for k, v in RES.items()}
    _, scores = scorer.compute_score(g, r)
    assert [per["a"], per["b"]] == pytest.approx(scores)
    assert per["e"] == 1.0 and per["h"] == 0.0
    assert corpus == pytest.approx(sum(per.values()) / 4)  # empty pairs: mean of per-image values


def _tiny_regressor(path):
    import torch
    from tiny_models import TINY_BERT_VOCAB
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(TINY_BERT_VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tok.save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(TINY_BERT_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    return model, tok


def test_bleurt_with_a_transformers_regressor_matches_direct_logits(tmp_path):
    import torch

    model, tok = _tiny_regressor(tmp_path / "bleurt")
    gts = {"a": ["Chest X-ray."], "b": ["a lung"]}
    res = {"a": ["chest x ray"], "b": ["the heart"]}
    corpus, per = tm.bleurt(gts, res, checkpoint=str(tmp_path / "bleurt"), device="cpu", batch_size=1)
    refs = [preprocess(gts[k][0]) for k in ("a", "b")]
    hyps = [preprocess(res[k][0]) for k in ("a", "b")]
    with torch.no_grad():
        direct = model(**tok(refs, hyps, padding=True, return_tensors="pt")).logits[:, 0].tolist()
    assert [per["a"], per["b"]] == pytest.approx(direct, abs=1e-5)
    assert corpus == pytest.approx(sum(direct) / 2, abs=1e-5)


def test_bleurt_missing_checkpoint_fails_fast(tmp_path):
    with pytest.raises(ModelNotFoundError, match="BLEURT-20-D12"):
        tm.bleurt({"a": ["x"]}, {"a": ["x"]})  # not in the (offline) hub cache
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        tm.bleurt({"a": ["x"]}, {"a": ["x"]}, checkpoint=str(tmp_path / "nope"))
