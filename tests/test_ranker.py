"""The learned ranker: cross-fitted training lists that never hold the image's own case, nested choice of its
settings, resumable training, and a fuse that picks from pool-MBR's list."""

import csv
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.files import read_json, read_jsonl
from medcap.fuser.pool import HypothesisPool
from medcap.fuser.ranker_features import RougeBags
from medcap.fuser.ranker_model import ListData, choose, fit, load_net

MARKER = "Planted marker words appear only here."


def planted(phantom_dir, tmp_path):
    """The phantom set with one more sentence in every caption of one training case: only that case wrote it."""
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    with open(root / "metadata.csv") as f:
        meta = list(csv.DictReader(f))
    case = next(r["case_id"] for r in meta if r["split"] == "train")
    ids = {r["ID"] for r in meta if r["case_id"] == case}
    path = root / "train_captions.csv"
    with open(path) as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["ID", "Caption"])
        w.writeheader()
        for r in rows:
            w.writerow({"ID": r["ID"], "Caption": f"{r['Caption']} {MARKER}" if r["ID"] in ids else r["Caption"]})
    return root, case, ids


def config(tmp_path, root, tiny_clip):
    cfg = {
        "name": "rank",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(root), "query_splits": ["valid"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 12, "index": {"space": "caption"}},
        "generators": [{"name": "nearest", "kind": "nearest"}, {"name": "consensus", "kind": "consensus", "k": 3}],
        "fusers": [
            {"name": "mbr-pool", "kind": "pool-mbr", "evidence_k": 12, "shortlist": 8},
            {
                "name": "ranker", "kind": "ranker", "evidence_k": 12, "shortlist": 8, "top": 4, "hidden": [0, 4],
                "temperature": [0.05], "inner_folds": 2,
                "train": {"max_steps": 6, "batch_size": 8, "lr": 0.01, "save_every": 3},
            },
        ],
        "eval": {"metrics": ["rouge1"], "bootstrap": 0, "bertscore_model": "minilm"},
        "submit": {"caption_set": "ranker"},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, phantom_dir, tiny_clip):
    tmp = tmp_path_factory.mktemp("ranker")
    root, case, ids = planted(phantom_dir, tmp)
    path = config(tmp, root, tiny_clip)
    res = CliRunner().invoke(main, ["run", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return tmp / "runs" / "rank", path, case, ids


def test_the_ranker_trains_on_the_index_split_and_fuses_every_query(ranked):
    run, path, _, _ = ranked
    rows = read_jsonl(run / "fused" / "ranker" / "valid.jsonl")
    refs = {r["id"] for r in read_jsonl(run / "neighbours" / "valid.jsonl")}
    assert {r["id"] for r in rows} == refs and all(r["caption"].strip() for r in rows)
    assert all(r["source"] in {"index", "nearest", "consensus"} and r["mbr_rank"] >= 0 for r in rows)
    final = run / "models" / "ranker" / "final"
    selection = read_json(final / "selection.json")
    assert len(selection["inner_cv"]) == 2 and selection["hidden"] in (0, 4)  # the inner folds chose
    assert (final / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not (run / "models" / "ranker" / "inner").exists()
    oof = read_jsonl(run / "models" / "ranker" / "oof.jsonl")  # its training images, each by a model blind to it
    data = ListData.load(run / "models" / "ranker" / "lists.npz")
    assert sorted(r["id"] for r in oof) == sorted(data.ids) and {r["fold"] for r in oof} == {0, 1}
    assert all(r["alternatives"][0] == r["caption"] for r in oof)
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(main, ["run", str(path)], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp  # a second run trains nothing


def test_the_lists_never_hold_a_hypothesis_that_only_the_images_case_wrote(ranked):
    run, _, case, ids = ranked
    data = ListData.load(run / "models" / "ranker" / "lists.npz")
    pool = HypothesisPool.load(run / "pool" / "minilm")
    marked = {r for r, t in enumerate(pool.text) if "planted marker" in t}
    assert marked and all(pool.groups[r] == {case} for r in marked)  # the pool has them: written by that case only
    own = [k for k, i in enumerate(data.ids) if i in ids]
    assert own, "the planted case is among the training images"
    for k in own:
        assert not set(data.rows[k].tolist()) & marked  # never offered, never a training target
    assert data.features[0].shape[1] == len(data.features[-1][0])
    neighbours = {r["id"]: r for r in read_jsonl(run / "neighbours" / "train.jsonl")}
    for i in ids:  # the neighbours of the case's images come from other cases (cross-fitted retrieval)
        assert all(n["id"] not in ids for n in neighbours[i]["neighbours"])


def test_ranker_training_resumes_to_the_same_weights(tmp_path):
    import torch

    from medcap.config import TrainConfig

    rng = np.random.default_rng(0)
    data = ListData([f"i{k}" for k in range(20)], [f"c{k // 2}" for k in range(20)],
                    [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(20)],
                    [rng.random(5).astype(np.float32) for _ in range(20)], [np.arange(5) for _ in range(20)],
                    [np.zeros(5, np.float32)] * 20, [np.zeros(5, np.float32)] * 20,
                    [np.array(list("abcde"))] * 20)  # fmt: skip
    tc = TrainConfig(max_steps=8, batch_size=4, grad_accum=1, lr=0.05, eval_every=100, save_every=2)
    whole = fit(data, 4, 0.05, tc, tmp_path / "whole", "t")

    import medcap.models.training as training

    real = training.train_step
    calls = []

    def crash_after_five(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    training.train_step = crash_after_five
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(data, 4, 0.05, tc, tmp_path / "resumed", "t")
    finally:
        training.train_step = real
    resumed = fit(data, 4, 0.05, tc, tmp_path / "resumed", "t")
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    loaded = load_net(tmp_path / "resumed" / "final")
    assert choose(loaded, data.features) == choose(whole, data.features)


def test_rouge_bags_are_rouge_score():
    from rouge_score import rouge_scorer

    hyps = ["a mass in the liver", "liver liver mass", "nothing alike here"]
    refs = ["the liver has a mass", "mass liver liver liver"]
    got = RougeBags().f1(hyps, refs)
    sc = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    want = np.array([[sc.score(r, h)["rouge1"].fmeasure for r in refs] for h in hyps])
    assert np.allclose(got, want)


def test_the_lists_resume_after_a_crash(ranked, tmp_path, monkeypatch):
    import medcap.fuser.ranker as ranker
    from medcap.config import load_config
    from medcap.pipeline import Pipeline

    run, path, _, _ = ranked
    pipe = Pipeline(load_config(path))
    cfg = pipe.cfg_of("ranker", "fuse")
    examples = [ex for ex in pipe.split("train").examples][:10]
    monkeypatch.setattr(ranker, "LIST_SHARD", 4)
    made, real = [], ranker.RankerKind._shard

    def dies_on_the_second(self, *args):
        made.append(len(args[3]))
        if len(made) == 2:
            raise RuntimeError("killed")
        return real(self, *args)

    monkeypatch.setattr(ranker.RankerKind, "_shard", dies_on_the_second)
    with pytest.raises(RuntimeError, match="killed"):
        ranker.RANKER.lists(pipe, cfg, "train", examples, tmp_path / "partial")
    data = ranker.RANKER.lists(pipe, cfg, "train", examples, tmp_path / "partial")
    assert made == [4, 4, 4, 2] and data.ids == [ex.id for ex in examples]  # the first shard was not made again
    pipe.close()
