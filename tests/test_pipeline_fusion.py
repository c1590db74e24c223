"""Synthesizer, LM-Fuser and the leakage guard inside `medcap run`, with cross-fitted generators."""

import yaml
from click.testing import CliRunner
from tiny_vlms import make_tiny_llama, make_tiny_vlm

from medcap.cli import main
from medcap.files import read_jsonl

STEPS = {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "eval_every": 1, "save_every": 1, "eval_samples": 1}
GEN = {"max_new_tokens": 6}


def make_config(tmp_path, phantom_dir, tiny_clip):
    llava = str(make_tiny_vlm("llava", tmp_path / "llava"))
    llama = str(make_tiny_llama(tmp_path / "llama"))
    cfg = {
        "name": "fusion",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 3},
        "generators": [
            {"name": "nearest", "kind": "nearest"},
            {"name": "sft", "kind": "llava", "model": llava, "mode": "sft", "generation": GEN, "train": STEPS},
        ],
        "synthesizers": [{"name": "synth", "model": llama, "k": 2, "generation": GEN}],
        "fusers": [
            {"name": "mbr", "kind": "mbr"},
            {
                "name": "lmf",
                "kind": "lm",
                "model": llama,
                "train_split": "train",
                "generation": GEN,
                "train": {**STEPS, "max_steps": 2},
            },
        ],
        "eval": {"metrics": ["rouge1"], "bootstrap": 0},
        "submit": {"caption_set": "lmf"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_leaking_fuser_is_refused_and_cross_fitting_fixes_it(tmp_path, phantom_dir, tiny_clip):
    config = make_config(tmp_path, phantom_dir, tiny_clip)
    leak = CliRunner().invoke(main, ["run", str(config)], catch_exceptions=False)
    assert leak.exit_code == 2, leak.output
    assert "generator 'sft' trains on 'train'" in leak.output and "fuser 'lmf'" in leak.output
    assert "--folds" in leak.output
    assert not (tmp_path / "runs" / "fusion" / "models").exists()  # refused before anything was trained

    folds = CliRunner().invoke(
        main, ["train", "generator", "sft", "-c", str(config), "--folds", "2"], catch_exceptions=False
    )
    assert folds.exit_code == 0, folds.output
    run = tmp_path / "runs" / "fusion"
    oof = read_jsonl(run / "candidates" / "sft" / "train.jsonl")
    assert {r["fold"] for r in oof} == {0, 1}
    assert (run / "models" / "sft.folds" / "fold-0" / "adapter" / "adapter_config.json").exists()

    fold = ["--set", "generators.sft.folds=2"]
    trained = CliRunner().invoke(main, ["train", "fuser", "lmf", "-c", str(config), *fold], catch_exceptions=False)
    assert trained.exit_code == 0 and "models/lmf" in trained.output, trained.output
    ok = CliRunner().invoke(main, ["run", str(config), *fold], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    assert "cached train-fuser  " in ok.output and "models/lmf" in ok.output  # the fuser trained above is reused
    valid = {r["id"] for r in read_jsonl(run / "neighbours" / "valid.jsonl")}
    for out in ("synthesis/synth", "fused/mbr", "fused/lmf"):
        rows = read_jsonl(run / out / "valid.jsonl")
        assert {r["id"] for r in rows} == valid, out
    assert not (run / "fused" / "lmf" / "train.jsonl").exists()  # never captions its own training split
    assert (run / "submissions" / "lmf.csv").exists()
    for name in ("nearest", "sft", "synth", "mbr", "lmf"):
        assert (run / "scores" / f"{name}.valid.json").exists(), name


def test_single_stage_commands_synthesize_and_fuse(tmp_path, phantom_dir, tiny_clip):
    config = make_config(tmp_path, phantom_dir, tiny_clip)
    no_lmf = ["--set", "fusers=[{name: mbr, kind: mbr}]", "--set", "submit.caption_set=mbr"]
    first = CliRunner().invoke(
        main,
        [
            "run",
            str(config),
            *no_lmf,
            "--skip",
            "synthesize",
            "--skip",
            "fuse",
            "--skip",
            "evaluate",
            "--skip",
            "submit",
        ],
        catch_exceptions=False,
    )
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "fusion"
    assert not (run / "synthesis").exists()
    for stage, out in (("synthesize", "synthesis/synth"), ("fuse", "fused/mbr")):
        res = CliRunner().invoke(main, [stage, str(config), *no_lmf], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert (run / out / "valid.jsonl").exists(), out
