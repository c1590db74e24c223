"""How good a run's neighbours are, before any caption is written: ``medcap evaluate --retrieval``.

For one query split's neighbour lists (``neighbours/SPLIT.jsonl``):

- **label recall and precision**: Recall@k, the share of queries with a neighbour of the same label
  among their top k, and P@k, the mean share of the top k that has the query's label. Labels are the
  case (``Example.group``: normally 0, since same-case neighbours are excluded) and metadata columns
  such as MedPix's ``location`` and ``location_category`` (:data:`LABEL_COLUMNS`). A query without a
  label is left out; a neighbour without one counts as a miss.
- **caption agreement**: the mean over queries of the mean score of its top-k neighbours' captions
  against its reference, on the organisers' preprocessed text (ROUGE-1, and BERTScore F1 with the
  run's ``eval.bertscore_model``, no idf). Queries without a reference are left out.

The measures are pure functions of records and dicts; :func:`evaluate_retrieval` reads a run's
files, computes them per split and writes ``scores/retrieval-SPLIT.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.eval.imageclef import preprocess
from medcap.records import NeighbourList

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

LABEL_COLUMNS = ("location", "location_category", "region")  # metadata.csv columns tried (MedPix; phantom)
RECALL_KS = (1, 5, 10)
PRECISION_K = 10
CAPTION_KS = (1, 5)

PairScore = Callable[[Sequence[str], Sequence[str]], Sequence[float]]  # aligned (hypothesis, reference) pairs


def cutoffs(ks: Sequence[int], k: int) -> list[int]:
    """The ``ks`` a run with ``k`` neighbours can report: those up to ``k``, and ``k`` itself below the largest."""
    out = [x for x in ks if x <= k]
    if 0 < k < max(ks) and k not in out:
        out.append(k)
    return out


def label_recall(lists: Sequence[NeighbourList], labels: Mapping[str, str], ks: Sequence[int]) -> dict[int, float]:
    """Recall@k: the share of labelled queries with a same-label neighbour among their first k."""
    queries = [nl for nl in lists if labels.get(nl.id)]
    out = {}
    for k in ks:
        hits = [any(labels.get(n.id) == labels[nl.id] for n in nl.neighbours[:k]) for nl in queries]
        out[k] = sum(hits) / len(hits) if hits else float("nan")
    return out


def label_precision(lists: Sequence[NeighbourList], labels: Mapping[str, str], k: int) -> float:
    """P@k: the mean share of a labelled query's first k neighbours (fewer if it has fewer) with its label."""
    shares = []
    for nl in lists:
        label, top = labels.get(nl.id), nl.neighbours[:k]
        if label and top:
            shares.append(sum(labels.get(n.id) == label for n in top) / len(top))
    return sum(shares) / len(shares) if shares else float("nan")


def caption_agreement(
    lists: Sequence[NeighbourList], refs: Mapping[str, str | None], score: PairScore, ks: Sequence[int]
) -> dict[int, float]:
    """Mean over queries with a reference of the mean ``score`` of their first k neighbours' captions.

    Both sides get the organisers' preprocessing first; a neighbour without a caption counts as blank.
    """
    queries = [nl for nl in lists if refs.get(nl.id) is not None and nl.neighbours]
    depth = max(ks, default=0)
    hyps, gold, owner = [], [], []
    for q, nl in enumerate(queries):
        reference = preprocess(refs[nl.id] or "")
        for n in nl.neighbours[:depth]:
            hyps.append(preprocess(n.caption or ""))
            gold.append(reference)
            owner.append(q)
    values = list(score(hyps, gold)) if hyps else []
    per_query: list[list[float]] = [[] for _ in queries]
    for q, v in zip(owner, values, strict=True):
        per_query[q].append(float(v))
    out = {}
    for k in ks:
        means = [sum(v[:k]) / len(v[:k]) for v in per_query]
        out[k] = sum(means) / len(means) if means else float("nan")
    return out


