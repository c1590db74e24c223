"""Keys that cannot go stale, end to end: a changed training setting retrains, a model retrained in place
is noticed by its content, the run seed reaches what it draws, a registered kind needs no pipeline edit."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from tiny_vlms import make_tiny_llama

from medcap.cli import main
from medcap.config import GeneratorConfig, load_config
from medcap.files import read_jsonl
from medcap.generators import KINDS, GeneratorKind, register
from medcap.pipeline import Pipeline
from medcap.records import Candidate

STEPS = {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "eval_every": 1, "save_every": 1}


def write(tmp_path, cfg) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def ran(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.strip().startswith("done")]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_changed_fuser_setting_retrains_the_fuser(tmp_path, phantom_dir, tiny_clip):
    llama = str(make_tiny_llama(tmp_path / "llama"))
    config = write(
        tmp_path,
        {
            "name": "stale",
            "runs_dir": str(tmp_path / "runs"),
            "data": {"root": str(phantom_dir), "query_splits": ["valid", "test"]},
            "retrieval": {"encoder": {"name": tiny_clip}, "k": 2},
            "generators": [{"name": "nearest", "kind": "nearest"}, {"name": "consensus", "kind": "consensus"}],
            "fusers": [
                {"name": "lmf", "kind": "lm", "model": llama, "train_split": "valid", "train": STEPS,
                 "generation": {"max_new_tokens": 4}},
            ],
            "eval": {"metrics": ["rouge1"], "bootstrap": 0},
        },
    )  # fmt: skip
    assert invoke("run", config).exit_code == 0
    model = tmp_path / "runs" / "stale" / "models" / "lmf" / "final" / "model.safetensors"
    before = model.read_bytes()
    again = invoke("run", config, "--set", "fusers.lmf.train.lr=0.05")
    assert again.exit_code == 0, again.output
    assert "train-fuser" in ran(again.output) and "fuse" in ran(again.output)
    assert model.read_bytes() != before  # trained afresh with the new rate, not the old final/ returned
    meta = json.loads((model.parent / "medcap_fuser.json").read_text())
    assert meta["config"]["train"]["lr"] == 0.05
    assert ran(invoke("run", config, "--set", "fusers.lmf.train.lr=0.05").output) == []


def test_an_encoder_retrained_in_place_is_embedded_again(tmp_path, phantom_dir):
    from tiny_models import make_tiny_open_clip

    encoder = make_tiny_open_clip(tmp_path / "encoder", seed=0)
    config = write(
        tmp_path,
        {
            "name": "enc",
            "runs_dir": str(tmp_path / "runs"),
            "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
            "retrieval": {"encoder": {"name": encoder}, "k": 2},
        },
    )
    assert invoke("embed", config).exit_code == 0
    assert ran(invoke("embed", config).output) == []
    weights = tmp_path / "encoder" / "open_clip_pytorch_model.bin"
    state = torch.load(weights)
    torch.save(
        {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights
    )  # same size, new weights
    res = invoke("embed", config)
    assert res.exit_code == 0 and ran(res.output) == ["embed", "embed"], res.output


def test_the_run_seed_reaches_what_it_draws(phantom_dir, tmp_path):
    cfg = load_config(None, [f"data.root={phantom_dir}", f"runs_dir={tmp_path}"])
    cfg.generators = [GeneratorConfig("prefix", "prefix", folds=2)]
    one, two = (
        Pipeline(cfg),
        Pipeline(load_config(None, [f"data.root={phantom_dir}", f"runs_dir={tmp_path}", "seed=1"])),
    )
    two.cfg.generators = [GeneratorConfig("prefix", "prefix", folds=2)]
    assert one.key("train", "prefix") != two.key("train", "prefix")  # the validation hold-out
    assert one.key("generate", "prefix", "train") != two.key("generate", "prefix", "train")  # the folds
    assert one.key("retrieve", "valid") == two.key("retrieve", "valid")  # retrieval draws nothing


class Echo(GeneratorKind):
    """A test-only kind: the query's own ID and its nearest neighbour's ID."""

    def build(self, pipe, cfg, split, model_dir):
        return lambda items: [Candidate(ex.id, f"{ex.id} like {nb.neighbours[0].id}", cfg.name) for ex, nb in items]


@pytest.fixture
def echo_kind():
    register("echo", Echo())
    yield
    KINDS.pop("echo")
    GeneratorConfig.KINDS.pop("echo")


def test_a_kind_added_by_registration_runs_in_every_stage(echo_kind, tmp_path, phantom_dir, tiny_clip):
    config = write(
        tmp_path,
        {
            "name": "echo",
            "runs_dir": str(tmp_path / "runs"),
            "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
            "retrieval": {"encoder": {"name": tiny_clip}, "k": 2},
            "generators": [{"name": "nearest", "kind": "nearest"}, {"name": "echo", "kind": "echo"}],
            "fusers": [{"name": "mbr", "kind": "mbr"}],
            "eval": {"metrics": ["rouge1"], "bootstrap": 0},
        },
    )
    res = invoke("run", config)
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "runs" / "echo" / "candidates" / "echo" / "valid.jsonl")
    assert rows and all(r["caption"].startswith(r["id"] + " like ") for r in rows)
    assert (tmp_path / "runs" / "echo" / "scores" / "echo.valid.json").is_file()
