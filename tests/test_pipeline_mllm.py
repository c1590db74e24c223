"""Multimodal LLM generators inside `medcap run`: zero-shot, few-shot and a LoRA SFT generator trained by the run."""

import json

import yaml
from click.testing import CliRunner
from tiny_vlms import make_tiny_vlm

from medcap.cli import main
from medcap.files import read_jsonl

GEN = {"max_new_tokens": 6}


def test_run_trains_sft_generator_and_fuses_candidates(tmp_path, phantom_dir, tiny_clip, monkeypatch):
    from medcap.engines.hf import HFEngine

    loads = []  # one engine per base model: zero-shot, few-shot and the SFT adapter share one weight load
    real_init = HFEngine.__init__
    monkeypatch.setattr(HFEngine, "__init__", lambda self, *a, **kw: (loads.append(a[1]), real_init(self, *a, **kw))[1])
    model = str(make_tiny_vlm("llava", tmp_path / "llava"))
    train = {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "eval_every": 2, "save_every": 2, "eval_samples": 2}
    cfg = {
        "name": "mllm",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 3},
        "generators": [
            {"name": "nearest", "kind": "nearest"},
            {"name": "zs", "kind": "llava", "model": model, "mode": "zero-shot", "generation": GEN},
            {"name": "fs", "kind": "llava", "model": model, "mode": "few-shot", "k": 2, "generation": GEN},
            {"name": "sft", "kind": "llava", "model": model, "mode": "sft", "generation": GEN, "train": train},
        ],
        "fusers": [{"name": "mbr", "kind": "mbr"}],
        "eval": {"metrics": ["rouge1"], "bootstrap": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))

    res = CliRunner().invoke(main, ["run", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "mllm"
    adapter = run / "models" / "sft" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert json.loads((run / "models" / "sft" / "train_ids.json").read_text())
    valid = [r["id"] for r in read_jsonl(run / "neighbours" / "valid.jsonl")]
    for name in ("zs", "fs", "sft"):
        rows = read_jsonl(run / "candidates" / name / "valid.jsonl")
        assert sorted(r["id"] for r in rows) == sorted(valid)
        assert all(r["generator"] == name for r in rows)
    assert {r["mode"] for r in read_jsonl(run / "candidates" / "fs" / "valid.jsonl")} == {"few-shot"}
    fused = read_jsonl(run / "fused" / "mbr" / "valid.jsonl")
    assert len(fused) == len(valid) and {r["source"] for r in fused} <= {"nearest", "zs", "fs", "sft"}
    assert (run / "scores" / "mbr.valid.json").exists()
    assert loads == [model]

    again = CliRunner().invoke(main, ["run", str(path)], catch_exceptions=False)
    assert "0 artifact(s) written" in again.output, again.output
