"""Multimodal LLMs as answerers in VQA mode: tiny random LLaVA and SmolVLM through the hf engine and their chat
templates, zero-shot and few-shot (the nearest QA pairs in the prompt), inside a VQA run."""

import json

import pytest
import yaml
from tiny_vlms import cached_tiny_vlm
from vqa_fixtures import vqa_config, vqa_rad

from medcap.config import ConfigError, load_config
from medcap.models.families import get_family
from medcap.pipeline import Pipeline
from medcap.vqa.mllm import clean_answer, vqa_messages


def test_messages_render_the_question_after_the_image_in_the_family_template(tmp_path_factory):
    from transformers import AutoProcessor

    path = cached_tiny_vlm(tmp_path_factory.getbasetemp(), "llava")
    prompt = "Answer briefly. Question: {question}"
    messages = vqa_messages(prompt, "Is there a mass?", [("Is there a mass?", "No")])
    text = get_family("llava").render(AutoProcessor.from_pretrained(path), messages, add_generation_prompt=True)
    assert text.index("<image>") < text.index("Q: Is there a mass?\nA: No") < text.index("Question: Is there a mass?")
    assert text.rstrip().endswith("ASSISTANT:")
    assert clean_answer("Answer: Yes.\nmore text") == "Yes"


def test_tiny_vlms_answer_every_question_zero_and_few_shot(tmp_path, tmp_path_factory, tiny_clip):
    base = tmp_path_factory.getbasetemp()
    root = vqa_rad(tmp_path / "rad", n_images=4, test_images=2)
    cfg = vqa_config(tmp_path, root, "vqa-rad", tiny_clip, str(_tiny_text(tmp_path_factory)))
    generation = {"max_new_tokens": 4}
    cfg["vqa"]["answerers"] = [
        {"name": "vote", "kind": "vote", "k": 3},
        {"name": "llava-zs", "kind": "llava", "model": str(cached_tiny_vlm(base, "llava")), "generation": generation},
        {"name": "smolvlm-fs", "kind": "smolvlm", "mode": "few-shot", "k": 2,
         "model": str(cached_tiny_vlm(base, "smolvlm")), "generation": generation},
    ]  # fmt: skip
    cfg["vqa"]["fusers"] = [{"name": "fused", "kind": "vote", "weights": {"vote": 2.0}}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pipe = Pipeline(load_config(path))
    with pipe.session():
        pipe.run_stages()
    run = tmp_path / "runs" / "vqa-vqa-rad"
    for name in ("llava-zs", "smolvlm-fs", "fused"):
        rows = [json.loads(x) for x in (run / "answers" / name / "test.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * 4 and all(isinstance(r["answer"], str) for r in rows)
    fused = [json.loads(x) for x in (run / "answers" / "fused" / "test.jsonl").read_text().splitlines()]
    assert all(r["answer"] in ("yes", "no") for i, r in enumerate(fused) if i % 4 == 0)  # "Is there a mass?": yes/no


def test_sft_mode_needs_an_adapter(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: vqa\ndata: {format: slake}\nvqa: {answerers: [{name: a, kind: qwen2_5_vl, mode: sft}]}\n")
    with pytest.raises(ConfigError, match="adapter"):
        load_config(path)


def _tiny_text(factory):
    from tiny_models import make_tiny_bert

    path = factory.getbasetemp() / "tiny_bert_vqa"
    return path if (path / "config.json").is_file() else make_tiny_bert(path)
