"""Metric suites: skipped metrics, means, intervals, Parquet and CLIPScore against direct cosines."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medcap.config import EncoderConfig, EvalConfig
from medcap.eval.suites import SUITES, run_suite, save_per_image
from medcap.records import Example

REFS = {"a": "Chest X-ray shows 2 nodules.", "b": "Axial CT of the abdomen", "c": "MRI of the brain", "x": None}
HYPS = {"a": "chest x-ray with nodules", "b": "CT of the abdomen", "c": "brain MRI", "extra": "ignored"}


def test_suites_are_registered():
    assert set(SUITES) >= {"imageclef2023", "imageclef2024", "imageclef2025", "imageclef2026"}
    assert SUITES["imageclef2026"].means == {
        "relevance": ("bertscore", "rouge1", "similarity", "bleurt"),
        "factuality": ("medcat", "alignscore"),
        "overall": ("relevance", "factuality"),
    }
    assert SUITES["imageclef2026"].bertscore_idf and SUITES["imageclef2026"].bertscore_measure == "f1"
    assert SUITES["imageclef2025"].bertscore_idf and not SUITES["imageclef2023"].bertscore_idf
    assert SUITES["imageclef2025"].means["primary"] == ("bertscore", "rouge1", "similarity")


def test_2024_suite_text_metrics_and_skipped_models(tmp_path):
    cfg = EvalConfig(bertscore_model=str(tmp_path / "missing-bert"), bertscore_num_layers=2)
    result = run_suite(
        "imageclef2024",
        REFS,
        HYPS,
        eval_cfg=cfg,
        overrides={
            "metrics": ["rouge1", "rougeL", "bleu1", "cider", "bertscore", "bleurt", "clipscore", "medbertscore"]
        },
    )
    assert result.n == 3
    assert set(result.metrics) == {"rouge1", "rougeL", "bleu1", "cider", "distinct"}
    assert result.metrics["distinct"] == 3.0
    assert "BERTScore" in result.skipped["specificity"] and "median_rank" in result.skipped
    assert result.not_comparable == {}  # no public 2024 evaluator names its models
    for name in ("bertscore", "bleurt", "clipscore", "medbertscore"):
        assert name in result.skipped and result.skipped[name]
        assert name not in result.per_image.columns
    assert "images" in result.skipped["clipscore"]
    assert "BLEURT-20-D12" in result.skipped["bleurt"]
    assert list(result.per_image.index) == ["a", "b", "c"] and result.per_image.index.name == "id"
    assert result.metrics["rougeL"] == pytest.approx(result.per_image["rougeL"].mean())
    for name, (low, high) in result.ci.items():
        assert low <= result.per_image[name].mean() <= high


def test_2025_means_are_skipped_with_reasons_when_parts_are_missing():
    result = run_suite(
        "imageclef2025", REFS, HYPS, eval_cfg=EvalConfig(), overrides={"metrics": ["rouge1", "medcat", "alignscore"]}
    )
    assert "rouge1" in result.metrics
    assert "no MedCAT model pack" in result.skipped["medcat"]
    assert "AlignScore-base.ckpt" in result.skipped["alignscore"]
    assert "bertscore" in result.skipped["primary"] and "medcat" in result.skipped["secondary"]
    assert "primary" not in result.metrics


def test_bad_requests_are_errors():
    with pytest.raises(ValueError, match="unknown suite"):
        run_suite("imageclef1999", REFS, HYPS, eval_cfg=EvalConfig())
    with pytest.raises(ValueError, match="not in suite"):
        run_suite("imageclef2023", REFS, HYPS, eval_cfg=EvalConfig(), overrides={"metrics": ["cider"]})
    with pytest.raises(ValueError, match="unknown suite setting"):
        run_suite("imageclef2023", REFS, HYPS, eval_cfg=EvalConfig(), overrides={"bootstraps": 3})
    with pytest.raises(ValueError, match="no hypothesis"):
        run_suite("imageclef2023", REFS, {"a": "x"}, eval_cfg=EvalConfig())


def test_parquet_roundtrip(tmp_path):
    result = run_suite("imageclef2024", REFS, HYPS, eval_cfg=EvalConfig(), overrides={"metrics": ["rouge1", "bleu1"]})
    path = tmp_path / "scores" / "per_image.parquet"
    save_per_image(result, path)
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, result.per_image)
    assert not list(path.parent.glob(".*tmp"))


def _examples(tmp_path):
    rng = np.random.default_rng(0)
    examples = {}
    for i in ("a", "b", "c"):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        examples[i] = Example(i, path, REFS[i])
    return examples


def test_clipscore_and_refclipscore_match_direct_cosines(tmp_path, tiny_clip):
    from medcap.data import load_image
    from medcap.eval.clip_metrics import clip_scores
    from medcap.retrieval.encoders import load_encoder

    examples = _examples(tmp_path)
    enc_cfg = EncoderConfig(name=tiny_clip, device="cpu")
    hyps = {i: HYPS[i] for i in examples}
    out = clip_scores(list(examples.values()), hyps, enc_cfg)
    enc = load_encoder(enc_cfg)
    for i, ex in examples.items():
        v = enc.encode_images([load_image(ex)])[0]
        c = enc.encode_texts([hyps[i]])[0]
        r = enc.encode_texts([ex.caption])[0]
        cos = float(v @ c) / (np.linalg.norm(v) * np.linalg.norm(c))
        clip = 2.5 * max(cos, 0.0)
        ref = max(float(c @ r) / (np.linalg.norm(c) * np.linalg.norm(r)), 0.0)
        harmonic = 0.0 if clip + ref == 0 else 2 * clip * ref / (clip + ref)
        assert out["clipscore"][1][i] == pytest.approx(clip, abs=1e-5)
        assert out["refclipscore"][1][i] == pytest.approx(harmonic, abs=1e-5)
    assert out["clipscore"][0] == pytest.approx(np.mean(list(out["clipscore"][1].values())))

    # through the suite: 2025 "similarity" is the CLIPScore; primary = per-image mean of its three parts
    from tiny_models import make_tiny_bert
    from transformers import BertTokenizerFast

    bert = make_tiny_bert(tmp_path / "bert")
    # bert-score truncates at the tokenizer's model_max_length, which must be a real number
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt"), model_max_length=64).save_pretrained(bert)
    result = run_suite(
        "imageclef2025",
        REFS,
        HYPS,
        examples=examples,
        eval_cfg=EvalConfig(bertscore_model=str(bert), bertscore_num_layers=2, device="cpu"),
        overrides={
            "metrics": ["bertscore", "rouge1", "similarity"],
            "clip_encoder": {"name": tiny_clip, "device": "cpu"},
        },
    )
    table = result.per_image
    assert table["similarity"].to_dict() == pytest.approx(out["clipscore"][1])
    assert table["primary"].tolist() == pytest.approx(
        table[["bertscore", "rouge1", "similarity"]].mean(axis=1).tolist()
    )
    assert result.metrics["primary"] == pytest.approx(table["primary"].mean())
    assert "secondary" in result.skipped and "primary" in result.ci
