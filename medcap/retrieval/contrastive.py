"""Contrastive training of an encoder's projections (``medcap train encoder``).

Both towers stay frozen; the text projection (plus, optionally, the text tower's last layer), the
image projection when the model has one and images are given, and the logit scale are trained
with CLIP's symmetric InfoNCE loss on (image, caption) pairs. Speed on a CPU is the point:

- the frozen text tower runs once per *unique* caption, before its projection; each step then
  only multiplies matrices (``train_text_tower=True`` runs the tower every step instead);
- when the image side is not trained, the run's cached, already projected image embeddings
  (``image_embeddings``) are used as they are, and the image tower never runs.

Several images of one case often share a caption. Such pairs are not negatives of each other:
in a batch, the logits between image *i* and the (identical) caption of image *j* are masked
out of both softmax denominators, so the loss never pushes an image away from its own caption.

The result is saved, atomically, as a self-contained open_clip ``local-dir:`` folder (config,
weights, tokenizer files, the HF text tower's config in ``hf_text/``), with the recall@k before
and after training in ``medcap_encoder.json``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import EncoderConfig
from medcap.records import Example
from medcap.retrieval.contrastive_loss import infonce_loss, recall_at_k

if TYPE_CHECKING:
    import torch

    from medcap.retrieval.encoders import Encoder

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clamps exp(scale) at 100
VALID_FRACTION = 0.1

Valid = tuple[list[Example] | None, list[str], np.ndarray | None]


# --------------------------------------------------------------------------- projections


@dataclass
class Projection:
    """A tower's trainable projection: apply it, list its parameters, or switch it off in the model."""

    module: Any
    attr: str

    @property
    def value(self) -> Any:
        return getattr(self.module, self.attr)

    def params(self) -> list[torch.nn.Parameter]:
        import torch

        v = self.value
        return [v] if isinstance(v, torch.nn.Parameter) else list(v.parameters())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        v = self.value
        return x @ v if isinstance(v, torch.nn.Parameter) else v(x)

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """Within the block the model outputs its pooled features before this projection."""
        import torch

        saved = self.value
        setattr(self.module, self.attr, None if isinstance(saved, torch.nn.Parameter) else torch.nn.Identity())
        try:
            yield
        finally:
            setattr(self.module, self.attr, saved)


def text_projection(model: Any) -> Projection:
    """The text projection: ``text.proj`` of an HF text tower, else CLIP's ``text_projection``."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "proj"):
        proj = Projection(text, "proj")
    elif getattr(model, "text_projection", None) is not None:
        proj = Projection(model, "text_projection")
    else:
        raise ValueError(f"{type(model).__name__}: no text projection to train")
    if not proj.params():
        raise ValueError(f"{type(model).__name__}: the text projection has no parameters to train")
    return proj


def image_projection(model: Any) -> Projection | None:
    """The image projection (a ViT's ``proj``, a timm tower's ``head``), or None when it has none."""
    visual = model.visual
    if getattr(visual, "proj", None) is not None and hasattr(visual, "conv1"):
        return Projection(visual, "proj")
    head = getattr(visual, "head", None)
    if head is not None and hasattr(visual, "trunk") and any(True for _ in head.parameters()):
        return Projection(visual, "head")
    return None


# --------------------------------------------------------------------------- features


def text_features(encoder: Encoder, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Pooled text-tower features of ``captions`` *before* the projection (float32)."""
    import torch

    proj = text_projection(encoder.model)
    # An HF tower masks padding itself, so all-padding columns can be cut (exact, and much faster
    # than 256 tokens a caption); batches of similar lengths waste the least.
    pad = getattr(getattr(getattr(encoder.model, "text", None), "config", None), "pad_token_id", None)
    order = sorted(range(len(captions)), key=lambda i: len(captions[i])) if pad is not None else range(len(captions))
    order = list(order)
    out = np.zeros((len(captions), 0), np.float32)
    with proj.off(), torch.inference_mode():
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            tokens = encoder.tokenizer([captions[i] for i in rows]).to(encoder.device)
            if pad is not None:
                tokens = tokens[:, : int((tokens != pad).any(0).nonzero().max()) + 1]
            feats = encoder.model.encode_text(tokens, normalize=False).float().cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(captions), feats.shape[1]), np.float32)
            out[rows] = feats
    return out


