"""Reference-based text metrics beyond ROUGE-1/BERTScore: ROUGE-L, BLEU-n, METEOR, CIDEr and BLEURT.

Every metric keeps the pycocoevalcap contract of :mod:`medcap.eval.metrics`,
``metric(gts, res) -> (corpus, per_image)``, and scores preprocessed text by default
(:func:`medcap.eval.imageclef.preprocess`: lowercase, digits -> ``number``, no punctuation).

The organisers apply that preprocessing to BERTScore, ROUGE and BLEURT (2023, 2025, 2026 code).
No 2024 evaluator is public, so for BLEU, METEOR and CIDEr medcap applies the same
preprocessing and then splits on whitespace instead of running pycocoevalcap's Java PTB
tokenizer (after preprocessing no punctuation is left for it to split off).

- ROUGE-L: ``rouge-score``'s ``rougeL`` F-measure (sentence LCS, no stemming).
- BLEU-n: pycocoevalcap ``Bleu`` (``closest`` reference length). Its per-image values are its own
  sentence-level BLEU, whose only smoothing is a 1e-9 added to each n-gram precision (so a
  sentence without a matching 4-gram gets ~0 BLEU-4). ``aggregate="corpus"`` returns the
  library's corpus BLEU; ``"mean"`` the mean of the per-image values (the organisers' habit).
- METEOR: pycocoevalcap ``Meteor`` (Meteor 1.5 jar, needs Java; ~15 s start-up a call).
- CIDEr: pycocoevalcap ``Cider`` (CIDEr-D: sigma 6, clipped counts, x10); idf over ``gts``.
- BLEURT: a BLEURT checkpoint (``lucadiliello/BLEURT-20-D12``) through ``bleurt-pytorch``, or any
  ``transformers`` sequence-classification checkpoint whose first logit is the score (how a
  ClinicalBLEURT or other converted checkpoint can be plugged in), scoring ``(reference, candidate)``.

A pair that is empty on both sides scores 1 for ROUGE-L, BLEU, METEOR and CIDEr (as the
organisers do for ROUGE); BLEURT scores whatever it is given, as the 2026 evaluator does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from medcap.eval.metrics import Refs, _best, _in_hub_cache, _offline, _pairs
from medcap.models.hub import ModelNotFoundError

log = logging.getLogger(__name__)

BLEURT_DEFAULT = "lucadiliello/BLEURT-20-D12"
AGGREGATES = ("corpus", "mean")


def _tokens(text: str) -> str:
    return " ".join(text.split())


def _split(gts: Refs, res: Refs, clean: bool) -> tuple[Refs, Refs, list[str]]:
    """Normalised (gts, res) for the library and the IDs that are empty on both sides (score 1)."""
    pairs = _pairs(gts, res, clean)  # validates IDs and one hypothesis per image
    g: Refs = {}
    r: Refs = {}
    for image_id, hyp, ref in pairs:
        g.setdefault(image_id, []).append(_tokens(ref))
        r[image_id] = [_tokens(hyp)]
    both_empty = [i for i in g if not r[i][0] and not any(g[i])]
    return g, r, both_empty


def _finish(
    gts: Refs, scores: dict[str, float], both_empty: list[str], corpus: float | None
) -> tuple[float, dict[str, float]]:
    per_image = {i: 1.0 if i in both_empty else float(scores[i]) for i in gts}
    mean = sum(per_image.values()) / len(per_image) if per_image else math.nan
    return (mean if corpus is None else float(corpus)), per_image


def rouge_l(gts: Refs, res: Refs, *, clean: bool = True) -> tuple[float, dict[str, float]]:
    """ROUGE-L F-measure (``rouge-score`` ``rougeL``, no stemming) per image; corpus = mean."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = _pairs(gts, res, clean)
    scores = [1.0 if not h and not r else float(scorer.score(r, h)["rougeL"].fmeasure) for _, h, r in pairs]
    return _best(gts, pairs, scores)


