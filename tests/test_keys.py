"""Cache keys are complete: every leaf setting of the typed config changes the key of the stage it
configures, unless it is in ``keys.NO_EFFECT`` (settings that cannot change a result), and those
change no key at all. A new config field that is in neither fails here.

The config below has one caption set of every kind, so every stage and every kind's settings are
reached; keys come from the config and the data alone, so no model is loaded.
"""

import copy
import dataclasses
import re
import typing

import pytest

from medcap.config import FuserConfig, LoraConfig, RunConfig, load_config
from medcap.configio import KindChoice, from_dict
from medcap.keys import NO_EFFECT, no_effect
from medcap.pipeline import STAGES, Pipeline, get_stage

CONFIG = {
    "data": {"query_splits": ["valid", "test"]},
    "retrieval": {"encoder": {"name": "local-dir:/nonexistent/encoder"}, "k": 3},
    "generators": [
        {"name": "nearest", "kind": "nearest"},
        {"name": "consensus", "kind": "consensus"},
        {"name": "prefix", "kind": "prefix", "folds": 2, "prefix": {"lm": "gpt2"}},
        {"name": "sft", "kind": "llava", "mode": "sft", "model": "org/llava-tiny"},
        {"name": "fs", "kind": "qwen2_5_vl", "mode": "few-shot", "shot_images": True, "adapter": "org/adapter"},
    ],
    "synthesizers": [{"name": "synth", "model": "smollm2", "candidates": ["nearest", "prefix"]}],
    "fusers": [
        {"name": "mbr", "kind": "mbr"},
        {"name": "rerank", "kind": "rerank", "candidates": ["nearest", "consensus"]},
        {"name": "lmf", "kind": "lm", "train_split": "train", "use_neighbours": True, "lora": {}},
        {"name": "pool", "kind": "pool-mbr", "candidates": ["nearest"], "image_text": 0.0},
        {"name": "ranker", "kind": "ranker", "candidates": ["nearest"], "image_text": 0.0},
    ],
    "submit": {"caption_set": "lmf"},
}

# Settings that choose *which* data and artifacts a run has rather than how one is made: they reach
# the keys through each split's data fingerprint, or they add and remove artifacts (names, splits).
SELECTS = {
    "data.root",
    "data.format",
    "data.index_split",
    "data.query_splits",
    "data.image_dirs",
    "data.on_error",
    "data.verify_images",
    "data.limit",
}

# The first stage whose key a setting must change, by path pattern (first match wins).
EXPECT = [
    (r"^seed$", {"train", "train-fuser", "evaluate"}),
    (r"^data\.group_column$", {"embed"}),
    (r"^retrieval\.encoder\.", {"embed"}),
    (r"^retrieval\.index\.", {"index"}),
    (r"^retrieval\.(k|exclude_same_group)$", {"retrieve"}),
    (r"^generators\.prefix\.(train|prefix)\.", {"train"}),  # what each trained kind learns with
    (r"^generators\.sft\.(train|lora)\.", {"train"}),
    (r"^generators\.", {"generate"}),
    (r"^synthesizers\.", {"synthesize"}),
    (r"^fusers\.lmf\.(train|lora|model|train_split)\b", {"train-fuser"}),
    (r"^fusers\.ranker\.", {"train-fuser"}),  # every ranker setting shapes its training lists or its model
    (r"^fusers\.", {"fuse"}),
    (r"^eval\.", {"evaluate"}),
    (r"^submit\.", {"submit"}),
]

ALTERNATIVES = {  # valid other values for settings with a fixed set of choices
    "kind": {"nearest": "consensus", "consensus": "nearest", "prefix": "nearest", "llava": "smolvlm",
             "qwen2_5_vl": "medgemma", "mbr": "rerank", "rerank": "mbr", "lm": "mbr", "flat": "hnsw",
             "pool-mbr": "mbr", "ranker": "pool-mbr"},
    "pool": {"index": "neighbours"},
    "mode": {"zero-shot": "few-shot", "sft": "zero-shot", "few-shot": "zero-shot"},
    "similarity": {"rouge1": "embedding"},
    "utility": {"rouge1": "bertscore"},
    "mapper": {"mlp": "transformer"},
    "template": {"v1": "v2"},
    "suite": {"imageclef2024": "imageclef2023"},
    "precision": {"auto": "fp32"},
    "dtype": {"auto": "bf16"},
    "gpu": {"auto": "never"},
    "on_error": {"raise": "skip"},
    "train_split": {"train": "valid"},
    "lm": {"gpt2": "scratch"},
}  # fmt: skip


