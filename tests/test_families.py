"""Multimodal LLM families: loading tiny models of each real architecture, chat rendering, LoRA targets."""

import re
import time

import pytest
import torch
from PIL import Image
from tiny_vlms import cached_tiny_vlm

from medcap.generators.prompts import build_messages, training_messages
from medcap.models.families import FAMILIES, QWEN_MAX_PIXELS, get_family, torch_dtype
from medcap.models.hub import ModelNotFoundError

IMAGE_TOKEN = {"llava": "<image>", "qwen2_5_vl": "<|image_pad|>", "medgemma": "<start_of_image>", "smolvlm": "<image>"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def loaded(request, tmp_path_factory):
    family = get_family(request.param)
    path = cached_tiny_vlm(tmp_path_factory.getbasetemp(), family.name)
    model, processor = family.load(str(path))
    return family, model, processor


def test_registry_defaults():
    assert get_family("llava").default_model == "llava-hf/llava-1.5-7b-hf"
    assert get_family("qwen2_5_vl").default_model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert get_family("medgemma").default_model == "google/medgemma-4b-it"
    assert get_family("smolvlm").default_model == "HuggingFaceTB/SmolVLM-256M-Instruct"
    with pytest.raises(ValueError, match="known"):
        get_family("blip")


def test_load_gives_eval_model_of_the_family_class_with_left_padding(loaded):
    family, model, processor = loaded
    assert type(model).__name__ == family.model_class
    assert not model.training and model.dtype == torch.float32  # dtype auto on CPU
    assert processor.tokenizer.padding_side == "left"


def test_render_holds_the_image_token_and_generation_prompt(loaded):
    family, _, processor = loaded
    messages, _ = build_messages("zero-shot", instruction="Describe the image.")
    text = family.render(processor, messages, add_generation_prompt=True)
    assert text.count(IMAGE_TOKEN[family.name]) == 1 and "Describe the image." in text
    # the training text is the inference prompt followed by the caption: the loss mask relies on it
    full = family.render(processor, training_messages(messages, "CT of the chest."), add_generation_prompt=False)
    assert full.startswith(text) and "CT of the chest." in full[len(text) :]


def test_encode_left_pads_a_batch_with_its_images(loaded):
    family, model, processor = loaded
    short, _ = build_messages("zero-shot", instruction="Hi.")
    long, _ = build_messages("zero-shot", instruction="Describe the chest image in great detail please.")
    texts = [family.render(processor, m, add_generation_prompt=True) for m in (short, long)]
    im = Image.new("RGB", (48, 40), (90, 20, 200))
    enc = family.encode(processor, texts, [[im], [im]])
    mask = enc["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()  # padding on the left
    assert "pixel_values" in enc
    image_id = model.config.image_token_id
    assert (enc["input_ids"][0] == image_id).sum() == (enc["input_ids"][1] == image_id).sum() > 0


def test_lora_targets_only_the_language_model_attention(loaded):
    family, model, _ = loaded
    (regex,) = family.lora_targets
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hits = [n for n in names if re.fullmatch(regex, n)]
    assert len(hits) == 2 * 4  # 2 layers x q, k, v, o
    assert all(family.lm_module in n and "vision" not in n and "visual" not in n for n in hits)
    vision_attn = [n for n in names if n.endswith("q_proj") and family.lm_module not in n]
    assert family.name == "qwen2_5_vl" or vision_attn  # the vision tower has q_proj too, and is left alone
    mlp = family.lora_target_regex(["gate_proj", "up_proj", "down_proj"])
    assert len([n for n in names if re.fullmatch(mlp, n)]) == 2 * 3


def test_qwen_pixels_are_capped(tmp_path_factory):
    family = get_family("qwen2_5_vl")
    path = cached_tiny_vlm(tmp_path_factory.getbasetemp(), "qwen2_5_vl")
    _, processor = family.load(str(path), max_pixels=56 * 56)
    assert processor.image_processor.size["longest_edge"] == 56 * 56
    grid = processor.image_processor(images=[Image.new("RGB", (400, 300))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) * 14 * 14 <= 56 * 56
    assert family.default_max_pixels == QWEN_MAX_PIXELS


def test_missing_hub_model_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=r"nobody/no-such-vlm.*huggingface-cli download nobody/no-such-vlm"):
        get_family("llava").load("nobody/no-such-vlm")
    assert time.perf_counter() - start < 2
    with pytest.raises(ModelNotFoundError, match="HF_HOME"):
        get_family("medgemma").load()  # the default hub id, not cached here


def test_missing_local_folder_fails_fast(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        get_family("smolvlm").load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        get_family("smolvlm").load(str(tmp_path / "empty"))


def test_dtype_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert torch_dtype("auto", "cuda:0") == torch.bfloat16
    assert torch_dtype("auto", "cpu") == torch.float32
    assert torch_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        torch_dtype("int8", "cpu")
