"""Each ImageCLEF year's metric set, how its means are formed, and when a medcap score is not comparable.

What each suite follows (the organisers' public evaluators, GitHub ``taubsity/clef-caption-evaluation``
for 2023/2025 and ``taubsity/clef-caption-evaluation-2026``, ``caption_prediction/evaluator.py``;
where the papers and the code differ, the code wins):

- ``imageclef2023``: BERTScore F1 (no idf) and ROUGE-1.
- ``imageclef2024`` (no public evaluator; the metric set of the papers): BERTScore, ROUGE-1,
  ROUGE-L, BLEU-1, BLEU-4, METEOR, CIDEr, BLEURT, CLIPScore, RefCLIPScore, ClinicalBLEURT,
  MedBERTScore.
- ``imageclef2025``: primary = mean(BERTScore, ROUGE-1, similarity), secondary = mean(MedCAT,
  AlignScore); BLEURT is reported beside them.
- ``imageclef2026``: Relevance = mean(BERTScore, ROUGE-1, similarity, BLEURT), Factuality =
  mean(MedCAT, AlignScore), Overall = mean(Relevance, Factuality). The evaluator reports
  Relevance as its ``score`` and Factuality as ``score_secondary``; the Overall is the task's.

Shared by 2025 and 2026 code: BERTScore is ``BERTScorer(model_type="microsoft/deberta-xlarge-mnli",
idf=True, idf_sents=<the preprocessed references>).score(...)[2]``, i.e. **F1** with idf over the
test set's references (a paper says recall; the code takes F1); ROUGE-1 is Hugging Face
``evaluate``'s ``rouge1`` F-measure without stemming; BLEURT is ``lucadiliello/BLEURT-20-D12``'s
logit for (reference, caption); BERTScore, ROUGE and BLEURT see preprocessed text (lowercase,
digits -> ``number``, no punctuation), AlignScore, MedCAT and the similarity the text as written.
The similarity is ``2.5 * max(cos(image, caption), 0)`` with MedImageInsight embeddings, 0 for an
empty caption. Every metric is a per-image score averaged over the images (a means is the mean
of its parts' means); an image whose reference and caption are both empty scores 1, except for
BLEURT (scored as given) and the similarity (0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORGANISERS_BERTSCORE = "microsoft/deberta-xlarge-mnli"  # layer 40 (bert-score's default for it)
ORGANISERS_BLEURT = "lucadiliello/BLEURT-20-D12"
ORGANISERS_SIMILARITY = "MedImageInsight"  # lion-ai/MedImageInsights; no medcap encoder loads it


@dataclass(frozen=True)
class SuiteSpec:
    """One year's metric set and how to combine it."""

    name: str
    metrics: tuple[str, ...]
    bertscore_idf: bool = False
    bertscore_measure: str = "f1"
    means: dict[str, tuple[str, ...]] = field(default_factory=dict)  # in order; a part may be an earlier mean
    organisers_models: bool = False  # the year's evaluator names its models: flag scores made with others


_2024 = (
    "bertscore",
    "rouge1",
    "rougeL",
    "bleu1",
    "bleu4",
    "meteor",
    "cider",
    "bleurt",
    "clipscore",
    "refclipscore",
    "clinicalbleurt",
    "medbertscore",
)
_2025 = ("bertscore", "rouge1", "bleurt", "similarity", "alignscore", "medcat")

SUITES: dict[str, SuiteSpec] = {
    "imageclef2023": SuiteSpec("imageclef2023", ("bertscore", "rouge1"), organisers_models=True),
    "imageclef2024": SuiteSpec("imageclef2024", _2024),
    "imageclef2025": SuiteSpec(
        "imageclef2025",
        _2025,
        bertscore_idf=True,
        means={"primary": ("bertscore", "rouge1", "similarity"), "secondary": ("medcat", "alignscore")},
        organisers_models=True,
    ),
    "imageclef2026": SuiteSpec(
        "imageclef2026",
        _2025,
        bertscore_idf=True,
        means={
            "relevance": ("bertscore", "rouge1", "similarity", "bleurt"),
            "factuality": ("medcat", "alignscore"),
            "overall": ("relevance", "factuality"),
        },
        organisers_models=True,
    ),
}


def not_comparable(spec: SuiteSpec, ran: list[str], settings: dict[str, Any]) -> dict[str, str]:
    """Metrics (and means) of ``ran`` scored with another model than the organisers', each with the reason.

    ``settings`` holds what the metrics ran with: ``bertscore_model``, ``bertscore_num_layers``,
    ``bertscore_measure``, ``similarity_encoder``, ``bleurt_checkpoint``, ``alignscore_checkpoint``,
    ``medcat_model_pack``. Only suites whose evaluator names its models are checked.
    """
    from medcap.eval.factuality import ALIGNSCORE_CHECKPOINT, MEDCAT_PACK

    flags: dict[str, str] = {}
    if not spec.organisers_models:
        return flags
    model, layers = settings.get("bertscore_model"), settings.get("bertscore_num_layers")
    if "bertscore" in ran:
        if model != ORGANISERS_BERTSCORE or layers not in (None, 40):
            layer = f" (layer {layers})" if layers is not None else ""
            flags["bertscore"] = f"BERTScore model {model!r}{layer}, not the organisers' {ORGANISERS_BERTSCORE}"
        elif settings.get("bertscore_measure") not in (None, spec.bertscore_measure):
            flags["bertscore"] = (
                f"BERTScore {settings['bertscore_measure']}, not the organisers' {spec.bertscore_measure}"
            )
    if "similarity" in ran:
        flags["similarity"] = (
            f"image-caption similarity from {settings.get('similarity_encoder')!r}, not the organisers' "
            f"{ORGANISERS_SIMILARITY}: not comparable with official scores"
        )
    bleurt = settings.get("bleurt_checkpoint")
    if "bleurt" in ran and bleurt != ORGANISERS_BLEURT and Path(str(bleurt)).name != ORGANISERS_BLEURT.split("/")[1]:
        flags["bleurt"] = f"BLEURT checkpoint {bleurt!r}, not the organisers' {ORGANISERS_BLEURT}"
    ckpt = settings.get("alignscore_checkpoint")
    if "alignscore" in ran and Path(str(ckpt)).name != ALIGNSCORE_CHECKPOINT:
        flags["alignscore"] = f"AlignScore checkpoint {ckpt!r}, not the organisers' {ALIGNSCORE_CHECKPOINT}"
    pack = settings.get("medcat_model_pack")
    if "medcat" in ran and Path(str(pack)).name.removesuffix(".zip") != MEDCAT_PACK:
        flags["medcat"] = f"MedCAT model pack {pack!r}, not the organisers' UMLS pack {MEDCAT_PACK}"
    for mean, parts in spec.means.items():
        flagged = [p for p in parts if p in flags]
        if flagged and mean in ran:
            flags[mean] = f"includes {', '.join(flagged)} (not comparable)"
    return flags
