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
