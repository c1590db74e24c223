"""Training and generation for the prefix captioner (``medcap.generators.prefix``).

``train_prefix`` fits the mapper (and the LM when ``prefix.train_lm``) on cached image embeddings
and their captions in medcap's one training loop (``models/training.py``): validation loss and a
quick ROUGE-1 every ``eval_every`` steps, the best model kept, atomic checkpoints and exact resume.
``PrefixGenerator`` writes candidates from embeddings.

Layout of ``out_dir``: ``checkpoints/``, ``best/``, ``model/`` (the finished model: the best one,
or the last one without validation data), ``history.jsonl``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import ConfigError, EngineConfig, GenerationConfig, GeneratorConfig, PrefixConfig, TrainConfig
from medcap.generators.kind import Generator, GeneratorKind, Item
from medcap.keys import key_settings
from medcap.models import training
from medcap.models.distributed import world
from medcap.models.hub import model_identity
from medcap.records import Candidate

if TYPE_CHECKING:
    from medcap.generators.prefix import PrefixCaptioner, PrefixModelConfig
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

MAX_CAPTION_TOKENS = 64  # captions are short; longer sequences only slow CPU training down
VALID_LOSS_SAMPLES = 512  # validation loss is computed on at most this many validation images
FINAL = "model"


@dataclass
class PrefixGeneratorConfig(GeneratorConfig):
    """The prefix captioner's settings: its model, its training, how it decodes."""

    kind: str = "prefix"
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # batch_size, device, dtype of generation
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    folds: int = 0  # >= 2: cross-fit on the index split (K models, each writes its held-out fold's candidates)

    def check(self, where: str) -> None:
        if self.prefix.mapper not in ("mlp", "transformer"):
            raise ConfigError(f"{where}.prefix.mapper: {self.prefix.mapper!r} is not one of ['mlp', 'transformer']")


def _clean(captions: list[str]) -> list[str]:
    try:
        from medcap.models.captions import clean_caption
    except ImportError:
        return [(c or "").strip() for c in captions]
    return [clean_caption(c or "") for c in captions]


def _model_config(cfg: PrefixGeneratorConfig, dim: int) -> PrefixModelConfig:
    from medcap.generators.prefix import PrefixModelConfig

    return PrefixModelConfig(
        prefix=cfg.prefix,
        embed_dim=dim,
        focal_gamma=cfg.train.focal_gamma,
        max_caption_tokens=min(MAX_CAPTION_TOKENS, cfg.train.max_length),
    )


def _lm_dtype(precision: str) -> str:
    return {"auto": "auto", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[precision]


def _valid_loss(model: PrefixCaptioner, embeds: np.ndarray, captions: list[str], batch_size: int) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(captions), batch_size):
            ids, mask = model.encode_captions(captions[s : s + batch_size])
            loss = model(torch.from_numpy(embeds[s : s + batch_size]), ids, mask)["loss"]
            tokens = int(mask.sum())
            total, count = total + float(loss) * tokens, count + tokens
    return total / max(count, 1)


def _quick_rouge1(model: PrefixCaptioner, embeds: np.ndarray, captions: list[str], cfg: PrefixGeneratorConfig) -> float:
    import torch

    from medcap.eval.metrics import rouge1

    hyps: list[str] = []
    for s in range(0, len(captions), cfg.engine.batch_size):
        batch = torch.from_numpy(embeds[s : s + cfg.engine.batch_size])
        hyps += model.generate(batch, max_new_tokens=min(cfg.generation.max_new_tokens, MAX_CAPTION_TOKENS))
    gts = {str(i): [c] for i, c in enumerate(captions)}
    res = {str(i): [h] for i, h in enumerate(hyps)}
    return rouge1(gts, res)[0]


