"""Trainings in launched processes from the CLI: `medcap run` hands a training to accelerate and uses what it wrote."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.launch import free_port
from medcap.runs import LOCK_HELD, RunLockedError, run_lock

STEPS = {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "eval_every": 2, "save_every": 2, "eval_samples": 2}


def prefix_config(tmp_path, phantom_dir, tiny_clip, **train) -> str:
    cfg = {
        "name": "ddp",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 3},
        "generators": [
            {
                "name": "prefix",
                "kind": "prefix",
                "prefix": {"lm": "scratch", "train_lm": True, "prefix_length": 2},
                "train": STEPS | train,
                "generation": {"max_new_tokens": 6},
                "engine": {"device": "cpu"},
            }
        ],
        "eval": {"metrics": ["rouge1"], "bootstrap": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def done(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.strip().startswith("done")]


def test_run_hands_its_training_to_two_processes_and_the_next_run_uses_the_model(tmp_path, phantom_dir, tiny_clip):
    config = prefix_config(tmp_path, phantom_dir, tiny_clip, processes=2)
    res = CliRunner().invoke(main, ["run", config, "--skip", "evaluate", "--skip", "submit"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "ddp"
    model = run / "models" / "prefix"
    manifest = json.loads((run / "models" / "prefix.manifest.json").read_text())
    assert manifest["complete"] and manifest["info"]["processes"] == 2
    assert sorted(p.name for p in model.iterdir()) == [
        "history.jsonl", "model", "scratch-lm", "train_ids.json", "training.json",
    ]  # fmt: skip
    log = (run / "logs" / "run.log").read_text()
    assert "handed to accelerate" in log and "x 2 process(es)" in log
    assert log.count("prefix train: model written") == 1  # rank 0 alone writes
    assert "generate" in done(res.output)
    # one process next time: the global batch is the same, so the key is, and the model is used
    again = CliRunner().invoke(main, ["run", config, "--set", "generators.prefix.train.processes=1"])
    assert again.exit_code == 0, again.output
    assert "train" not in done(again.output) and "evaluate" in done(again.output)


@pytest.mark.slow
def test_the_train_command_under_accelerate_launch(tmp_path, phantom_dir, tiny_clip):
    """What a user types: the CPU form (accelerate runs one process: said so) and two processes."""
    config = prefix_config(tmp_path, phantom_dir, tiny_clip)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    cli = ["-m", "medcap", "train", "generator", "prefix", "-c", config]
    lone = subprocess.run([*base, "--num_processes", "2", "--cpu", *cli], env=env, capture_output=True, text=True)
    assert lone.returncode == 0, lone.stderr[-3000:]
    assert "started one process" in lone.stderr
    two = [*base, "--multi_gpu", "--num_processes", "2", *cli, "--set", "name=two"]
    res = subprocess.run(two, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "two" / "models" / "prefix.manifest.json").read_text())["complete"]
    follow = CliRunner().invoke(main, ["run", config, "--set", "name=two"])
    assert follow.exit_code == 0 and "train" not in done(follow.output)


def test_a_launched_process_uses_the_lock_its_launcher_holds(tmp_path, monkeypatch):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError), run_lock(tmp_path):
            pass
        monkeypatch.setenv(LOCK_HELD, str(tmp_path.resolve()))
        with run_lock(tmp_path):  # held for it by the command that launched it
            pass
    monkeypatch.setenv(LOCK_HELD, str(tmp_path / "other"))
    with run_lock(tmp_path):  # free: taken as usual
        pass


@pytest.mark.slow
def test_lora_sft_and_the_lm_fuser_train_in_two_processes_like_in_one(tmp_path, phantom_dir, tiny_clip):
    """A tiny LLaVA's LoRA SFT and a tiny Llama LM-Fuser, handed to accelerate, against one process each."""
    from safetensors.torch import load_file
    from tiny_vlms import make_tiny_llama, make_tiny_vlm

    steps = {"max_steps": 4, "batch_size": 2, "grad_accum": 4, "eval_every": 2, "save_every": 2, "eval_samples": 1}
    gen = {"max_new_tokens": 4}
    cfg = {
        "name": "two",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid", "test"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 3},
        "generators": [
            {"name": "nearest", "kind": "nearest"},
            {
                "name": "sft",
                "kind": "llava",
                "model": str(make_tiny_vlm("llava", tmp_path / "llava")),
                "mode": "sft",
                "generation": gen,
                "train": steps | {"processes": 2},
            },
        ],  # fmt: skip
        "fusers": [
            {
                "name": "lmf",
                "kind": "lm",
                "model": str(make_tiny_llama(tmp_path / "llama")),
                "train_split": "valid",
                "generation": gen,
                "train": steps | {"processes": 2},
            },
        ],  # fmt: skip
        "eval": {"metrics": ["rouge1"], "bootstrap": 0},
        "submit": {"caption_set": "lmf"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = CliRunner().invoke(main, ["train", "fuser", "lmf", "-c", str(path)], catch_exceptions=False)
    assert two.exit_code == 0, two.output
    one = ["--set", "name=one", "--set", "generators.sft.train.processes=1", "--set", "fusers.lmf.train.processes=1"]
    res = CliRunner().invoke(main, ["train", "fuser", "lmf", "-c", str(path), *one], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    runs = tmp_path / "runs"
    assert "handed to accelerate" in (runs / "two" / "logs" / "run.log").read_text()
    for model in ("sft/adapter/adapter_model.safetensors", "lmf/final/model.safetensors"):
        a, b = load_file(str(runs / "two" / "models" / model)), load_file(str(runs / "one" / "models" / model))
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, model
