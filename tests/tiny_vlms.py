"""Tiny random multimodal LLMs (and a text LM) of the real architectures, saved with their processors.

Each builder makes a seeded 2-layer model from a config, a BPE tokenizer trained offline
on a few sentences (sentencepiece-style, with the family's special image and chat tokens), a chat template shaped like
the real model's, and an image processor built from arguments; everything is written with
``save_pretrained`` so the real loading code (``Family.load``, vLLM) runs on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = [
    "Axial CT scan of the chest shows a mass in the right upper lobe.",
    "Chest X-ray demonstrates bilateral pleural effusion and cardiomegaly.",
    "MRI of the brain with contrast reveals a ring enhancing lesion.",
    "Ultrasound of the abdomen shows gallstones without wall thickening.",
    "Describe the image. Write a diagnostic caption for this medical image.",
    "USER: ASSISTANT: user assistant model system You are a helpful assistant.",
    "Example caption: Here is the image. Now the query image. Caption: Picture 1 2 3 4 5",
    "The quick brown fox jumps over the lazy dog 0123456789 .,:;!?'\"()[]{}<>-_/\\|",
]

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_tokenizer(
    special: list[str],
    *,
    bos: str,
    eos: str,
    pad: str,
    chat_template: str,
    named: dict[str, str] | None = None,
    vocab_size: int = 400,
    added: tuple[str, ...] = (),
):
    """A BPE tokenizer trained on ``CORPUS``; ``special`` tokens are never split, ``added`` are plain whole tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Metaspace (sentencepiece-style) rather than byte-level BPE: every token decodes to readable text.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    allspecial = list(dict.fromkeys([pad, bos, eos, "<unk>", *special, *(named or {}).values()]))
    alphabet = sorted(set("".join(CORPUS)) | set("\n\u2581"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=allspecial, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if added:
        tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    kwargs: dict[str, Any] = {"extra_special_tokens": named} if named else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=chat_template,
        padding_side="left",
        **kwargs,
    )


def _llama_text(tok, hidden: int = 64, heads: int = 2, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def _llava(out_dir: Path, hidden: int = 64):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers import LlavaForConditionalGeneration as cls

    tok = make_tokenizer(["<image>"], bos="<s>", eos="</s>", pad="<pad>", chat_template=LLAVA_TEMPLATE)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=image_proc,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_llama_text(tok, hidden=hidden)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tok.pad_token_id,
    )
    return cls(config), proc


def _qwen2_5_vl(out_dir: Path, hidden: int = 64):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers import Qwen2_5_VLForConditionalGeneration as cls

    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = make_tokenizer(
        special, bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_TEMPLATE
    )
    px = 56 * 56  # a 4x4 grid of 14-pixel patches, merged 2x2: 4 image tokens
    image_proc = Qwen2VLImageProcessor(min_pixels=px, max_pixels=px, patch_size=14, merge_size=2, temporal_patch_size=2)
    video_proc = _qwen_video_processor()
    proc = Qwen2_5_VLProcessor(
        image_processor=image_proc, tokenizer=tok, video_processor=video_proc, chat_template=QWEN_TEMPLATE
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    half = hidden // 4  # head_dim / 2 rotary frequencies, split over (time, height, width)
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # [4, 6, 6] at hidden 64
    text = _llama_text(
        tok, hidden=hidden, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    )
    text["eos_token_id"] = ids["<|im_end|>"]
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return cls(config), proc


def _qwen_video_processor():
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor()


def _medgemma(out_dir: Path, hidden: int = 64):
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers import Gemma3ForConditionalGeneration as cls

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = make_tokenizer(
        ["<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        chat_template=GEMMA_TEMPLATE,
        named=named,
        added=("\n\n\n\n", "\n\n\n", "\n\n", "\n"),  # as in Gemma's vocabulary; vLLM's Gemma 3 merges them
    )
    image_proc = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    proc = Gemma3Processor(image_processor=image_proc, tokenizer=tok, chat_template=GEMMA_TEMPLATE, image_seq_length=4)
    text = Gemma3TextConfig(**_llama_text(tok, hidden=hidden, head_dim=hidden // 2, sliding_window=64))
    vision = SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids(named["boi_token"]),
        eoi_token_index=tok.convert_tokens_to_ids(named["eoi_token"]),
        image_token_index=tok.convert_tokens_to_ids(named["image_token"]),
    )
    return cls(config), proc


def _smolvlm(out_dir: Path, hidden: int = 64):
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, LlamaConfig
    from transformers import Idefics3ForConditionalGeneration as cls

    special = ["<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tok = make_tokenizer(
        special, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>", chat_template=SMOLVLM_TEMPLATE
    )
    image_proc = Idefics3ImageProcessor(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    proc = Idefics3Processor(image_processor=image_proc, tokenizer=tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    config = Idefics3Config(
        text_config=LlamaConfig(**_llama_text(tok, hidden=hidden)),
        vision_config=vision,
        scale_factor=2,  # 16 patches -> 4 image tokens
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    return cls(config), proc


BUILDERS = {"llava": _llava, "qwen2_5_vl": _qwen2_5_vl, "medgemma": _medgemma, "smolvlm": _smolvlm}


def make_tiny_vlm(family: str, out_dir: Path, seed: int = 0, *, hidden: int = 64) -> Path:
    """Save a seeded tiny random model of ``family``'s architecture and its processor to ``out_dir``.

    The language model has 2 heads of ``hidden // 2`` dims: ``hidden=128`` gives head_dim 64, the
    least vLLM's CPU attention kernels accept (``make_tiny_vllm_vlm``).
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, proc = BUILDERS[family](out_dir, hidden=hidden)
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir


def make_tiny_vllm_vlm(family: str, out_dir: Path, seed: int = 0) -> Path:
    """``make_tiny_vlm`` with head_dim 64 (hidden 128), the smallest model vLLM's CPU kernels serve.

    Saved with the vision tower's legacy weight names, which vLLM 0.32 needs (``vllm_checkpoint``).
    """
    from medcap.engines.vllm_checkpoint import legacy_vision_keys

    out = make_tiny_vlm(family, out_dir, seed, hidden=128)
    legacy_vision_keys(out)
    return out


def make_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """Save a seeded tiny text-only Llama (head_dim 64, as vLLM needs) and its chat tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        chat_template=LLAMA_TEMPLATE,
    )
    config = LlamaConfig(**_llama_text(tok, hidden=128, heads=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def cached_tiny_vlm(base: Path, family: str) -> Path:
    """``make_tiny_vlm`` into ``base/tiny_FAMILY`` once per test session (``base``: pytest's basetemp)."""
    path = Path(base) / f"tiny_{family}"
    if not (path / "config.json").is_file():
        make_tiny_vlm(family, path)
    return path


def make_tiny_lora(family: str, model_dir: Path, out_dir: Path, seed: int = 1, scale: float = 1.0) -> Path:
    """Save a PEFT LoRA adapter on the LM attention of the tiny model in ``model_dir``.

    ``lora_B`` gets a large random init (PEFT's default is zeros), so the adapter certainly changes outputs.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from medcap.models.families import get_family

    fam = get_family(family)
    model, _ = fam.load(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=fam.lora_targets[0]))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
