"""Tiny random models saved to disk, so tests run the real loading code without downloads."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    # open_clip's bundled SimpleTokenizer (no hf_tokenizer_name): nothing to download
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}


def make_tiny_open_clip(dir: Path, seed: int = 0) -> str:
    """Save a seeded random tiny open_clip CLIP to ``dir``; return its ``local-dir:`` name.

    The folder has the layout open_clip reads: ``open_clip_config.json`` (``model_cfg`` and
    ``preprocess_cfg``) and ``open_clip_pytorch_model.bin``. The same seed gives the same weights.
    """
    import open_clip
    import torch

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**json.loads(json.dumps(TINY_CLIP_CFG)))
    torch.save(model.state_dict(), dir / "open_clip_pytorch_model.bin")
    config = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}
    (dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return f"local-dir:{dir}"


TINY_BERT_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"abcdefghijklmnopqrstuvwxyz",
    "chest",
    "x",
    "-",
    "ray",
]


def make_tiny_bert(dir: Path, seed: int = 0) -> Path:
    """Save a seeded random 2-layer BERT (hidden 32) with a WordPiece tokenizer to ``dir``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "vocab.txt").write_text("\n".join(TINY_BERT_VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(dir / "vocab.txt")).save_pretrained(dir)
    config = BertConfig(
        vocab_size=len(TINY_BERT_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(dir)
    return dir


def make_tiny_biomedclip_cache(hf_home: Path, repo_id: str, revision: str) -> str:
    """Put a tiny model shaped like BiomedCLIP into a Hugging Face cache under ``hf_home``.

    Like the real repo, its open_clip config names the BERT text tower by hub id; that BERT repo
    is cached too (at ``refs/main``). Returns the text tower's hub id.
    """
    import open_clip
    import torch

    hub = Path(hf_home) / "hub"
    text_id = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    text_snapshot = _cache_snapshot(hub, text_id, "1" * 40)
    make_tiny_bert(text_snapshot)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": TINY_CLIP_CFG["vision_cfg"],
        "text_cfg": {
            "hf_model_name": text_id,
            "hf_tokenizer_name": text_id,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 16,
        },
    }
    snapshot = _cache_snapshot(hub, repo_id, revision)
    built = json.loads(json.dumps(model_cfg))
    built["text_cfg"].update(hf_model_name=str(text_snapshot), hf_model_pretrained=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CustomTextCLIP(**built)
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    config = {"model_cfg": model_cfg, "preprocess_cfg": TINY_PREPROCESS_CFG}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (text_snapshot / name).exists():
            (snapshot / name).write_bytes((text_snapshot / name).read_bytes())
    return text_id


def _cache_snapshot(hub: Path, repo_id: str, commit: str) -> Path:
    """The snapshot folder of ``repo_id`` at ``commit`` in a hub cache, with ``refs/main`` pointing at it."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot
