"""Save a (contrastively trained) encoder as a self-contained open_clip ``local-dir:`` folder.

The folder holds what open_clip's ``local-dir:`` loader reads: ``open_clip_config.json``
(``model_cfg`` + ``preprocess_cfg``), ``open_clip_pytorch_model.bin`` (the whole model, both
towers) and, for a Hugging Face text tower, its tokenizer files at the top level plus the tower's
``config.json`` in ``hf_text/`` (the weights are in the .bin, so ``hf_model_pretrained`` is off).
``text_cfg.hf_model_name`` names ``hf_text/`` by absolute path, which :func:`load_encoder`
follows; a moved folder needs the loader to look for ``hf_text/`` inside the folder itself.
The folder is filled under a temporary name and renamed into place.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import EncoderConfig
from medcap.files import atomic_dir, write_json

if TYPE_CHECKING:
    from medcap.retrieval.encoders import Encoder

log = logging.getLogger(__name__)

REPORT = "medcap_encoder.json"
HF_TEXT_DIR = "hf_text"


def save_encoder_folder(encoder: Encoder, cfg: EncoderConfig, out_dir: Path, report: dict[str, Any]) -> str:
    """Write ``encoder`` (loaded from ``cfg``) and ``report`` to ``out_dir`` atomically; return ``local-dir:OUT``."""
    import torch

    out_dir = Path(out_dir).expanduser().resolve()
    model_cfg, preprocess_cfg = source_config(encoder, cfg)
    with atomic_dir(out_dir) as tmp:
        text_cfg = model_cfg.setdefault("text_cfg", {})
        if "hf_model_name" in text_cfg:
            encoder.model.text.config.save_pretrained(tmp / HF_TEXT_DIR)
            text_cfg.update(
                hf_model_name=str(out_dir / HF_TEXT_DIR),
                hf_tokenizer_name=str(out_dir / HF_TEXT_DIR),
                hf_model_pretrained=False,
            )
            hf_tok = getattr(encoder.tokenizer, "tokenizer", None)
            if hf_tok is None:
                raise ValueError(f"encoder {cfg.name!r}: an HF text tower without an HF tokenizer")
            hf_tok.save_pretrained(tmp)
            hf_tok.save_pretrained(tmp / HF_TEXT_DIR)
        if "timm_model_name" in model_cfg.get("vision_cfg", {}):
            model_cfg["vision_cfg"]["timm_model_pretrained"] = False  # the weights are in the .bin
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
        torch.save(state, tmp / "open_clip_pytorch_model.bin")
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
        write_json(tmp / "open_clip_config.json", config)
        write_json(tmp / REPORT, report)
    log.info("saved encoder to %s", out_dir)
    return f"local-dir:{out_dir}"


def source_config(encoder: Encoder, cfg: EncoderConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) of the encoder ``cfg`` names, as an open_clip folder would hold them."""
    import open_clip

    from medcap.retrieval import encoders

    name = cfg.name
    if name == encoders.OFFLINE_ENCODER:
        return effnet_minilm_config()
    if name == "biomedclip" or name.startswith("hf-hub:"):
        repo = encoders.BIOMEDCLIP_REPO if name == "biomedclip" else name[len("hf-hub:") :]
        revision = cfg.revision or (encoders.BIOMEDCLIP_REVISION if name == "biomedclip" else None)
        folder = encoders._snapshot(repo, revision, name)
        model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(name.replace("/", "-") if ":" not in name else name)
    if model_cfg is None:
        raise ValueError(f"encoder {name!r}: no open_clip model config found")
    preprocess_cfg = getattr(encoder.model.visual, "preprocess_cfg", None)
    if preprocess_cfg is None:
        raise ValueError(f"encoder {name!r}: the loaded model carries no preprocess_cfg")
    return copy.deepcopy(model_cfg), _jsonable(copy.deepcopy(preprocess_cfg))


def effnet_minilm_config() -> tuple[dict[str, Any], dict[str, Any]]:
    """The open_clip config of ``medcap-effnet-minilm`` (mirrors :func:`effnet_minilm.build_effnet_minilm`)."""
    from medcap.retrieval.effnet_minilm import EFFNET_DIM, EFFNET_PREPROCESS_CFG, EFFNET_VISION_CFG, MINILM_CONTEXT

    model_cfg = {
        "embed_dim": EFFNET_DIM,
        "vision_cfg": dict(EFFNET_VISION_CFG),
        "text_cfg": {
            "hf_model_name": "",
            "hf_tokenizer_name": "",
            "hf_model_pretrained": False,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": MINILM_CONTEXT,
        },
    }
    preprocess_cfg = dict(EFFNET_PREPROCESS_CFG)
    return model_cfg, preprocess_cfg


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