def _image_features(encoder: Encoder, images: list[Example], proj: Projection | None, batch: int) -> np.ndarray:
    """Image features of ``images``: before ``proj`` when given, else the final (normalised) embeddings."""
    import torch

    from medcap.retrieval.embed import load_image

    out = []
    with proj.off() if proj else contextlib.nullcontext(), torch.inference_mode():
        for s in range(0, len(images), batch):
            pixels = torch.stack([encoder.preprocess(load_image(e)) for e in images[s : s + batch]])
            feats = encoder.model.encode_image(pixels.to(encoder.device), normalize=proj is None)
            out.append(feats.float().cpu().numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------- data


@dataclass
class _Side:
    """One set of pairs: image features (projected or not), unique-caption text features, caption ids."""

    image: np.ndarray
    text: np.ndarray
    caption_ids: np.ndarray
    captions: list[str]


def _unique(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    index: dict[str, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in captions], dtype=np.int64)
    return list(index), ids


def _check(images: list[Example] | None, captions: Sequence[str], emb: np.ndarray | None, what: str) -> None:
    if not captions:
        raise ValueError(f"{what}: no captions")
    if any(not isinstance(c, str) or not c.strip() for c in captions):
        raise ValueError(f"{what}: empty or missing caption(s)")
    if images is not None and len(images) != len(captions):
        raise ValueError(f"{what}: {len(images)} images but {len(captions)} captions")
    if emb is not None and (emb.ndim != 2 or len(emb) != len(captions)):
        raise ValueError(f"{what}: image_embeddings of shape {emb.shape} for {len(captions)} captions")
    if images is None and emb is None:
        raise ValueError(f"{what}: give images or image_embeddings")


def _side(encoder: Encoder, images, captions, emb, img_proj: Projection | None, batch: int) -> _Side:
    unique, ids = _unique(captions)
    if img_proj is None and emb is not None:
        image = np.asarray(emb, dtype=np.float32)
        image = image / np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-12)
    else:
        image = _image_features(encoder, images, img_proj, batch)
    return _Side(image, text_features(encoder, unique, batch), ids, unique)


def _split_valid(images, captions, emb, seed: int) -> tuple[tuple, Valid]:
    """Hold out ~10% of the unique captions (all their images) for validation."""
    unique, ids = _unique(captions)
    rng = np.random.default_rng(seed)
    n_valid = min(max(1, round(VALID_FRACTION * len(unique))), len(unique) - 1, 1000)
    held = np.zeros(len(unique), bool)
    held[rng.permutation(len(unique))[:n_valid]] = True
    rows = [np.flatnonzero(~held[ids]), np.flatnonzero(held[ids])]
    parts = [
        (
            None if images is None else [images[i] for i in r],
            [captions[i] for i in r],
            None if emb is None else emb[r],
        )
        for r in rows
    ]
    return parts[0], parts[1]


# --------------------------------------------------------------------------- training