def bleu(
    gts: Refs, res: Refs, *, n: int = 4, clean: bool = True, aggregate: str = "corpus"
) -> tuple[float, dict[str, float]]:
    """Cumulative BLEU-``n`` of pycocoevalcap (all references at once); see the module docstring."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    from pycocoevalcap.bleu.bleu import Bleu

    g, r, both_empty = _split(gts, res, clean)
    todo = [i for i in g if i not in both_empty]
    scores: dict[str, float] = {}
    corpus = None
    if todo:
        score, per = Bleu(n).compute_score({i: g[i] for i in todo}, {i: r[i] for i in todo}, verbose=0)
        scores = dict(zip(todo, per[n - 1], strict=True))
        corpus = score[n - 1] if aggregate == "corpus" and not both_empty else None
    if aggregate == "corpus" and both_empty:
        log.warning("BLEU: %d image(s) empty on both sides score 1; corpus BLEU is the per-image mean", len(both_empty))
    return _finish(g, scores, both_empty, corpus)


def meteor(gts: Refs, res: Refs, *, clean: bool = True, aggregate: str = "corpus") -> tuple[float, dict[str, float]]:
    """METEOR 1.5 of pycocoevalcap (Java); ``aggregate="corpus"``: the jar's aggregate score."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    import shutil

    if shutil.which("java") is None:
        raise ModelNotFoundError("METEOR needs a Java runtime (java on PATH), e.g. apt-get install openjdk-17-jre")
    from pycocoevalcap.meteor.meteor import Meteor

    g, r, both_empty = _split(gts, res, clean)
    # the jar misreads blank lines: an empty side is scored 0 here, without it
    todo = [i for i in g if r[i][0] and all(g[i])]
    scores = {i: 0.0 for i in g}
    corpus = None
    if todo:
        scorer = Meteor()
        try:
            score, per = scorer.compute_score({i: g[i] for i in todo}, {i: r[i] for i in todo})
        finally:  # pycocoevalcap only stops the jar in __del__
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
        scores.update(zip(todo, (float(v) for v in per), strict=True))
        corpus = score if aggregate == "corpus" and len(todo) == len(g) else None
    return _finish(g, scores, both_empty, corpus)


def cider(gts: Refs, res: Refs, *, clean: bool = True) -> tuple[float, dict[str, float]]:
    """CIDEr-D of pycocoevalcap per image (document frequencies over the references of ``gts``); corpus = mean."""
    from pycocoevalcap.cider.cider import Cider

    g, r, both_empty = _split(gts, res, clean)
    todo = [i for i in g if i not in both_empty]
    scores: dict[str, float] = {}
    if todo:
        _, per = Cider().compute_score({i: g[i] for i in todo}, {i: r[i] for i in todo})
        scores = dict(zip(todo, (float(v) for v in per), strict=True))
    return _finish(g, scores, both_empty, None)


# --------------------------------------------------------------------------- BLEURT


def resolve_checkpoint(checkpoint: str, what: str = "BLEURT") -> str:
    """A local folder or a hub id usable now; :class:`ModelNotFoundError` saying how to provide it otherwise."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{what} checkpoint {checkpoint!r}: no config.json in that folder")
        return str(path)
    how = (
        f"{what} checkpoint {checkpoint!r} is not available offline. Download it on a connected machine "
        f"(`huggingface-cli download {checkpoint}`) and copy the Hugging Face cache here, or give a local folder"
    )
    if checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") > 1:
        raise ModelNotFoundError(f"{what} checkpoint {checkpoint!r}: no such folder")
    if _offline() and not _in_hub_cache(checkpoint):
        raise ModelNotFoundError(how)
    return checkpoint


def _load_bleurt(checkpoint: str, device: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, torch device) for ``checkpoint``: bleurt-pytorch for ``model_type: bleurt``, else transformers."""
    import torch
    from transformers import AutoConfig

    source = resolve_checkpoint(checkpoint)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except ValueError:  # transformers does not know model_type "bleurt"
        model_type = "bleurt"
    except OSError as e:
        raise ModelNotFoundError(f"BLEURT checkpoint {checkpoint!r} could not be read: {e}") from e
    if model_type == "bleurt":
        try:
            from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer
        except ImportError as e:
            raise ImportError(
                f"BLEURT checkpoint {checkpoint!r} needs the bleurt-pytorch package "
                f"(pip install git+https://github.com/lucadiliello/bleurt-pytorch.git), which does not import here: {e}"
            ) from e
        model, tokenizer = (
            BleurtForSequenceClassification.from_pretrained(source),
            BleurtTokenizer.from_pretrained(source),
        )
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(dev).eval(), tokenizer, dev


def bleurt(
    gts: Refs,
    res: Refs,
    *,
    checkpoint: str = BLEURT_DEFAULT,
    batch_size: int = 16,
    device: str = "auto",
    clean: bool = True,
) -> tuple[float, dict[str, float]]:
    """BLEURT per image (the first logit for ``(reference, candidate)``, truncated at 512 tokens); corpus = mean."""
    import torch

    pairs = _pairs(gts, res, clean)
    model, tokenizer, dev = _load_bleurt(checkpoint, device)
    scores: list[float] = []
    for start in range(0, len(pairs), max(1, batch_size)):
        batch = pairs[start : start + batch_size]
        inputs = tokenizer(
            [r for _, _, r in batch],
            [h for _, h, _ in batch],
            padding="longest",
            truncation=True,
            max_length=512,
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = model(**{k: v.to(dev) for k, v in inputs.items()}).logits
        scores.extend(logits[:, 0].float().cpu().tolist())
    return _best(gts, pairs, scores)
