"""Every VQA setting changes the key of the stage it shapes (or is declared without effect), as
tests/test_keys.py holds the caption settings; and a VQA run reaches every VQA stage."""

import copy
import re

import pytest
from test_keys import leaves, other_value
from vqa_fixtures import vqa_config, vqa_rad

from medcap.config import RunConfig
from medcap.configio import KindChoice, from_dict
from medcap.keys import no_effect
from medcap.pipeline import Pipeline, get_stage
from medcap.tasks import VQA_STAGES

EXPECT = [
    (r"^vqa\.question_encoder$", {"questions"}),
    (r"^vqa\.answerers\.classifier\.", {"train-answerer"}),
    (r"^vqa\.answerers\.", {"answer"}),
    (r"^vqa\.use_answer_type$", {"answer"}),
    (r"^vqa\.fusers\.", {"fuse-answers"}),
    (r"^vqa\.bootstrap$", {"evaluate-answers"}),
    (r"^vqa\.answer_set$", {"submit-answers"}),
]
OTHER = {"kind": {"prior": "vote", "vote": "prior", "classifier": "vote", "llava": "smolvlm"},
         "candidates": ["vote"], "answer_set": "vote"}  # fmt: skip


def all_keys(pipe):
    keys = {}

    def visit(stage, *t):
        if (stage, *t) not in keys:
            keys[(stage, *t)] = pipe.key(stage, *t)
            for need in get_stage(stage).needs(pipe, *t):
                visit(*need)

    for stage in pipe.stages:
        for t in get_stage(stage).targets(pipe):
            visit(stage, *t)
    return keys


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    root = vqa_rad(tmp / "rad", n_images=4, test_images=2)
    data = vqa_config(tmp, root, "vqa-rad", "local-dir:/nonexistent/encoder", "minilm")
    data["vqa"]["answerers"].append({"name": "llava", "kind": "llava", "mode": "few-shot", "model": "org/llava-tiny"})
    data["vqa"]["fusers"][0]["weights"] = {"vote": 2.0}
    cfg = from_dict(RunConfig.TASKS.get("vqa"), data)
    pipe = Pipeline(cfg)
    return cfg, pipe, all_keys(pipe)


def test_a_vqa_run_reaches_every_vqa_stage(base):
    _, _, keys = base
    assert {k[0] for k in keys} == set(VQA_STAGES)


def test_every_vqa_setting_changes_its_stage_key(base):
    cfg, pipe, keys = base
    missing = []
    for path, owner, f in leaves(cfg.vqa, "vqa."):
        if f.name in no_effect(type(owner)) or (path.endswith(".name") and path.count(".") == 3):
            continue
        value = getattr(owner, f.name)
        new = OTHER[f.name].get(value) if isinstance(OTHER.get(f.name), dict) else OTHER.get(f.name)
        new = new if new is not None else other_value(cfg, path, owner, f)
        changed_cfg = copy.deepcopy(cfg)
        target = changed_cfg.vqa
        parts = path.split(".")[1:]
        i, parent = 0, None
        while i < len(parts) - 1:
            attr = getattr(target, parts[i])
            if isinstance(attr, list):
                parent, target = attr, next(o for o in attr if o.name == parts[i + 1])
                i += 2
            else:
                target, i = attr, i + 1
        if parts[-1] == "kind" and isinstance(target, KindChoice):
            base_cls = target.choice_base()
            parent[parent.index(target)] = from_dict(base_cls, {"name": target.name, "kind": new})
        else:
            setattr(target, parts[-1], new)
        other = Pipeline(changed_cfg)
        other._splits, other._data_keys = dict(pipe._splits), dict(pipe._data_keys)
        other._resources = {k: v for k, v in pipe._resources.items() if k[0] == "vqa-questions"}
        changed_keys = all_keys(other)
        changed = {k[0] for k in keys if k in changed_keys and changed_keys[k] != keys[k]}
        changed |= {k[0] for k in set(keys) ^ set(changed_keys)}
        expect = next(stages for pattern, stages in EXPECT if re.search(pattern, path))
        if not expect <= changed:
            missing.append(f"{path}: changed {sorted(changed)}, expected {sorted(expect)}")
    assert not missing, "\n".join(missing)