def rouge1_pairs(hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
    """ROUGE-1 F of aligned pairs as :func:`medcap.eval.metrics.rouge1` scores them (both blank: 1)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    return [
        1.0 if not h.strip() and not r.strip() else scorer.score(r, h)["rouge1"].fmeasure
        for h, r in zip(hyps, refs, strict=True)
    ]


def retrieval_quality(
    lists: Sequence[NeighbourList],
    labels: Mapping[str, Mapping[str, str]],
    refs: Mapping[str, str | None],
    scores: Mapping[str, PairScore],
) -> dict[str, Any]:
    """Every measure of one split: ``labels`` maps a label name to {image ID: label} (queries and neighbours),
    ``scores`` a caption metric name to its pair scorer. Fractions in 0..1; keys of k are strings (JSON)."""
    k = max((len(nl.neighbours) for nl in lists), default=0)
    ks, pk, cks = cutoffs(RECALL_KS, k), min(PRECISION_K, k), cutoffs(CAPTION_KS, k)
    out: dict[str, Any] = {"n": len(lists), "k": k, "labels": {}, "captions": {}}
    for name, by_id in labels.items():
        out["labels"][name] = {
            "n": sum(1 for nl in lists if by_id.get(nl.id)),
            "recall": {str(x): _num(v) for x, v in label_recall(lists, by_id, ks).items()},
            "precision": {str(pk): _num(label_precision(lists, by_id, pk))} if pk else {},
        }
    with_ref = sum(1 for nl in lists if refs.get(nl.id) is not None and nl.neighbours)
    if with_ref:
        out["captions"] = {"n": with_ref}
        for name, score in scores.items():
            out["captions"][name] = {str(x): _num(v) for x, v in caption_agreement(lists, refs, score, cks).items()}
    return out


def _num(value: float) -> float | None:
    return None if value != value else float(value)  # NaN (nothing to average) -> null in JSON


def read_labels(data_root: str | Path, data_format: str, columns: Sequence[str] = LABEL_COLUMNS) -> dict[str, dict]:
    """{column: {image ID: value}} of those ``columns`` the data set's ``metadata.csv`` has (ImageCLEF layout only)."""
    from medcap.data.tables import read_csv_table

    path = Path(data_root) / "metadata.csv"
    if data_format != "imageclef" or not path.is_file():
        return {}
    table = read_csv_table(path, ["ID"], columns)
    found = [c for c in columns if c in table.columns]
    out: dict[str, dict] = {c: {} for c in found}
    for _, rec in table.rows:
        for c in found:
            if rec[c].strip():
                out[c].setdefault(rec["ID"].strip(), rec[c].strip())
    return out


def evaluate_retrieval(pipe: Pipeline, splits: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Score the neighbours of each of ``splits`` that has them and write ``scores/retrieval-SPLIT.json``.

    Returns the reports by split and notes for the user (splits without neighbours, stale neighbours,
    labels or metrics that are not available).
    """
    from medcap.eval.metrics import load_bertscorer
    from medcap.files import read_jsonl, write_json
    from medcap.models.hub import ModelNotFoundError

    cfg = pipe.cfg
    notes: list[str] = []
    todo = [s for s in splits if pipe.run.neighbours(s).is_file()]
    notes += [f"skipped {s}: no neighbours (run `medcap retrieve`)" for s in splits if s not in todo]
    if not todo:
        return {}, notes
    meta = read_labels(cfg.data.root, cfg.data.format)
    if not meta:
        notes.append(f"no metadata column {'/'.join(LABEL_COLUMNS)} in the data set: only the case is compared")
    index_groups = {ex.id: ex.group for ex in pipe.split(cfg.data.index_split).examples if ex.group}
    scores: dict[str, PairScore] = {"rouge1": rouge1_pairs}
    try:
        scorer = load_bertscorer(
            cfg.eval.bertscore_model,
            cfg.eval.bertscore_num_layers,
            batch_size=cfg.eval.batch_size,
            device=cfg.eval.device,
        )
        scores["bertscore"] = lambda h, r: scorer.pairs(h, r)[:, 2]  # F1, no idf
    except (ModelNotFoundError, ValueError) as e:
        notes.append(f"BERTScore left out: {e}")
    reports = {}
    for split in todo:
        path = pipe.run.neighbours(split)
        if not pipe.fresh("retrieve", split):
            notes.append(f"{split}: {path.name} was made with other settings than the run's config; scored anyway")
        lists = [NeighbourList.from_json(row) for row in read_jsonl(path)]
        examples = pipe.split(split).examples
        groups = index_groups | {ex.id: ex.group for ex in examples if ex.group}
        labels = ({cfg.data.group_column or "case": groups} if groups else {}) | meta
        report = retrieval_quality(lists, labels, {ex.id: ex.caption for ex in examples}, scores)
        report |= {"split": split, "bertscore_model": cfg.eval.bertscore_model if "bertscore" in scores else None}
        write_json(pipe.run.root / "scores" / f"retrieval-{split}.json", report)
        reports[split] = report
    return reports, notes


def table_rows(reports: Mapping[str, Mapping[str, Any]]) -> tuple[list[list[str]], list[list[str]]]:
    """Two tables as rows of cells (header first): label recall/precision, and caption agreement."""
    cols = sorted(
        {key for r in reports.values() for lab in r["labels"].values() for key in _label_cells(lab)}, key=_order
    )
    labels = [["split", "label", "n", *cols]]
    for split, r in reports.items():
        for name, lab in r["labels"].items():
            cells = _label_cells(lab)
            labels.append([split, name, str(lab["n"]), *(_fmt(cells.get(c)) for c in cols)])
    metrics = sorted({m for r in reports.values() for m in r["captions"] if m != "n"})
    ks = sorted({int(x) for r in reports.values() for m in metrics for x in r["captions"].get(m, {})})
    captions = [["split", "n", *(f"{m}@{x}" for m in metrics for x in ks)]]
    for split, r in reports.items():
        if r["captions"]:
            cells = [_fmt(r["captions"].get(m, {}).get(str(x))) for m in metrics for x in ks]
            captions.append([split, str(r["captions"]["n"]), *cells])
    return labels, captions


def _label_cells(lab: Mapping[str, Any]) -> dict[str, float]:
    return {f"R@{k}": v for k, v in lab["recall"].items()} | {f"P@{k}": v for k, v in lab["precision"].items()}


def _order(col: str) -> tuple[int, int]:
    return (col[0] == "P", int(col.split("@")[1]))


def _fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"
