"""The imageclef2026 suite end to end on tiny models: the means, the specificity figures, the not-comparable flags."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from factuality_models import make_tiny_medcat_pack
from PIL import Image

from medcap.config import EvalConfig
from medcap.eval import metrics as base
from medcap.eval.suites import run_suite, suite_config
from medcap.records import Example

REFS = {
    "a": "The patient has pneumonia and asthma in the lungs.",
    "b": "MRI of the brain: no infarct.",
    "c": "Chest X-ray with pleural effusion.",
    "d": "CT of the chest shows 2 nodules.",
}
HYPS = {"a": "Pneumonia of the brain.", "b": "MRI of the brain.", "c": "Chest X-ray with pleural effusion", "d": ""}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny BERT (BERTScore) and a tiny BERT regressor standing in for a BLEURT checkpoint."""
    import torch
    from tiny_models import make_tiny_bert
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    base_dir = tmp_path_factory.mktemp("models")
    bert = make_tiny_bert(base_dir / "bert")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt"), model_max_length=64).save_pretrained(bert)
    bleurt = base_dir / "bleurt"
    config = BertConfig.from_pretrained(bert, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(bleurt)
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt"), model_max_length=64).save_pretrained(bleurt)
    return bert, bleurt


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = {}
    for i, caption in REFS.items():
        path = tmp_path_factory.mktemp("img") / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        out[i] = Example(i, path, caption)
    return out


def _overrides(tiny_clip, bleurt, **more):
    return {"clip_encoder": {"name": tiny_clip, "device": "cpu"}, "bleurt_checkpoint": str(bleurt)} | more


@pytest.mark.factuality
@pytest.mark.skipif(importlib.util.find_spec("medcat") is None, reason="MedCAT is not installed")
def test_2026_suite(tiny_models, examples, tiny_clip, tmp_path, monkeypatch):
    bert, bleurt = tiny_models
    pack = make_tiny_medcat_pack(tmp_path / "medcat")
    loads = []
    real_load = base.load_bertscorer
    monkeypatch.setattr(base, "load_bertscorer", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    result = run_suite(
        "imageclef2026",
        REFS,
        HYPS,
        examples=examples,
        eval_cfg=EvalConfig(bertscore_model=str(bert), bertscore_num_layers=2, device="cpu", bootstrap=50),
        overrides=_overrides(tiny_clip, bleurt, medcat_model_pack=str(pack)),
    )
    table = result.per_image
    assert len(loads) == 1  # BERTScore and the specificity figures share one loaded model
    for name in ("bertscore", "rouge1", "similarity", "bleurt", "medcat", "relevance"):
        assert result.metrics[name] == pytest.approx(table[name].mean())
    parts = table[["bertscore", "rouge1", "similarity", "bleurt"]].mean(axis=1)
    assert table["relevance"].tolist() == pytest.approx(parts.tolist())
    assert table.loc["a", "medcat"] == pytest.approx(0.4)  # pneumonia of {pneumonia, asthma, lung}: P 1/2, R 1/3
    assert table.loc["d", "similarity"] == 0.0 and table.loc["d", "medcat"] == 0.0  # an empty caption
    # without an AlignScore checkpoint: skipped, and so are Factuality and Overall
    assert "AlignScore-base.ckpt" in result.skipped["alignscore"]
    assert "alignscore" in result.skipped["factuality"] and "factuality" in result.skipped["overall"]
    # the figures beside the metrics
    assert result.metrics["distinct"] == 4.0
    assert result.metrics["specificity"] == pytest.approx(table["specificity"].mean())
    assert result.metrics["median_rank"] == float(np.median(table["own_rank"]))
    assert "specificity" in result.ci and "median_rank" in result.ci and "own_rank" not in result.ci
    assert result.settings["specificity"] == {"exact": True, "compared": 3, "exact_max": 2000, "sample": 1000}
    # tiny stand-ins everywhere: every metric and the mean that includes them is flagged
    flags = result.not_comparable
    assert "MedImageInsight" in flags["similarity"] and "not comparable" in flags["similarity"]
    assert set(flags) == {"bertscore", "similarity", "bleurt", "medcat", "relevance"}
    assert "similarity" in flags["relevance"]
    summary = result.summary()
    assert summary["not_comparable"] == flags and summary["suite"] == "imageclef2026"
    json.dumps(summary)  # what a scores file holds must be plain JSON


def test_2026_settings_come_from_eval_config_fields(tmp_path):
    """A future EvalConfig field of the same name reaches the suite without the stage passing it."""

    @dataclasses.dataclass
    class Eval2026(EvalConfig):
        medcat_model_pack: str | None = None
        specificity_sample: int = 1000

    cfg = suite_config({"specificity_sample": 7}, Eval2026(medcat_model_pack="pack.zip", specificity_sample=99))
    assert cfg.medcat_model_pack == "pack.zip" and cfg.specificity_sample == 7  # overrides win
    result = run_suite(
        "imageclef2026",
        REFS,
        HYPS,
        eval_cfg=Eval2026(medcat_model_pack=str(tmp_path / "absent.zip")),
        overrides={"metrics": ["rouge1", "medcat"], "bootstrap": 0},
    )
    assert "absent.zip" in result.skipped["medcat"] and "UMLS" in result.skipped["medcat"]
    assert "BERTScore" in result.skipped["specificity"]


@pytest.mark.factuality
@pytest.mark.skipif(
    importlib.util.find_spec("alignscore") is None or importlib.util.find_spec("medcat") is None,
    reason="the factuality packages are not installed",
)
def test_2026_overall_with_every_backend(tiny_models, examples, tiny_clip, tmp_path, monkeypatch):
    import nltk
    from factuality_models import make_sentence_tools, make_tiny_alignscore

    bert, bleurt = tiny_models
    backbone, ckpt = make_tiny_alignscore(tmp_path)
    nltk_data, spacy_dir = make_sentence_tools(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(nltk_data), *nltk.data.path])
    monkeypatch.chdir(spacy_dir)  # AlignScore's package loads en_core_web_sm by name
    more = {
        "medcat_model_pack": str(make_tiny_medcat_pack(tmp_path / "medcat")),
        "alignscore_checkpoint": str(ckpt),
        "alignscore_model": str(backbone),
    }
    result = run_suite(
        "imageclef2026",
        REFS,
        HYPS,
        examples=examples,
        eval_cfg=EvalConfig(bertscore_model=str(bert), bertscore_num_layers=2, device="cpu", bootstrap=0),
        overrides=_overrides(tiny_clip, bleurt, **more),
    )
    table = result.per_image
    assert not {"alignscore", "factuality", "overall"} & set(result.skipped)
    assert table["factuality"].tolist() == pytest.approx(table[["medcat", "alignscore"]].mean(axis=1).tolist())
    assert table["overall"].tolist() == pytest.approx(table[["relevance", "factuality"]].mean(axis=1).tolist())
    assert result.metrics["overall"] == pytest.approx((result.metrics["relevance"] + result.metrics["factuality"]) / 2)
    assert table.loc["d", "alignscore"] == 0.0  # an empty caption claims nothing
    assert {"alignscore", "factuality", "overall"} <= set(result.not_comparable)
