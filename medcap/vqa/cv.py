"""``medcap ablate VQA_CONFIG --cv K``: image-grouped K-fold cross-validation of every answer set.

The index split's images are cut into K folds (paraphrases share an image and an answer, so never by
question); each fold's questions are answered by every answerer and fuser of the config with the other
K-1 folds as the index, under ``runs/NAME/cv{K}/fold-F``. The per-question scores of all folds make one
table: closed accuracy and open recall/F1/EM/BLEU-1 with 95 % intervals that resample images, the
breakdown by content type, and one-sided paired tests (by image) that the submitted answer set beats each
other one on closed accuracy. Written to ``cv{K}.md`` and ``cv{K}.json`` in the run folder.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from medcap.files import read_json, write_atomic, write_json
from medcap.vqa.metrics import CLOSED, OPEN, bootstrap, paired_test, per_question

log = logging.getLogger(__name__)


def run_vqa_cv(cfg: Any, k: int) -> Path:
    """Run the K folds (cached and resumable like any run) and write cv{K}.md; returns its path."""
    from medcap.configio import ConfigError
    from medcap.data.folds import group_folds
    from medcap.pipeline import Pipeline
    from medcap.vqa.stages import answer_sets, submitted

    if k < 2:
        raise ConfigError(f"--cv: at least 2 folds, got {k}")
    source = cfg.data.index_split
    probe = Pipeline(cfg)
    examples = probe.split(source).examples
    folds = group_folds([(ex, None) for ex in examples], k, cfg.seed)
    root = Path(cfg.run_dir) / f"cv{k}"
    peers = [Path(cfg.run_dir)]
    rows: dict[str, list[dict[str, Any]]] = {}
    for f, held in enumerate(folds):
        fcfg = copy.deepcopy(cfg)
        fcfg.runs_dir, fcfg.name = str(root), f"fold-{f}"
        query, index = f"cv{k}-{f}", f"cv{k}-{f}-index"
        fcfg.data.index_split, fcfg.data.query_splits = index, [query]
        pipe = Pipeline(fcfg, peers=list(peers))
        held_set = set(held)
        pipe.derive(index, [source], [ex.id for ex in examples if ex.id not in held_set])
        pipe.derive(query, [source], list(held))
        with pipe.session(f"medcap ablate --cv {k} (fold {f})"):
            pipe.run_stages(skip=("submit-answers",))
        for name in answer_sets(pipe):
            scored = read_json(pipe.path("evaluate-answers", name, query))["per_question"]
            rows.setdefault(name, []).extend({**r, "fold": f} for r in scored)
        peers.append(pipe.run.root)
        log.info("vqa cv: fold %d/%d done", f + 1, k)
    result = summarise_cv(rows, submitted(probe), cfg.vqa.bootstrap or 1000, cfg.seed)
    result.update({"k": k, "split": source, "folds": [len(h) for h in folds], "n_images": len(examples)})
    out = Path(cfg.run_dir) / f"cv{k}.md"
    write_json(out.with_suffix(".json"), result)
    write_atomic(out, cv_markdown(result, cfg.name))
    return out


def summarise_cv(rows: dict[str, list[dict[str, Any]]], reference: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Means, intervals and counts per answer set; paired tests of ``reference`` against each other set."""
    from medcap.vqa.metrics import _means

    table, tests, by_type = {}, {}, {}
    for name, scored in rows.items():
        scored = per_question(scored) if scored and "exact" not in scored[0] else scored
        table[name] = {
            "means": _means(scored),
            "intervals": bootstrap(scored, n_boot, seed),
            "n_closed": sum(r["answer_type"] == "CLOSED" for r in scored),
            "n_open": sum(r["answer_type"] == "OPEN" for r in scored),
        }
        types: dict[str, list] = {}
        for r in scored:
            types.setdefault(r["content_type"] or "-", []).append(r)
        by_type[name] = {t: {**_means(part), "n": len(part)} for t, part in sorted(types.items())}
    ref = {r["qid"]: r for r in rows.get(reference, []) if r["answer_type"] == "CLOSED"}
    for name, scored in rows.items():
        if name == reference or not ref:
            continue
        other = {r["qid"]: r for r in scored if r["answer_type"] == "CLOSED"}
        qids = [q for q in ref if q in other]
        tests[name] = paired_test(
            [ref[q]["exact"] for q in qids], [other[q]["exact"] for q in qids], [ref[q]["image_id"] for q in qids],
            n_boot=max(n_boot, 2000), seed=seed,
        )  # fmt: skip
    return {"reference": reference, "table": table, "p_closed_better": tests, "by_type": by_type}


def cv_markdown(result: dict[str, Any], name: str) -> str:
    cols = [*CLOSED, *OPEN]
    lines = [
        f"# {result['k']}-fold image-grouped CV of {name}",
        "",
        f"Split `{result['split']}`: {result['n_images']} images in folds of {result['folds']}; each fold answered "
        "with the other folds as index and training data. 95 % intervals resample images.",
        "",
        "| answer set | closed n | open n | " + " | ".join(cols) + f" | p (closed, {result['reference']} better) |",
        "|---|---:|---:|" + "---|" * len(cols) + "---:|",
    ]
    for n, t in result["table"].items():
        cells = []
        for c in cols:
            v, ci = t["means"].get(c), t["intervals"].get(c)
            shown = "-" if v is None else f"{100 * v:.1f}"
            cells.append(shown + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if v is not None and ci else ""))
        p = result["p_closed_better"].get(n)
        lines.append(
            f"| {n} | {t['n_closed']} | {t['n_open']} | "
            + " | ".join(cells)
            + f" | {'-' if p is None else f'{p:.4f}'} |"
        )
    ref = result["reference"]
    lines += ["", f"By content / question type ({ref}; closed accuracy, open recall, n):", ""]
    lines += ["| type | closed accuracy | open recall | n |", "|---|---:|---:|---:|"]
    for t, m in result["by_type"].get(ref, {}).items():
        ca, orc = m.get("closed_accuracy"), m.get("open_recall")
        lines.append(
            f"| {t} | {'-' if ca is None else f'{100 * ca:.1f}'} | {'-' if orc is None else f'{100 * orc:.1f}'} "
            f"| {m['n']} |"
        )
    return "\n".join(lines) + "\n"
