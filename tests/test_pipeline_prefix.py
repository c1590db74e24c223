"""The prefix captioner inside `medcap run`: trained on the index split's cached embeddings, then generating."""

import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.config import DataConfig
from medcap.data import load_split
from medcap.files import read_jsonl
from medcap.models.lms import build_scratch_lm


def test_run_trains_prefix_captioner_on_embeddings(tmp_path, phantom_dir, tiny_clip):
    captions = [ex.caption for ex in load_split(DataConfig(root=str(phantom_dir)), "train").examples]
    lm = build_scratch_lm(captions, tmp_path / "lm", layers=1, hidden=32)
    assert build_scratch_lm(captions, tmp_path / "lm") == lm  # built once
    cfg = {
        "name": "prefix",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid", "test"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 3},
        "generators": [
            {
                "name": "prefix",
                "kind": "prefix",
                "prefix": {"lm": "scratch", "train_lm": True, "prefix_length": 2},
                "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "eval_samples": 2},
                "generation": {"max_new_tokens": 8},
                "engine": {"device": "cpu"},
            },
        ],
        "eval": {"metrics": ["rouge1"], "bootstrap": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["run", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "prefix"
    assert (run / "models" / "prefix" / "model" / "config.json").exists()
    assert (run / "models" / "prefix" / "scratch-lm" / "medcap_scratch.json").exists()
    for split in ("valid", "test"):
        rows = read_jsonl(run / "candidates" / "prefix" / f"{split}.jsonl")
        assert len(rows) == len(load_split(DataConfig(root=str(phantom_dir)), split).examples)
        assert all(isinstance(r["caption"], str) and r["generator"] == "prefix" for r in rows)
    # a generation setting regenerates without retraining
    again = CliRunner().invoke(main, ["run", str(path), "--set", "generators.prefix.generation.max_new_tokens=4"])
    done = [line.split()[1] for line in again.output.splitlines() if line.strip().startswith("done")]
    assert "train" not in done and "generate" in done
