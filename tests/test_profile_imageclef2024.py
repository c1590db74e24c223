"""The production profile ``imageclef2024`` profile at tiny scale.

Every model id is swapped for a tiny random model of the same architecture, every engine for
``hf``, the data for the session's phantom set; then ``medcap run`` goes end to end through the
profile's own generators, synthesizer and fusers, and the submission validates for 2024.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import make_tiny_bert
from tiny_vlms import cached_tiny_vlm, make_tiny_llama

from medcap.cli import main
from medcap.config import RunConfig, load_config
from medcap.files import read_jsonl
from medcap.generators import MLLM_KINDS

PROFILE = Path(__file__).resolve().parents[1] / "medcap" / "profiles" / "imageclef2024.yaml"
TRAIN = {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "eval_every": 1, "save_every": 1, "eval_samples": 1}


def model_fields(cfg: RunConfig) -> dict[str, str | None]:
    """Every config field that names a model (hub id or path) and would be loaded by this run."""
    fields: dict[str, str | None] = {
        "retrieval.encoder.name": cfg.retrieval.encoder.name,
        "eval.clip_encoder.name": cfg.eval.clip_encoder.name,
        "eval.bertscore_model": cfg.eval.bertscore_model,
        "eval.bleurt_checkpoint": cfg.eval.bleurt_checkpoint,
    }
    fields |= {f"generators.{g.name}.model": g.model for g in cfg.generators if g.kind in MLLM_KINDS}
    fields |= {f"synthesizers.{s.name}.model": s.model for s in cfg.synthesizers}
    fields |= {f"fusers.{f.name}.model": f.model for f in cfg.fusers if f.kind == "lm"}
    return fields


def tiny_overrides(base: Path, tmp: Path, phantom_dir: Path, tiny_clip: str) -> list[str]:
    """``--set`` overrides that turn the profile into a CPU run of tiny random models on phantom data."""
    profile = load_config(PROFILE)
    llama = make_tiny_llama(base / "tiny_llama") if not (base / "tiny_llama").is_dir() else base / "tiny_llama"
    bert = base / "tiny_bert"
    if not bert.is_dir():
        from transformers import BertTokenizerFast

        make_tiny_bert(bert)  # bert-score truncates at model_max_length, which must be a real number
        BertTokenizerFast(vocab_file=str(bert / "vocab.txt"), model_max_length=64).save_pretrained(bert)
    sets = [
        f"runs_dir={tmp / 'runs'}",
        f"data.root={phantom_dir}",
        "data.group_column=case_id",  # the phantom set has cases; ROCOv2 has none
        f"retrieval.encoder.name={tiny_clip}",
        "retrieval.encoder.num_workers=0",
        "retrieval.k=3",
        f"eval.clip_encoder.name={tiny_clip}",
        f"eval.bertscore_model={bert}",
        "eval.bertscore_num_layers=2",
        f"eval.bleurt_checkpoint={tmp / 'no-bleurt'}",  # not in the metric list: never loaded
        "eval.metrics=[rouge1, bertscore]",
        "eval.bootstrap=0",
    ]
    for g in profile.generators:
        if g.kind not in MLLM_KINDS:
            continue
        p = f"generators.{g.name}"
        sets += [f"{p}.model={cached_tiny_vlm(base, g.kind)}", f"{p}.engine.kind=hf", f"{p}.engine.batch_size=8"]
        sets += [f"{p}.generation.max_new_tokens=4", f"{p}.train.max_length=256"]
        sets += [f"{p}.train.{k}={v}" for k, v in TRAIN.items()]
    for s in profile.synthesizers:
        p = f"synthesizers.{s.name}"
        sets += [f"{p}.model={llama}", f"{p}.engine.kind=hf", f"{p}.engine.batch_size=8"]
        sets += [f"{p}.generation.max_new_tokens=4"]
    for f in profile.fusers:
        if f.kind != "lm":
            continue
        p = f"fusers.{f.name}"
        sets += [f"{p}.model={llama}", f"{p}.engine.dtype=fp32", f"{p}.generation.max_new_tokens=4"]
        sets += [f"{p}.train.max_length=480"] + [f"{p}.train.{k}={v}" for k, v in {**TRAIN, "max_steps": 2}.items()]
    return sets


@pytest.fixture
def overrides(tmp_path, tmp_path_factory, phantom_dir, tiny_clip) -> list[str]:
    return tiny_overrides(tmp_path_factory.getbasetemp(), tmp_path, phantom_dir, tiny_clip)


def test_profile_loads_and_every_model_is_swapped(overrides, tmp_path):
    from medcap.ablate import variant_config

    profile = load_config(PROFILE)
    assert profile.data.group_column is None and profile.submit.year == 2024
    assert {g.engine.kind for g in profile.generators if g.kind in MLLM_KINDS} == {"vllm"}
    assert {g.kind for g in profile.generators} == {"nearest", "consensus", "llava", "qwen2_5_vl", "medgemma"}
    assert all(g.mode in ("sft", "few-shot") for g in profile.generators if g.kind in MLLM_KINDS)
    assert all(g.max_pixels for g in profile.generators if g.kind == "qwen2_5_vl")
    assert [s.engine.kind for s in profile.synthesizers] == ["vllm"]
    assert {f.kind for f in profile.fusers} == {"mbr", "lm"}
    assert profile.eval.bertscore_model == "microsoft/deberta-xlarge-mnli"
    for v in profile.ablation.variants:  # every ablation variant is a valid config
        variant_config(profile, v, profile.ablation.split)

    tiny = load_config(PROFILE, overrides)
    before, after = model_fields(profile), model_fields(tiny)
    assert before.keys() == after.keys()
    unswapped = {k: v for k, v in after.items() if v == before[k] or str(tmp_path.parent) not in str(v)}
    assert not unswapped, f"model fields still pointing at production models: {unswapped}"
    engines = [o.engine.kind for o in (*tiny.generators, *tiny.synthesizers, *tiny.fusers) if hasattr(o, "engine")]
    assert set(engines) == {"hf"}
    assert all(g.train.max_steps == 1 for g in tiny.generators if g.kind in MLLM_KINDS)


def test_profile_runs_end_to_end_at_tiny_scale(overrides, tmp_path, phantom_dir):
    args = ["run", str(PROFILE)] + [a for s in overrides for a in ("--set", s)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "imageclef2024"
    cfg = load_config(run / "config.yaml")
    for split in ("valid", "test"):
        ids = {r["id"] for r in read_jsonl(run / "neighbours" / f"{split}.jsonl")}
        for g in cfg.generators:
            rows = read_jsonl(run / "candidates" / g.name / f"{split}.jsonl")
            assert {r["id"] for r in rows} == ids, (g.name, split)
        assert {r["id"] for r in read_jsonl(run / "synthesis" / "synthesis" / f"{split}.jsonl")} == ids
        assert {r["id"] for r in read_jsonl(run / "fused" / "mbr" / f"{split}.jsonl")} == ids
    test_ids = {r["id"] for r in read_jsonl(run / "neighbours" / "test.jsonl")}
    assert {r["id"] for r in read_jsonl(run / "fused" / "lmf" / "test.jsonl")} == test_ids
    assert not (run / "fused" / "lmf" / "valid.jsonl").exists()  # never captions the split it trained on
    for g in ("llava-sft", "qwen-sft", "medgemma-sft"):
        assert (run / "models" / g / "adapter" / "adapter_config.json").exists(), g
    scores = (run / "scores" / "mbr.valid.json").read_text()
    assert '"rouge1"' in scores and '"bertscore"' in scores

    out = tmp_path / "submission.csv"
    sub = CliRunner().invoke(main, ["submit", str(run), "--caption-set", "lmf", "--year", "2024", "-o", str(out)])
    assert sub.exit_code == 0, sub.output
    testset = phantom_dir / "test_captions.csv"
    ok = CliRunner().invoke(main, ["validate", str(out), "--testset", str(testset), "--year", "2024"])
    assert ok.exit_code == 0 and "valid for 2024" in ok.output, ok.output
