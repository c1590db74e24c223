"""``medcap evaluate``, ``submit``, ``validate`` and ``report``: what a run's captions are worth, and files to hand in."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from medcap.cli.common import main, output_option, run_config, user_errors, verbosity
from medcap.cli.pipeline_cmds import _command
from medcap.cli.show import history, scores
from medcap.eval.imageclef import known_years
from medcap.eval.suite_specs import SUITES

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

YEAR = click.Choice(known_years())  # the ImageCLEF years whose submission rules medcap knows


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--split", "splits", multiple=True, help="Split(s) to score (default: every query split).")
@click.option("--caption-set", "names", multiple=True, help="Caption set(s) to score (default: all of the run).")
@click.option(
    "--suite",
    type=click.Choice(list(SUITES)),
    default=None,
    help="Metric suite (default: the run's eval.suite), with all its metrics.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override e.g. eval.bertscore_model.")
@click.option(
    "--retrieval",
    is_flag=True,
    help="Score the neighbours instead: same-case/location recall and precision, neighbour captions vs references.",
)
@verbosity
@user_errors
def evaluate_cmd(run_dir: str, splits, names, suite: str | None, overrides, retrieval: bool) -> None:
    """Score a run's caption sets with the organisers' preprocessing (only sets whose captions are up to date).

    With --retrieval, score its neighbours instead and write scores/retrieval-SPLIT.json (docs/retrieval.md).
    """
    from medcap.eval.stage import current_scores, evaluate_run
    from medcap.pipeline import Pipeline

    cfg = run_config(run_dir, overrides)
    if cfg.task == "vqa":  # answer sets: closed accuracy, open recall/F1/EM/BLEU-1 (medcap/vqa/)
        from medcap.vqa.show import evaluate_vqa

        return evaluate_vqa(cfg, list(splits), list(names), _command())
    if retrieval:
        _evaluate_retrieval(Pipeline(cfg), list(splits) or cfg.data.query_splits)
        return
    if suite:
        cfg.eval.suite, cfg.eval.metrics = suite, None
    pipe = Pipeline(cfg)
    for name in names:
        pipe.caption_set(name)  # an unknown name fails before anything is scored
    splits = list(splits) or cfg.data.query_splits
    with pipe.session(_command()):
        pipe.allowed = {"evaluate"}
        skipped = evaluate_run(pipe, list(names) or pipe.caption_sets, splits)
    history(pipe)
    for why in skipped:
        click.echo(f"  skipped {why}")
    scores(current_scores(pipe, splits))


def _evaluate_retrieval(pipe: Pipeline, splits: list[str]) -> None:
    """``evaluate --retrieval``: write scores/retrieval-SPLIT.json and print two tables (docs/retrieval.md)."""
    from medcap.cli.show import relpath, table
    from medcap.eval.retrieval_quality import evaluate_retrieval, table_rows

    with pipe.session(_command()):
        reports, notes = evaluate_retrieval(pipe, splits)
    for note in notes:
        click.echo(f"  {note}")
    if not reports:
        return
    for split in reports:
        click.echo(f"wrote {relpath(pipe.run.root / 'scores' / f'retrieval-{split}.json')}")
    labels, captions = table_rows(reports)
    if len(labels) > 1:
        click.echo("\nneighbours with the query's label (recall R@k, precision P@k)\n")
        click.echo(table(labels, right=set(range(2, len(labels[0])))))
    if len(captions) > 1:
        click.echo("\nneighbour captions against the query's reference (mean of the top k)\n")
        click.echo(table(captions, right=set(range(1, len(captions[0])))))


@main.command("submit")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--caption-set", "name", default=None, help="Caption set to submit (default: the run's submit.caption_set)."
)
@click.option("--year", type=YEAR, default=None, help="Submission rules of this ImageCLEF year (default: the run's).")
@click.option("--split", default=None, help="Split to submit (default: test if queried, else the last query split).")
@output_option("Output file (default: RUN/submissions/NAME.csv).")
@verbosity
@user_errors
def submit_cmd(run_dir: str, name: str | None, year: int | None, split: str | None, output: str | None) -> None:
    """Write a competition submission file from a run, validated against every rule of the year."""
    from medcap.eval.stage import write_checked_submission
    from medcap.pipeline import Pipeline

    pipe = Pipeline(run_config(run_dir))
    name = name or pipe.submitted
    year = year or pipe.cfg.submit.year
    out = Path(output) if output else pipe.run.submission(name)
    with pipe.session(_command()):
        pipe.allowed = set()  # the captions must exist: submitting never generates
        written, fallbacks = write_checked_submission(pipe, name, split or pipe.submit_split, year, out)
    click.echo(f"wrote {written} (valid for {year})")
    for image, how in fallbacks.items():
        click.echo(f"  fallback {image}: {how}")


@main.command("validate")
@click.argument("submission", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--testset",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="The test set's ID,Caption CSV (or a list of IDs), in ground-truth order.",
)
@click.option("--year", type=YEAR, default=2024, show_default=True, help="Submission rules of this ImageCLEF year.")
@verbosity
@user_errors
def validate_cmd(submission: str, testset: str, year: int) -> None:
    """Check a submission file against a test set with every rule of YEAR."""
    from medcap.eval.submission import check_submission, read_test_ids

    check = check_submission(Path(submission), read_test_ids(Path(testset)), year)
    for p in check.errors:
        click.echo(str(p))
    for w in check.warnings:
        click.echo(f"warning: {w}")
    if check.errors:
        click.echo(f"{len(check.errors)} problem(s): {submission} would be rejected in {year}", err=True)
        sys.exit(1)
    click.echo(f"{submission}: valid for {year}" + (f" ({len(check.warnings)} warning(s))" if check.warnings else ""))


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default=None, help="Split to show (default: the first query split with artifacts).")
@click.option("--max-images", type=int, default=None, help="Show only the first N images.")
@output_option("Output HTML file (default: RUN/report.html).")
@verbosity
@user_errors
def report_cmd(run_dir: str, split: str | None, max_images: int | None, output: str | None) -> None:
    """Write RUN_DIR/report.html: a self-contained gallery of images, neighbours, captions and scores."""
    from medcap.eval.report import write_report
    from medcap.pipeline import Pipeline

    pipe = Pipeline(run_config(run_dir))
    if pipe.cfg.task == "vqa":  # a card per image: its questions, every answer set's answer, the reference
        from medcap.vqa.report import write_vqa_report

        with pipe.session(_command()):
            path = write_vqa_report(pipe, Path(output) if output else None, split=split, max_images=max_images)
        click.echo(f"wrote {path}")
        return
    with pipe.session(_command()):
        path = write_report(Path(run_dir), Path(output) if output else None, split=split, max_images=max_images)
    click.echo(f"wrote {path}")
