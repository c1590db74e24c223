"""bench/scale_fuse.py: the ROCO-like data go through the real pipeline stages (its embed artifacts are taken
as fresh: no encoder, no image decoded), each stage is timed in a child process, the tables are printed; the
whole fuse path with the resume check runs under ``-m slow``."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from medcap.files import read_jsonl

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scale_fuse.py"


def bench(name: str = "scale_fuse"):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_times_stages_through_the_pipeline(tmp_path, capsys):
    """Image-space retrieval keeps MiniLM out of this quick run; retrieve's index is prepared untimed."""
    results = bench().main(
        ["--sizes", "200,400", "--queries", "30", "--text", "synthetic", "--dir", str(tmp_path),
         "--stages", "retrieve,generate nearest,submit", "--set", "retrieval.index.space=image",
         "--set", "submit.caption_set=nearest", "--json", str(tmp_path / "out.json")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert [(r["work"], r["n"]) for r in results] == [
        (w, n) for n in (200, 400) for w in ("retrieve", "generate nearest", "submit")
    ]
    assert all(r["seconds"] > 0 and r["cpu"] > 0 and r["peak_mb"] > 10 for r in results)
    assert all(r["ran"] for r in results)  # each timed child made its stage's artifact
    assert "preparing its inputs [['index']]" in out  # retrieve's input, made first and untimed
    assert "| retrieve | 400 |" in out and "| generate nearest |" in out and "b (wall)" in out
    assert json.loads((tmp_path / "out.json").read_text())[0]["work"] == "retrieve"

    run = tmp_path / "runs" / "n400"
    assert not (run / "embeddings" / "medcap-effnet-minilm" / "train.partial").exists()  # never re-embedded
    neighbours = list(read_jsonl(run / "neighbours" / "valid.jsonl"))
    assert len(neighbours) == 30 and all(len(r["neighbours"]) == 200 for r in neighbours)  # medpix-cpu's k
    with open(tmp_path / "data" / "n400" / "metadata.csv") as f:
        case = {r["ID"]: r["case_id"] for r in csv.DictReader(f)}
    assert all(case[n["id"]] != case[r["id"]] for r in neighbours for n in r["neighbours"])
    with open(tmp_path / "data" / "n200" / "train_captions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and len({r["Caption"] for r in rows}) == 200  # ROCO: each image a caption of its own
    with open(tmp_path / "data" / "n200" / "valid_captions.csv") as f:
        assert len({r["Caption"] for r in csv.DictReader(f)} & {r["Caption"] for r in rows}) < 3  # drawn apart
    assert (run / "submissions" / "nearest.csv").is_file()

    # more queries, the same index: the data are written again, but the index split's artifacts stay fresh
    bench().main(
        ["--sizes", "200", "--queries", "40", "--text", "synthetic", "--dir", str(tmp_path), "--stages", "retrieve",
         "--set", "retrieval.index.space=image", "--set", "submit.caption_set=nearest"]
    )  # fmt: skip
    assert "preparing its inputs" not in capsys.readouterr().out


def test_medpix_text_without_the_data_says_what_to_do(tmp_path, monkeypatch):
    module = bench()
    monkeypatch.setattr(module, "MEDPIX", tmp_path / "absent")
    with pytest.raises(SystemExit, match="--text synthetic"):
        module.main(["--sizes", "100", "--queries", "10", "--dir", str(tmp_path / "run")])


def test_images_are_near_each_other_when_their_captions_share_a_region_and_sentences():
    import numpy as np

    module = bench("roco_like")
    images, keys = module.make_cases(module.synthetic_bank(0), 400, 0, "i", "medpix")
    assert len({cap for _, _, cap in images}) <= len({c for _, c, _ in images}) < 400  # cases share a caption
    v = module.embeddings(keys, 0, 0).astype(np.float32)
    assert v.shape == (400, module.DIM) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-2)
    sims = v @ v.T
    case = [c for _, c, _ in images]
    shared, region, other = [], [], []
    for i in range(400):
        for j in range(i + 1, 400):
            if case[i] == case[j]:
                continue
            if set(keys[i]) & set(keys[j]):
                shared.append(sims[i, j])
            elif keys[i][0][0] == keys[j][0][0]:
                region.append(sims[i, j])
            else:
                other.append(sims[i, j])
    assert shared and np.mean(shared) > np.mean(region) + 0.15 > np.mean(other) + 0.3


@pytest.mark.slow
def test_every_stage_and_the_resume_check(tmp_path, capsys):
    results = bench().main(
        ["--sizes", "150,300", "--queries", "160", "--text", "synthetic", "--dir", str(tmp_path), "--exact-max", "150",
         "--resume-check", "--set", "fusers.ranker.train.max_steps=4", "--set", "fusers.ranker.hidden=[0]",
         "--set", "fusers.ranker.temperature=[0.05]", "--set", "fusers.ranker.inner_folds=2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "fuse pool-mbr exact 300: skipped" in out
    resume = results[-1]
    assert resume["work"] == "resume check" and 80 <= resume["killed_at"] < 160
    assert resume["identical"] and resume["rows"] == 160
