"""Each kind owns its settings: ``kind`` picks the dataclass when YAML is read, another kind's key is an
error naming it, ``medcap config show`` prints only the chosen kind's fields, and old configs keep loading."""

import copy
import dataclasses
import pickle
import re

import pytest
import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.config import ConfigError, FuserConfig, GeneratorConfig, dump_config, load_config
from medcap.configio import from_dict, to_dict
from medcap.fuser import KINDS as FUSER_KINDS
from medcap.generators import KINDS as GENERATOR_KINDS

# one entry of every kind, with one setting that only that kind has (None: it has none)
GENERATORS = {
    "nearest": None,
    "consensus": ("k", 3),
    "constant": ("similarity", "bertscore"),
    "prefix": ("folds", 2),
    "llava": ("mode", "few-shot"),
    "qwen2_5_vl": ("max_pixels", 200_704),
    "medgemma": ("shot_images", True),
    "smolvlm": ("prompt", "Describe."),
}
FUSERS = {
    "mbr": ("utility", "bertscore"),
    "rerank": None,
    "pool-mbr": ("tau", 0.1),
    "lm": ("train_split", "train"),
    "ranker": ("top", 8),
}


def write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def entry(kind, own):
    e = {"name": f"x-{kind}", "kind": kind}
    if own:
        e[own[0]] = own[1]
    return e


def test_every_kind_has_a_settings_class_and_the_registries_agree():
    assert set(GeneratorConfig.KINDS) == set(GENERATOR_KINDS)
    assert set(FuserConfig.KINDS) == set(FUSER_KINDS)
    for base, kinds in ((GeneratorConfig, GENERATORS), (FuserConfig, FUSERS)):
        assert set(kinds) == set(base.KINDS)
        for kind in kinds:
            assert issubclass(base.kind_class(kind), base)


@pytest.mark.parametrize(("section", "kinds"), [("generators", GENERATORS), ("fusers", FUSERS)])
def test_a_config_of_each_kind_loads_its_own_class_and_round_trips(tmp_path, section, kinds):
    base = GeneratorConfig if section == "generators" else FuserConfig
    data = {section: [entry(k, own) for k, own in kinds.items()]}
    if section == "fusers":
        data["generators"] = [{"name": "nearest", "kind": "nearest"}]
    cfg = load_config(write(tmp_path, data))
    for o, (kind, own) in zip(getattr(cfg, section), kinds.items(), strict=True):
        assert type(o) is base.kind_class(kind) and o.kind == kind
        if own:
            assert getattr(o, own[0]) == own[1]
    again = load_config(write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg


@pytest.mark.parametrize(
    ("section", "kind", "key", "owner"),
    [
        ("fusers", "mbr", "tau", "pool-mbr"),
        ("fusers", "pool-mbr", "utility", "mbr"),
        ("fusers", "rerank", "train_split", "lm"),
        ("generators", "nearest", "similarity", "consensus | constant"),
        ("generators", "prefix", "mode", "llava"),
    ],
)
def test_another_kinds_key_is_an_error_that_names_it(tmp_path, section, kind, key, owner):
    value = {"tau": 0.05, "utility": "rouge1", "train_split": "valid", "similarity": "rouge1", "mode": "sft"}[key]
    data = {section: [{"name": "a", "kind": kind, key: value}]}
    with pytest.raises(ConfigError, match=re.escape(f"{section}[0]: {key!r} is a setting of kind {owner}")):
        load_config(write(tmp_path, data))


def test_unknown_keys_and_kinds_are_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("fusers[0]: unknown key 'tua'")):
        load_config(write(tmp_path, {"fusers": [{"name": "a", "kind": "pool-mbr", "tua": 1}]}))
    with pytest.raises(ConfigError, match=re.escape("fusers[0].kind: unknown fuser kind 'pool'")):
        load_config(write(tmp_path, {"fusers": [{"name": "a", "kind": "pool"}]}))


def test_config_show_prints_only_the_chosen_kinds_fields(tmp_path):
    data = {"fusers": [{"name": "p", "kind": "pool-mbr"}, {"name": "m", "kind": "mbr"}]}
    res = CliRunner().invoke(main, ["config", "show", str(write(tmp_path, data))])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    pool, mbr = shown["fusers"]
    assert set(pool) == {f.name for f in dataclasses.fields(FuserConfig.kind_class("pool-mbr"))}
    assert "utility" not in pool and "tau" in pool
    assert set(mbr) == {"name", "kind", "candidates", "utility"}
    assert load_config(write(tmp_path, shown)).fusers[0].tau == 0.05


def test_an_old_resolved_config_with_every_kinds_fields_still_loads(tmp_path):
    """Run folders of medcap <= 0.1 hold config.yaml dumps of the one-bag sections: every kind's field, at its default."""
    defaults = {}
    for cls in FuserConfig.kind_classes().values():
        defaults = {**to_dict(cls()), **defaults}
    old_fuser = {k: defaults[k] for k in FuserConfig.LEGACY_FIELDS} | {"name": "mbr", "kind": "mbr"}
    cfg = load_config(write(tmp_path, {"fusers": [old_fuser]}))
    assert type(cfg.fusers[0]).__name__ == "MBRConfig" and cfg.fusers[0].utility == "rouge1"
    changed = {**old_fuser, "tau": 0.3}  # not a default: not a stale dump value, so still refused
    with pytest.raises(ConfigError, match="'tau' is a setting of kind pool-mbr"):
        load_config(write(tmp_path, {"fusers": [changed]}))


def test_calling_the_base_builds_the_kinds_class_and_copies_keep_it():
    f = FuserConfig(name="p", kind="pool-mbr", tau=0.2)
    assert type(f).__name__ == "PoolMBRConfig" and f.tau == 0.2
    assert type(FuserConfig()).__name__ == "MBRConfig"  # the default kind
    rerank = FuserConfig(name="r", kind="rerank")
    assert type(rerank) is FuserConfig
    for copied in (copy.deepcopy(rerank), pickle.loads(pickle.dumps(rerank)), dataclasses.replace(rerank)):
        assert type(copied) is FuserConfig and copied == rerank
    assert type(copy.deepcopy(f)) is type(f) and pickle.loads(pickle.dumps(f)) == f
    g = GeneratorConfig("c", "consensus", k=2)
    assert type(g).__name__ == "ConsensusConfig" and g.k == 2
    with pytest.raises(TypeError):
        FuserConfig(kind="mbr", tau=0.1)  # mbr has no tau


def test_overrides_reach_a_kinds_own_field():
    cfg = load_config("medcap/profiles/medpix-cpu.yaml", ["fusers.mbr-pool.tau=0.2", "data.root=/x"])
    assert cfg.fusers[1].tau == 0.2
    with pytest.raises(ConfigError, match="'utility' is a setting of kind mbr"):
        load_config("medcap/profiles/medpix-cpu.yaml", ["fusers.mbr-pool.utility=rouge1"])


def test_from_dict_of_a_kinds_class_checks_its_fields():
    cls = FuserConfig.kind_class("pool-mbr")
    assert from_dict(FuserConfig, {"kind": "pool-mbr", "evidence_k": 5}).evidence_k == 5
    with pytest.raises(ConfigError, match="evidence_k: expected int"):
        from_dict(cls, {"kind": "pool-mbr", "evidence_k": "five"})
