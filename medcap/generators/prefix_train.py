"""Training and generation for the prefix captioner (``medcap.generators.prefix``).

``train_prefix`` fits the mapper (and the LM when ``prefix.train_lm``) on cached image embeddings
and their captions: AdamW with linear warmup and decay, validation loss and a quick ROUGE-1 every
``eval_every`` steps, the best model (lowest validation loss) kept, and an atomic checkpoint
(trainable weights, optimiser, scheduler, step, RNG) every ``save_every`` steps from which an
interrupted run resumes exactly. ``PrefixGenerator`` writes candidates from embeddings.

Layout of ``out_dir``: ``checkpoint.pt``, ``best/``, ``model/`` (the finished model: the best one,
or the last one without validation data), ``history.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medcap.config import GeneratorConfig
from medcap.generators.prefix import PrefixCaptioner, PrefixModelConfig
from medcap.records import Candidate

log = logging.getLogger(__name__)

MAX_CAPTION_TOKENS = 64  # captions are short; longer sequences only slow CPU training down
VALID_LOSS_SAMPLES = 512  # validation loss is computed on at most this many validation images


def _clean(captions: list[str]) -> list[str]:
    try:
        from medcap.generators.clean import clean_caption
    except ImportError:
        return [(c or "").strip() for c in captions]
    return [clean_caption(c or "") for c in captions]


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing it, never leaving ``dst`` half-written."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def _save_model_atomic(model: PrefixCaptioner, dst: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    model.save(tmp)
    _replace_dir(tmp, dst)


def _model_config(cfg: GeneratorConfig, dim: int) -> PrefixModelConfig:
    return PrefixModelConfig(
        prefix=cfg.prefix,
        embed_dim=dim,
        focal_gamma=cfg.train.focal_gamma,
        max_caption_tokens=min(MAX_CAPTION_TOKENS, cfg.train.max_length),
    )


def _lm_dtype(precision: str) -> str:
    return {"auto": "auto", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[precision]


class _Batches:
    """Deterministic micro-batches: micro-batch ``m`` depends only on (seed, m), so resuming is exact."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, m: int) -> np.ndarray:
        epoch, pos = divmod(m, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1][pos * self.bs : (pos + 1) * self.bs]


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


def _quick_rouge1(model: PrefixCaptioner, embeds: np.ndarray, captions: list[str], cfg: GeneratorConfig) -> float:
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
    cfg: GeneratorConfig,
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

    ``resume``: continue from ``out_dir/checkpoint.pt`` (or return at once when ``model/`` is
    finished); False starts afresh. ``stop_after``: checkpoint and return after this many optimiser
    steps in this call (time-boxed training; ``model/`` is not written yet); calling again resumes.
    """
    import torch
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    tc = cfg.train
    final = out_dir / "model"
    ckpt_path = out_dir / "checkpoint.pt"
    if not resume:
        for p in (final, out_dir / "best", ckpt_path, out_dir / "history.jsonl"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if (final / "config.json").is_file():
        log.info("prefix captioner already trained: %s", final)
        return final
    out_dir.mkdir(parents=True, exist_ok=True)

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

    torch.manual_seed(tc.seed)
    mcfg = _model_config(cfg, embeds.shape[1])
    model = PrefixCaptioner.build(mcfg, dtype=_lm_dtype(tc.precision), device=cfg.engine.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    batches = _Batches(len(captions), tc.batch_size, tc.seed)
    total = tc.max_steps or max(1, math.ceil(tc.epochs * batches.per_epoch / tc.grad_accum))
    warmup = int(total * tc.warmup_ratio)

    def schedule(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total - s) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    fingerprint = json.dumps({"model": mcfg.to_json(), "train": asdict(tc), "n": len(captions)}, sort_keys=True)
    step, best = 0, math.inf
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=model.device, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt_path} was written with other settings or data; pass resume=False to start afresh")
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, best = state["step"], state["best"]
        log.info("resuming %s at step %d of %d", out_dir, step, total)

    def checkpoint() -> None:
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        state = {
            "fingerprint": fingerprint,
            "trainable": trainable,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "step": step,
            "best": best,
        }
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".checkpoint.", suffix=".tmp")
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)

    def validate() -> None:
        nonlocal best
        if not v_caps:
            return
        model.eval()
        row: dict[str, Any] = {"step": step, "valid_loss": _valid_loss(model, v_emb, v_caps, tc.batch_size)}
        if tc.eval_samples > 0:
            n = tc.eval_samples
            row["valid_rouge1"] = _quick_rouge1(model, v_emb[:n], v_caps[:n], cfg)
        model.train()
        log.info("step %d: %s", step, row)
        with (out_dir / "history.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if row["valid_loss"] < best:
            best = row["valid_loss"]
            _save_model_atomic(model, out_dir / "best")

    model.train()
    done_here = 0
    bar = tqdm(total=total, initial=step, desc="prefix train", unit="step")
    while step < total:
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(tc.grad_accum):
            idx = batches(step * tc.grad_accum + a)
            ids, mask = model.encode_captions([captions[i] for i in idx])
            loss = model(torch.from_numpy(embeds[idx]), ids, mask)["loss"] / tc.grad_accum
            loss.backward()
            loss_sum += loss.item()
        opt.step()
        sched.step()
        step += 1
        done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if step % tc.eval_every == 0 or step == total:
            validate()
        if step % tc.save_every == 0 or step == total or (stop_after is not None and done_here >= stop_after):
            checkpoint()
        if stop_after is not None and done_here >= stop_after and step < total:
            bar.close()
            log.info("stopped at step %d of %d; call again to resume", step, total)
            return final
    bar.close()

    if (out_dir / "best" / "config.json").is_file():
        _replace_dir(out_dir / "best", final)
    else:
        _save_model_atomic(model, final)
    return final


class PrefixGenerator:
    """A generator: one caption per image embedding from a trained prefix captioner."""

    def __init__(self, cfg: GeneratorConfig, model_dir: Path):
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
