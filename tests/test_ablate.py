"""`medcap ablate`: variants share cached stages, and the table and plot are written."""

import pytest
import yaml
from click.testing import CliRunner

from medcap.ablate import default_variants, parse_variant, run_ablation
from medcap.cli import main
from medcap.config import ConfigError, load_config


@pytest.fixture()
def config(tmp_path, phantom_dir, tiny_clip):
    cfg = {
        "name": "abl",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
        "retrieval": {"encoder": {"name": tiny_clip, "batch_size": 16}, "k": 4},
        "eval": {"metrics": ["rouge1"]},
        "ablation": {"n_boot": 200},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_variants_reuse_the_main_runs_stages(config, tmp_path):
    assert CliRunner().invoke(main, ["run", str(config)]).exit_code == 0
    variants = [parse_variant(v) for v in ("nearest@nearest", "consensus@consensus", "k1@consensus:retrieval.k=1")]
    result = run_ablation(load_config(config), variants)
    # nothing of the main run is recomputed; only the k=1 variant retrieves, generates and scores again
    assert result.executions == {"retrieve": 1, "generate": 1, "evaluate": 1}
    assert list(result.table.index) == ["nearest", "consensus", "k1"]
    text = result.table_md.read_text()
    assert all(name in text for name in ("nearest", "consensus", "k1", "rouge1"))
    assert result.plot.stat().st_size > 1000

    again = run_ablation(load_config(config), variants)
    assert sum(again.executions.values()) == 0


def test_ablate_command_with_default_variants(config, tmp_path):
    res = CliRunner().invoke(main, ["ablate", str(config)])
    assert res.exit_code == 0, res.output
    names = [v.name for v in default_variants(load_config(config))]
    assert names == ["nearest", "consensus", "consensus-k1", "consensus-k3", "consensus-k5"]
    assert all(n in res.output for n in names)
    assert (tmp_path / "runs" / "abl" / "ablation.png").exists()


def test_bad_variants_are_refused_with_their_name(config):
    cfg = load_config(config)
    with pytest.raises(ConfigError, match="variant 'bad'"):
        run_ablation(cfg, [parse_variant("bad:retrieval.kk=1")])
    with pytest.raises(ConfigError, match="reference 'zzz'"):
        run_ablation(cfg, [parse_variant("a")], reference="zzz")
    assert parse_variant("k1@consensus:retrieval.k=1; generators.consensus.k=2").set == [
        "retrieval.k=1",
        "generators.consensus.k=2",
    ]


def test_cv_folds_split_by_case_and_reuse_the_cache(config, tmp_path):
    from medcap.files import read_jsonl

    args = ["ablate", str(config), "--cv", "2", "--variant", "nearest@nearest", "--variant", "consensus@consensus"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "abl"
    text = (run / "cv2.md").read_text()
    assert "case-grouped 2-fold cross-validation over train+valid" in text and "resamples of whole cases" in text
    assert "distinct captions" in text and "range of the fold means" in text
    assert (run / "cv2.png").stat().st_size > 1000

    cfg = load_config(config)
    from medcap.pipeline import Pipeline

    pipe = Pipeline(cfg)
    case = {ex.id: ex.group for s in ("train", "valid") for ex in pipe.split(s).examples}
    seen = []
    for f in range(2):
        rows = read_jsonl(run / "cv2" / f"fold-{f}" / "nearest" / "neighbours" / f"cv2-{f}.jsonl")
        queries = {r["id"] for r in rows}
        seen.append(queries)
        index = {n["id"] for r in rows for n in r["neighbours"]}
        assert not queries & index  # the fold's images are never its index
        assert not {case[q] for q in queries} & {case[i] for i in index}  # nor their cases
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(case)  # every image held out once
    assert not {case[i] for i in seen[0]} & {case[i] for i in seen[1]}  # folds cut by case

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "stages executed: nothing (all cached)" in (run / "cv2.md").read_text()
    assert CliRunner().invoke(main, [*args, "--split", "valid"]).exit_code != 0  # --cv scores every split


def test_nested_cv_reports_the_inner_choice_on_each_outer_fold(config, tmp_path):
    import re

    from medcap.files import read_jsonl

    args = ["ablate", str(config), "--cv", "2", "--nested", "2", "--variant", "nearest@nearest",
            "--variant", "consensus@consensus"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "abl"
    text = (run / "cv2.md").read_text()
    assert "| nested choice |" in text or "nested choice" in text.split("range of the fold means")[0]
    chosen = re.findall(r"outer fold (\d): the inner 2-fold CV chose `(\w+)`", text)
    assert [f for f, _ in chosen] == ["0", "1"] and all(v in ("nearest", "consensus") for _, v in chosen)
    assert "the protocol's pick on all the data" in text
    for f in range(2):  # the inner folds hold only the outer fold's training images
        fold = run / "cv2" / f"fold-{f}"
        inner = set()
        for g in range(2):
            inner |= {
                r["id"]
                for r in read_jsonl(fold / "inner2" / f"fold-{g}" / "nearest" / "neighbours" / f"cv2-{f}-in2-{g}.jsonl")
            }
        outer = {r["id"] for r in read_jsonl(fold / "nearest" / "neighbours" / f"cv2-{f}.jsonl")}
        assert inner and not inner & outer
    assert CliRunner().invoke(main, ["ablate", str(config), "--nested", "2"]).exit_code != 0  # needs --cv
