"""The 2025/2026 factuality metrics: AlignScore and the MedCAT concept F1, through their own packages.

Both follow the organisers' evaluator (``taubsity/clef-caption-evaluation-2026``,
``caption_prediction/evaluator.py`` and ``medcat_scorer.py``) and keep the pycocoevalcap contract
``metric(gts, res) -> (corpus mean, per image)``. Both score the texts as written (the organisers
do not preprocess them for these two), and an image whose reference and caption are both empty
scores 1.

- **AlignScore** (``alignscore`` package, PyPI ``alignscore-speedofmagic``): ``AlignScore(...,
  evaluation_mode="nli_sp").score(contexts=[reference], claims=[caption])``. The organisers pass
  ``model="roberta-large"`` with ``AlignScore-base.ckpt``; in their copy of the package the
  checkpoint's own backbone (RoBERTa-base) is rebuilt from its saved hyper-parameters and only
  the tokenizer comes from ``roberta-large`` (the same BPE vocabulary), so the model that scores
  is AlignScore-base. The PyPI fork builds the backbone from ``model``, so medcap passes the
  checkpoint's backbone, ``roberta-base``: the same scores. A blank caption scores 0 (the
  organisers' code fails on it: no sentence to score).
- **MedCAT** (``medcat`` 2.x; a 1.x model pack such as the organisers' UMLS pack is converted on
  load): links concepts in the reference and the caption, keeping only concepts of the 127
  MEDCON semantic types, and scores F1 of the caption's CUIs against the reference's (0 when
  either has none).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medcap.eval.metrics import Refs, _best, _pairs
from medcap.eval.text_metrics import resolve_checkpoint
from medcap.models.hub import ModelNotFoundError

log = logging.getLogger(__name__)

ALIGNSCORE_CHECKPOINT = "AlignScore-base.ckpt"  # the organisers' checkpoint (huggingface.co/yzha/AlignScore)
ALIGNSCORE_BACKBONE = "roberta-base"  # the backbone AlignScore-base was trained on
MEDCAT_PACK = "umls_self_train_model_pt2ch_3760d588371755d0"  # the organisers' UMLS model pack (MedCAT 1.x)
INSTALL = (
    'pip install "medcap[factuality]" && pip install --no-deps alignscore-speedofmagic==0.1.4 '
    "(its metadata pins transformers<5 and numpy<2; the code runs on medcap's stack)"
)
# MEDCON: the semantic types whose concepts the organisers' MedCATScorer keeps
_MEDCON = (
    "T048 T197 T088 T055 T029 T004 T043 T101 T129 T069 T045 T079 T167 T049 T010 T080 T121 T082 T066 T040 T170 "
    "T086 T058 T130 T195 T109 T127 T037 T125 T081 T071 T061 T126 T192 T077 T073 T168 T185 T089 T074 T001 T059 "
    "T104 T083 T051 T044 T002 T194 T028 T094 T057 T053 T090 T060 T056 T201 T171 T013 T190 T085 T087 T100 T042 "
    "T203 T031 T078 T047 T091 T052 T021 T017 T064 T103 T018 T098 T011 T116 T200 T012 T099 T008 T072 T041 T014 "
    "T030 T204 T016 T032 T020 T096 T097 T005 T120 T038 T191 T093 T092 T007 T019 T025 T122 T075 T046 T039 T065 "
    "T015 T114 T054 T095 T068 T063 T062 T102 T070 T033 T050 T184 T123 T034 T026 T169 T067 T024 T131 T196 T022 "
    "T023"
)
MEDCON_TYPE_IDS = tuple(_MEDCON.split())


def _raw_pairs(gts: Refs, res: Refs) -> list[tuple[str, str, str]]:
    return _pairs(gts, res, clean=False)


# --------------------------------------------------------------------------- AlignScore


def load_alignscore(checkpoint: str, model: str = ALIGNSCORE_BACKBONE, *, batch_size: int = 32, device: str = "auto"):
    """The package's ``AlignScore`` scorer in ``nli_sp`` mode; :class:`ModelNotFoundError` naming what is missing."""
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_file():
        raise ModelNotFoundError(
            f"AlignScore checkpoint {checkpoint!r}: no such file. Download {ALIGNSCORE_CHECKPOINT} "
            "(huggingface.co/yzha/AlignScore) on a connected machine and set eval.alignscore_checkpoint=PATH"
        )
    backbone = resolve_checkpoint(model, "AlignScore backbone")
    try:
        import nltk
        from alignscore import AlignScore
    except ImportError as e:
        raise ImportError(f"AlignScore needs its package: {INSTALL}; import failed: {e}") from e
    try:  # the package splits texts into sentences with nltk's punkt_tab
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        raise ModelNotFoundError(
            "AlignScore needs nltk's punkt_tab sentence splitter: python -m nltk.downloader punkt_tab"
        ) from None
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        return AlignScore(
            model=backbone,
            batch_size=batch_size,
            device=dev,
            ckpt_path=str(ckpt),
            evaluation_mode="nli_sp",
            verbose=False,
        )
    except OSError as e:
        if "en_core_web_sm" in str(e):  # loaded at start-up, though nli_sp never uses it
            raise ModelNotFoundError(
                f"AlignScore's package loads spaCy's en_core_web_sm: python -m spacy download en_core_web_sm ({e})"
            ) from e
        raise ModelNotFoundError(f"AlignScore backbone {model!r} could not be loaded: {e}") from e


def alignscore(gts: Refs, res: Refs, *, scorer: Any) -> tuple[float, dict[str, float]]:
    """AlignScore of each caption (claim) against its reference (context); see the module docstring."""
    pairs = _raw_pairs(gts, res)
    scores = [1.0 if not h and not r else 0.0 for _, h, r in pairs]
    todo = [k for k, (_, h, _) in enumerate(pairs) if h.strip()]
    if todo:
        values = scorer.score(contexts=[pairs[k][2] for k in todo], claims=[pairs[k][1] for k in todo])
        for k, v in zip(todo, values, strict=True):
            scores[k] = float(v)
    return _best(gts, pairs, scores)


# --------------------------------------------------------------------------- MedCAT


def load_medcat(model_pack: str, type_ids: Iterable[str] = MEDCON_TYPE_IDS):
    """A MedCAT ``CAT`` from a model pack (zip or folder) that links only concepts of ``type_ids``."""
    path = Path(model_pack).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"MedCAT model pack {model_pack!r}: no such file or folder. The organisers use the UMLS pack "
            f"{MEDCAT_PACK}.zip (needs a UMLS licence; medcat.rosalind.kcl.ac.uk); set eval.medcat_model_pack=PATH"
        )
    # importing medcat asks PyPI for a newer version (a network call) unless this is set
    os.environ.setdefault("MEDCAT_DISABLE_VERSION_CHECK", "true")
    try:
        from medcat.cat import CAT
    except ImportError as e:
        raise ImportError(f"the MedCAT score needs its package: {INSTALL}; import failed: {e}") from e
    cat = CAT.load_model_pack(str(path))
    wanted = set(type_ids)
    types = cat.cdb.type_id2info
    cuis = set().union(*(types[t].cuis for t in wanted if t in types))
    if not cuis:
        raise ModelNotFoundError(
            f"MedCAT model pack {model_pack!r} has no concept of the wanted semantic types "
            f"({len(wanted)} types, e.g. {sorted(wanted)[:3]}); its types: {sorted(types)[:10]}"
        )
    cat.config.components.linking.filters.cuis = cuis
    return cat


def concept_f1(true_cuis: list[str], pred_cuis: list[str]) -> float:
    """F1 of the predicted CUIs against the true ones (the organisers' MedCatScorer.score; 0 when either is empty)."""
    correct = sum(1 for cui in true_cuis if cui in pred_cuis)
    precision = correct / len(pred_cuis) if pred_cuis else 0.0
    recall = correct / len(true_cuis) if true_cuis else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def medcat_score(gts: Refs, res: Refs, *, cat: Any) -> tuple[float, dict[str, float]]:
    """The MedCAT concept F1 of each caption against its reference (texts as written); see the module docstring."""
    pairs = _raw_pairs(gts, res)
    cache: dict[str, list[str]] = {}

    def cuis(text: str) -> list[str]:
        if text not in cache:  # references and constant captions repeat: link each text once
            seen: list[str] = []
            for ent in cat.get_entities(text).get("entities", {}).values():  # "" gives {}
                if ent["cui"] not in seen:
                    seen.append(ent["cui"])
            cache[text] = seen
        return cache[text]

    scores = [1.0 if not h and not r else concept_f1(cuis(r), cuis(h)) for _, h, r in pairs]
    return _best(gts, pairs, scores)