def train_encoder(
    encoder_cfg: EncoderConfig,
    images: list[Example] | None,
    captions: list[str],
    out_dir: Path,
    *,
    image_embeddings: np.ndarray | None = None,
    valid: Valid | None = None,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    train_text_tower: bool = False,
    train_image_projection: bool | None = None,
) -> str:
    """Train the projections of ``encoder_cfg``'s encoder on (image, caption) pairs; return ``local-dir:OUT``.

    ``images`` and/or ``image_embeddings`` (rows in the order of ``captions``) give the image side.
    The image projection is trained when the model has one and images are given
    (``train_image_projection=None``); otherwise the embeddings are used as they are.
    ``valid`` is ``(images | None, captions, embeddings | None)``; without it ~10% of the
    captions (with all their images) are held out. Recall before/after goes to ``OUT/medcap_encoder.json``.
    """
    import torch

    from medcap.retrieval.encoders import load_encoder

    _check(images, captions, image_embeddings, "train_encoder")
    if valid is None:
        (images, captions, image_embeddings), valid = _split_valid(images, captions, image_embeddings, seed)
    else:
        _check(*valid, "train_encoder valid")
    encoder = load_encoder(encoder_cfg)
    model = encoder.model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    txt_proj = text_projection(model)
    img_proj = image_projection(model)
    if train_image_projection is None:
        train_image_projection = img_proj is not None and images is not None and valid[0] is not None
    if train_image_projection and (img_proj is None or images is None or valid[0] is None):
        raise ValueError("train_image_projection: needs a model with an image projection and images for both sets")
    img_proj = img_proj if train_image_projection else None
    if img_proj is None and image_embeddings is None:
        log.info("no image projection trained: embedding the images once with the frozen image tower")
    batch = max(1, encoder_cfg.batch_size)
    t0 = time.perf_counter()
    train = _side(encoder, images, captions, image_embeddings, img_proj, batch)
    held = _side(encoder, *valid, img_proj, batch)
    feat_s = time.perf_counter() - t0

    params = [*txt_proj.params(), *(img_proj.params() if img_proj else []), model.logit_scale]
    tokens = None
    if train_text_tower:
        last = _last_text_layer(model)
        params += list(last.parameters())
        tokens = encoder.tokenizer(train.captions).to(encoder.device)
    for p in params:
        p.requires_grad_(True)
    before = _evaluate(encoder, held, txt_proj, img_proj, train_text_tower)
    log.info("recall before training: %s", _fmt(before))

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    img_all = torch.from_numpy(train.image)
    txt_all = torch.from_numpy(train.text)
    cap_all = torch.from_numpy(train.caption_ids)
    n, bs = len(img_all), min(batch_size, len(img_all))
    losses: list[float] = []
    model.train(train_text_tower)
    t1 = time.perf_counter()
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        b = order[pos : pos + bs]
        pos += bs
        caps = cap_all[b]
        text = model.encode_text(tokens[caps]) if tokens is not None else txt_proj.apply(txt_all[caps])
        image = img_proj.apply(img_all[b]) if img_proj else img_all[b]
        loss = infonce_loss(_norm(image), _norm(text), caps, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "step %d/%d loss %.4f scale %.1f", step + 1, steps, losses[-1], float(model.logit_scale.detach().exp())
            )
    train_s = time.perf_counter() - t1
    model.eval()
    for p in params:
        p.requires_grad_(False)
    after = _evaluate(encoder, held, txt_proj, img_proj, train_text_tower)
    log.info("recall after %d steps (%.1fs): %s", steps, train_s, _fmt(after))
    report = {
        "source": encoder_cfg.name,
        "pairs": n,
        "unique_captions": len(train.captions),
        "valid_pairs": len(held.image),
        "valid_unique_captions": len(held.captions),
        "steps": steps,
        "batch_size": bs,
        "lr": lr,
        "seed": seed,
        "train_text_tower": train_text_tower,
        "trained_image_projection": img_proj is not None,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "loss_first": float(np.mean(losses[:10])) if losses else None,
        "loss_last": float(np.mean(losses[-10:])) if losses else None,
        "features_s": round(feat_s, 2),
        "train_s": round(train_s, 2),
        "recall_before": before,
        "recall_after": after,
    }
    from medcap.retrieval.contrastive_save import save_encoder_folder

    return save_encoder_folder(encoder, encoder_cfg, Path(out_dir), report)


def _last_text_layer(model: Any) -> Any:
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer"):
        enc = getattr(text.transformer, "encoder", text.transformer)
        for attr in ("layer", "layers", "block"):
            if hasattr(enc, attr):
                return getattr(enc, attr)[-1]
    if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):
        return model.transformer.resblocks[-1]
    raise ValueError(f"{type(model).__name__}: cannot find the text tower's last layer")


def _norm(x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.normalize(x, dim=-1)


def _evaluate(encoder: Encoder, side: _Side, txt_proj: Projection, img_proj, full_text: bool) -> dict[str, float]:
    import torch

    with torch.no_grad():
        if full_text:
            text = _norm(encoder.model.encode_text(encoder.tokenizer(side.captions).to(encoder.device)))
        else:
            text = _norm(txt_proj.apply(torch.from_numpy(side.text)))
        image = torch.from_numpy(side.image)
        image = _norm(img_proj.apply(image)) if img_proj else image
    return recall_at_k(image.numpy(), text.numpy(), side.caption_ids)


def _fmt(recall: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in recall.items())