def leaves(obj, prefix=""):
    """(path, owner, field) for every leaf setting; list entries are addressed by their name."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaves(value, path + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                yield from leaves(item, f"{path}.{item.name}.")
        else:
            yield path, obj, f


def other_value(cfg: RunConfig, path: str, owner, f: dataclasses.Field):
    value = getattr(owner, f.name)
    if f.name in ALTERNATIVES and value in ALTERNATIVES[f.name]:
        return ALTERNATIVES[f.name][value]
    if f.name == "device" and value == "auto":  # the device auto means here: the same machine, other words
        from medcap.models.devices import resolve_device

        return resolve_device("auto")
    if f.name == "candidates":
        return ["consensus"]
    if f.name == "train_split" and value is None:  # the ranker's default (the index split): another split
        return "valid"
    if f.name == "caption_set":
        return "mbr"
    if f.name == "target_modules":
        return [*value, "gate_proj"]
    if f.name == "metrics":
        return [*value, "bleu1"] if value else ["rouge1"]
    hint = typing.get_type_hints(type(owner))[f.name]
    if value is None:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if args and args[0] is LoraConfig:
            return LoraConfig()
        return {int: 3, float: 0.5, str: "org/other"}[args[0]]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, dict):
        return {**value, "other": 1}
    if isinstance(value, list):
        return [*value, value[0]] if value else ["x"]
    if isinstance(owner, FuserConfig) and f.name == "lora":
        return None
    raise AssertionError(f"{path}: no way to change a {type(value).__name__}")


def all_keys(pipe: Pipeline) -> dict[tuple, str]:
    """Every artifact a whole run makes (targets and what they need), by (stage, *target)."""
    keys: dict[tuple, str] = {}

    def visit(stage, *t):
        if (stage, *t) in keys:
            return
        keys[(stage, *t)] = pipe.key(stage, *t)
        for need in get_stage(stage).needs(pipe, *t):
            visit(*need)

    for stage in STAGES:
        for t in get_stage(stage).targets(pipe):
            visit(stage, *t)
    return keys


@pytest.fixture(scope="module")
def base(phantom_dir, tmp_path_factory):
    cfg = load_config(None, [f"data.root={phantom_dir}", f"runs_dir={tmp_path_factory.mktemp('runs')}"])
    from medcap.configio import apply_overrides, from_dict, to_dict

    data = to_dict(cfg)
    data.update({k: v for k, v in CONFIG.items() if k not in ("data", "retrieval")})
    for section in ("data", "retrieval"):
        data[section].update({k: v for k, v in CONFIG[section].items() if not isinstance(v, dict)})
    data["retrieval"]["encoder"].update(CONFIG["retrieval"]["encoder"])
    cfg = from_dict(RunConfig, apply_overrides(data, []))
    pipe = Pipeline(cfg)
    return cfg, pipe, all_keys(pipe)


def keys_with(base, path, owner_path_value):
    cfg, pipe, _ = base
    changed = copy.deepcopy(cfg)
    owner, parent = changed, None
    *head, last = path.split(".")
    i = 0
    while i < len(head):
        attr = getattr(owner, head[i])
        if isinstance(attr, list):
            parent = attr
            owner = next(o for o in attr if o.name == head[i + 1])
            i += 2
        else:
            owner, i = attr, i + 1
    if last == "kind" and isinstance(owner, KindChoice):  # another kind is another settings class
        shared = {f.name: getattr(owner, f.name) for f in dataclasses.fields(owner.choice_base())}
        parent[parent.index(owner)] = from_dict(owner.choice_base(), {**shared, "kind": owner_path_value})
    else:
        setattr(owner, last, owner_path_value)
    other = Pipeline(changed)
    if not path.startswith("data."):  # the same data: reuse what the base pipeline loaded
        other._splits, other._data_keys = dict(pipe._splits), dict(pipe._data_keys)
    return all_keys(other)


def no_effect_paths(cfg):
    out = set()
    for path, owner, f in leaves(cfg):
        if f.name in no_effect(type(owner)):
            out.add(path)
    for owner_type, names in NO_EFFECT.items():  # whole sections (ablation, encoder_training)
        for f in dataclasses.fields(owner_type):
            if f.name in names and owner_type is RunConfig:
                out.add(f.name)
    return out


def test_every_setting_changes_the_key_of_its_stage_or_is_declared_without_effect(base):
    cfg, _, keys = base
    assert {k[0] for k in keys} == set(STAGES)  # the config reaches every stage
    quiet, missing = no_effect_paths(cfg), []
    for path, owner, f in leaves(cfg):
        if path in SELECTS or path.startswith(("ablation.", "retrieval.encoder_training.")) or path in quiet:
            continue
        if (
            path.endswith(".name")
            and path.count(".") == 2
            and path.split(".")[0] in ("generators", "synthesizers", "fusers")
        ):
            continue  # a caption set's name is which artifact it is, not how it is made
        changed_keys = keys_with(base, path, other_value(cfg, path, owner, f))
        changed = {k[0] for k in keys if k in changed_keys and changed_keys[k] != keys[k]}
        changed |= {k[0] for k in set(keys) ^ set(changed_keys)}  # artifacts that appear or disappear
        expect = next((stages for pattern, stages in EXPECT if re.search(pattern, path)), None)
        assert expect is not None, f"{path}: no expectation for this setting (add it to EXPECT or NO_EFFECT)"
        if not expect <= changed:
            missing.append(f"{path}: changed {sorted(changed)}, expected at least {sorted(expect)}")
    assert not missing, "settings that do not reach their stage's key:\n" + "\n".join(missing)


def test_settings_without_effect_change_no_key(base):
    cfg, _, keys = base
    for path, owner, f in leaves(cfg):
        if f.name in no_effect(type(owner)):
            assert keys_with(base, path, other_value(cfg, path, owner, f)) == keys, path
