"""What ``medcap run`` and ``medcap evaluate`` print for a VQA run: artifacts, the scores table, submissions."""

from __future__ import annotations

from typing import Any

import click

from medcap.files import read_json
from medcap.runs import is_fresh

COLUMNS = ("closed_accuracy", "open_recall", "open_f1", "open_exact", "open_bleu1")


def current_scores(pipe: Any) -> list[dict[str, Any]]:
    """Rows of the fresh VQA scores of this config: answer set, split, counts, means with intervals."""
    from medcap.vqa.stages import answer_sets, has_answers

    rows = []
    for split in pipe.cfg.data.query_splits:
        if not has_answers(pipe, split):
            continue
        for name in answer_sets(pipe):
            out = pipe.run.scores(name, split)
            if out.is_file() and is_fresh(out, pipe.key("evaluate-answers", name, split)):
                s = read_json(out)
                rows.append({"answer_set": name, "split": split, **s})
    return rows


def score_table(rows: list[dict[str, Any]]) -> str:
    from medcap.cli.show import table

    body = [["answer set", "split", "closed n", "open n", *COLUMNS]]
    for r in rows:
        cells = []
        for m in COLUMNS:
            v, ci = r["means"].get(m), r.get("intervals", {}).get(m)
            cells.append("-" if v is None else f"{v:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        body.append([r["answer_set"], r["split"], str(r["n_closed"]), str(r["n_open"]), *cells])
    return table(body, right=set(range(2, len(body[0]))))


def finish_vqa(pipe: Any) -> None:
    from medcap.cli.show import history, relpath

    history(pipe)
    rows = current_scores(pipe)
    if rows:
        click.echo("\n" + score_table(rows))
    for s in pipe.history:
        if s.stage == "submit-answers" and s.artifact.is_file():
            click.echo(f"\nsubmitted: {relpath(s.artifact)} (+ {relpath(s.artifact.with_suffix('.csv'))})")


def evaluate_vqa(cfg: Any, splits: list[str], names: list[str], command: str) -> None:
    """``medcap evaluate`` of a VQA run: score every answer set whose answers are up to date, print the table."""
    from medcap.cli.show import history
    from medcap.pipeline import Pipeline
    from medcap.vqa.stages import answer_need, answer_sets, has_answers

    pipe = Pipeline(cfg)
    unknown = [n for n in names if n not in answer_sets(pipe)]
    if unknown:
        raise ValueError(f"no answer set(s) {unknown}; have {answer_sets(pipe)}")
    with pipe.session(command):
        pipe.allowed = {"evaluate-answers"}
        for split in splits or cfg.data.query_splits:
            if not has_answers(pipe, split):
                click.echo(f"  skipped {split}: no reference answers")
                continue
            for name in names or answer_sets(pipe):
                if pipe.fresh(*answer_need(pipe, name, split)):
                    pipe.make("evaluate-answers", name, split)
                else:
                    click.echo(f"  skipped {name} on {split}: its answers are missing or out of date")
    history(pipe)
    rows = [r for r in current_scores(pipe) if not splits or r["split"] in splits]
    if rows:
        click.echo("\n" + score_table(rows))