def train_prefix(
    cfg: PrefixGeneratorConfig,
    train_ids: list[str],
    train_embeds: np.ndarray,
    train_captions: list[str],
    valid_ids: list[str],
    valid_embeds: np.ndarray | None,
    valid_captions: list[str],
    out_dir: Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train a prefix captioner and return its ``model/`` folder.

    ``resume``: continue from the newest checkpoint (or return at once when ``model/`` is
    finished); False starts afresh. ``stop_after``: checkpoint and return after this many optimiser
    steps in this call (time-boxed training; ``model/`` is not written yet); calling again resumes.
    """
    import torch

    from medcap.generators.prefix import PrefixCaptioner

    out_dir, tc = Path(out_dir), cfg.train
    final = out_dir / FINAL
    if not resume:
        training.reset(out_dir, FINAL)
    if (final / "config.json").is_file():
        log.info("prefix captioner already trained: %s", final)
        return final

    if len(train_ids) != len(train_embeds) or len(train_ids) != len(train_captions):
        raise ValueError(f"{len(train_ids)} train IDs, {len(train_embeds)} embeddings, {len(train_captions)} captions")
    cleaned = _clean(train_captions)
    keep = [i for i, c in enumerate(cleaned) if c]
    captions = [cleaned[i] for i in keep]
    embeds = np.asarray(train_embeds, dtype=np.float32)[keep]
    if not captions:
        raise ValueError("no training image has a caption")
    v_caps: list[str] = []
    v_emb = np.zeros((0, embeds.shape[1]), dtype=np.float32)
    if valid_embeds is not None and len(valid_ids):
        v_cleaned = _clean(valid_captions)
        v_keep = [i for i, c in enumerate(v_cleaned) if c]
        v_caps = [v_cleaned[i] for i in v_keep][:VALID_LOSS_SAMPLES]
        v_emb = np.asarray(valid_embeds, dtype=np.float32)[v_keep][:VALID_LOSS_SAMPLES]

    training.seed_everything(tc.seed)
    mcfg = _model_config(cfg, embeds.shape[1])
    model = PrefixCaptioner.build(mcfg, dtype=_lm_dtype(tc.precision), device=cfg.engine.device)
    fingerprint = json.dumps({"model": mcfg.to_json(), "train": key_settings(tc), "n": len(captions)}, sort_keys=True)

    def batch(idx: list[int], m: int) -> tuple[Any, Any, Any]:
        ids, mask = model.encode_captions([captions[i] for i in idx])
        return torch.from_numpy(embeds[idx]), ids, mask

    def validate() -> dict[str, float]:
        row = {"val_loss": _valid_loss(model, v_emb, v_caps, tc.batch_size)}
        if tc.eval_samples > 0:
            n = tc.eval_samples
            row["val_rouge1"] = _quick_rouge1(model, v_emb[:n], v_caps[:n], cfg)
        return row

    recipe = training.Recipe(
        model=model,
        n=len(captions),
        batch=batch,
        loss=lambda b: model(*b)["loss"] * int(b[2].sum()),  # the mean over caption tokens, as a sum
        tokens=lambda b: int(b[2].sum()),
        save=model.save,
        fingerprint=fingerprint,
        validate=validate if v_caps else None,
        name="prefix train",
    )
    path, _ = training.fit(recipe, tc, out_dir, FINAL, stop_after=stop_after)
    return path


class PrefixGenerator:
    """A generator: one caption per image embedding from a trained prefix captioner."""

    def __init__(self, cfg: PrefixGeneratorConfig, model_dir: Path):
        from medcap.generators.prefix import PrefixCaptioner

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.model = PrefixCaptioner.load(self.model_dir, dtype=cfg.engine.dtype, device=cfg.engine.device)

    def __call__(self, ids: list[str], embeds: np.ndarray) -> list[Candidate]:
        import torch

        if len(ids) != len(embeds):
            raise ValueError(f"{len(ids)} IDs but {len(embeds)} embeddings")
        g = self.cfg.generation
        extra: dict[str, Any] = {}
        if g.repetition_penalty != 1.0:
            extra["repetition_penalty"] = g.repetition_penalty
        out: list[Candidate] = []
        bs = self.cfg.engine.batch_size
        for s in range(0, len(ids), bs):
            batch = torch.from_numpy(np.asarray(embeds[s : s + bs], dtype=np.float32))
            texts = self.model.generate(batch, max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, **extra)
            cleaned = [c or t for c, t in zip(_clean(texts), texts, strict=True)]  # never an empty caption
            out += [Candidate(i, t, self.cfg.name) for i, t in zip(ids[s : s + bs], cleaned, strict=True)]
        return out


class PrefixKind(GeneratorKind):
    """The prefix captioner as a generator kind: it reads the retrieval embeddings, and trains on the index split."""

    def trains(self, cfg: PrefixGeneratorConfig) -> bool:
        return True

    def settings(self, pipe: Pipeline, cfg: PrefixGeneratorConfig) -> Any:
        return key_settings(cfg), model_identity(cfg.prefix.lm)

    def train_settings(self, cfg: PrefixGeneratorConfig) -> Any:
        return key_settings(cfg.prefix), key_settings(cfg.train), model_identity(cfg.prefix.lm)

    def needs(self, pipe: Pipeline, cfg: PrefixGeneratorConfig, split: str) -> list[tuple]:
        return [("embed", split)]

    def train_needs(self, pipe: Pipeline, cfg: PrefixGeneratorConfig) -> list[tuple]:
        return [("embed", pipe.cfg.data.index_split)]

    def train(
        self, pipe: Pipeline, cfg: PrefixGeneratorConfig, train: list[Item], valid: list[Item], out: Path
    ) -> None:
        from dataclasses import replace

        from medcap.retrieval.embed import load_embeddings

        ids, vectors = load_embeddings(pipe.path("embed", pipe.cfg.data.index_split))
        row = {id_: i for i, id_ in enumerate(ids)}

        def arrays(items: list[Item]):
            batch = [ex.id for ex, _ in items]
            return batch, vectors[[row[i] for i in batch]], [ex.caption for ex, _ in items]

        if cfg.prefix.lm == "scratch":  # a small LM learned from scratch on the training captions
            from medcap.models.lms import build_scratch_lm

            if not cfg.prefix.train_lm:
                raise ValueError(f"generator {cfg.name}: prefix.lm: scratch needs prefix.train_lm: true")
            with world().main_first():  # under a launcher rank 0 builds it, the others load what it wrote
                lm = build_scratch_lm([ex.caption for ex, _ in train], out / "scratch-lm")
            cfg = replace(cfg, prefix=replace(cfg.prefix, lm=str(lm)))
        train_prefix(cfg, *arrays(train), *arrays(valid), out)

    def build(self, pipe: Pipeline, cfg: PrefixGeneratorConfig, split: str, model_dir: Path) -> Generator:
        from medcap.retrieval.embed import load_embeddings

        model = PrefixGenerator(cfg, model_dir / FINAL)
        ids, vectors = load_embeddings(pipe.path("embed", split))
        row = {id_: i for i, id_ in enumerate(ids)}

        def generate(items: list[Item]) -> list[Candidate]:
            batch = [ex.id for ex, _ in items]
            return model(batch, vectors[[row[i] for i in batch]])

        return generate


PREFIX = PrefixKind()
