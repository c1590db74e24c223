"""Config loading: YAML into dataclasses, overrides, errors that name the key, stable hashes."""

import re

import pytest

from medcap.config import ConfigError, EncoderConfig, IndexConfig, RunConfig, config_hash, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.retrieval.encoder.name == "biomedclip"
    assert [g.kind for g in cfg.generators] == ["nearest", "consensus"]


def test_yaml_sections_fill_nested_dataclasses(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            """
name: exp1
data: {root: /data/x, query_splits: [valid, test]}
retrieval:
  k: 7
  encoder: {name: "local-dir:/m", batch_size: 4}
  index: {kind: hnsw}
generators:
  - {name: nn, kind: nearest}
""",
        )
    )
    assert cfg.name == "exp1" and cfg.data.query_splits == ["valid", "test"]
    assert cfg.retrieval.k == 7 and cfg.retrieval.encoder == EncoderConfig(name="local-dir:/m", batch_size=4)
    assert cfg.retrieval.index.kind == "hnsw" and cfg.retrieval.index.nprobe == IndexConfig().nprobe
    assert [g.name for g in cfg.generators] == ["nn"]


def test_overrides_parse_yaml_values_and_address_list_entries_by_name(tmp_path):
    cfg = load_config(
        write(tmp_path, "retrieval: {k: 3}\n"),
        ["retrieval.k=9", "data.query_splits=[test]", "generators.consensus.k=2", "eval.bertscore_num_layers=6"],
    )
    assert cfg.retrieval.k == 9 and cfg.data.query_splits == ["test"]
    assert cfg.generators[1].k == 2 and cfg.eval.bertscore_num_layers == 6


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("retrieval: {kk: 3}\n", [], "retrieval: unknown key(s) ['kk']"),
        ("retrieval: {k: three}\n", [], "retrieval.k: expected int"),
        ("retrieval: {index: {kind: lsh}}\n", [], "retrieval.index.kind: 'lsh' is not one of"),
        ("", ["retrieval.k"], "expected KEY=VALUE"),
        ("", ["generators.nope.k=1"], "no list entry 'nope'"),
        ("generators: [{name: a}, {name: a}]\n", [], "names must be unique"),
        ("- a\n- b\n", [], "expected a mapping"),
        ("a: [\n", [], "not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text), overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("/nonexistent/run.yaml")


def test_dump_roundtrips(tmp_path):
    cfg = load_config(overrides=["retrieval.k=4", "name=x"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_hash_is_stable_and_sensitive():
    a, b = IndexConfig(), IndexConfig(kind="ivf")
    assert config_hash(a, "x") == config_hash(IndexConfig(), "x")
    assert config_hash(a, "x") != config_hash(b, "x") != config_hash(a, "y")
