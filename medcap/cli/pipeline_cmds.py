"""``medcap run``, one command per stage, ``medcap train``, ``medcap ablate`` and ``medcap demo``."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

from medcap.cli.common import config_argument, config_option, load, main, output_option, user_errors, verbosity
from medcap.cli.show import history, plan, relpath, scores
from medcap.tasks import all_stages


def _command() -> str:
    return "medcap " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def pipeline_of(config: str, overrides: tuple[str, ...], limit: int | None = None):
    from medcap.pipeline import Pipeline

    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        overrides = (*overrides, f"data.limit={limit}")
    cfg = load(config, overrides)
    if limit is not None:  # a smoke run never overwrites the full run's artifacts
        cfg.name = f"{cfg.name}-limit{limit}"
    return Pipeline(cfg)


def finish(pipe) -> None:
    """The end of a command that ran stages: what it made, the scores, what was submitted."""
    from medcap.eval.stage import current_scores

    if pipe.cfg.task == "vqa":
        from medcap.vqa.show import finish_vqa

        return finish_vqa(pipe)

    history(pipe)
    scores(current_scores(pipe))
    from medcap.runs import Manifest

    submitted = [s for s in pipe.history if s.stage == "submit"]
    if submitted:
        out = submitted[-1].artifact
        info = (Manifest.read(out) or Manifest("submit", "")).info or {}
        click.echo(f"\nsubmitted: {pipe.submitted} -> {relpath(Path(info.get('upload', out)))}")
        for image, how in (info.get("fallbacks") or {}).items():
            click.echo(f"  fallback {image}: {how}")


@main.command("run")
@config_argument
@click.option("--only", multiple=True, type=click.Choice(all_stages()), help="Run only this stage (repeatable).")
@click.option("--skip", multiple=True, type=click.Choice(all_stages()), help="Skip this stage (repeatable).")
@click.option(
    "--limit", type=int, default=None, metavar="N", help="Only the first N images of each split (run NAME-limitN)."
)
@click.option("--dry-run", is_flag=True, help="Print the plan (cached, to run and why) and stop.")
@click.option(
    "--launcher",
    type=click.Choice(["accelerate", "torchrun"]),
    default=None,
    help="Hand every training to this launcher (train.processes processes, else its own config); "
    "other stages stay in this process. Without it a training with train.processes > 1 goes to accelerate.",
)
@verbosity
@user_errors
def run_cmd(
    config: str, overrides: tuple[str, ...], only, skip, limit: int | None, dry_run: bool, launcher: str | None
) -> None:
    """Run the whole pipeline of CONFIG, cached and resumable.

    Stages: embed, index, retrieve, train, generate, synthesize, pool, train-fuser, fuse, evaluate, submit.
    A VQA config (task: vqa): embed, questions, train-answerer, answer, fuse-answers, evaluate-answers,
    submit-answers (docs/vqa.md).
    """
    pipe = pipeline_of(config, overrides, limit)
    if pipe.cfg.task == "vqa":  # the second task: its own checks and summary (medcap/vqa/)
        from medcap.vqa.preflight import preflight
    else:
        from medcap.preflight import preflight
    pipe.launcher = launcher
    wanted = pipe.plan(only, skip)  # unknown stage names fail before anything is written
    report = preflight(pipe, wanted)
    if dry_run:
        plan(pipe.dry_run(only, skip))
        report.echo()
        return
    report.raise_if_failed()
    report.echo(warnings_only=True)
    with pipe.session(_command()):
        pipe.run_stages(only, skip)
    finish(pipe)


STAGE_COMMANDS = {
    "embed": ("Embed the images of every split with the retrieval encoder.", ()),
    "index": ("Build the FAISS index of the index split.", ()),
    "retrieve": ("Find each query image's k nearest index images.", ()),
    "generate": ("Write candidate captions with every generator of the config.", ()),
    "synthesize": ("Merge neighbours' captions and caption sets with every synthesizer of the config.", ()),
}


def _stage_command(stage: str, help_text: str, allow: tuple[str, ...]) -> None:
    @config_argument
    @verbosity
    @user_errors
    def command(config: str, overrides: tuple[str, ...]) -> None:
        pipe = pipeline_of(config, overrides)
        with pipe.session(_command()):
            pipe.run_stages(only=[stage], allow=allow)
        history(pipe)

    command.__doc__ = help_text
    main.command(stage)(command)


for _stage, (_help, _allow) in STAGE_COMMANDS.items():
    _stage_command(_stage, _help, _allow)


@main.command("fuse")
@config_argument
@verbosity
@user_errors
def fuse_cmd(config: str, overrides: tuple[str, ...]) -> None:
    """Fuse the caption sets with every fuser of the config (training LM-Fusers first; inputs made if missing)."""
    from medcap.pipeline import STAGES
    from medcap.preflight import preflight

    pipe = pipeline_of(config, overrides)
    preflight(pipe, ["train-fuser", "fuse"]).raise_if_failed()
    with pipe.session(_command()):
        pipe.run_stages(only=["train-fuser", "fuse"], allow=list(STAGES))
    history(pipe)


@main.group()
@verbosity
def train() -> None:
    """Train models: a generator's (LoRA SFT, prefix captioner), a fuser's, the encoder's projections."""


@train.command("generator")
@click.argument("name")
@config_option
@click.option(
    "--folds",
    type=int,
    default=None,
    help="Cross-fit: K models on K-1 folds each write the held-out fold's candidates (honest fuser data).",
)
@verbosity
@user_errors
def train_generator_cmd(name: str, config: str, overrides: tuple[str, ...], folds: int | None) -> None:
    """Train generator NAME of CONFIG on the index split (its inputs are made or taken from the cache).

    Under `accelerate launch` or `torchrun` it trains data-parallel in the launched processes; rank 0
    makes missing inputs first and writes the model and its manifest.
    """
    from medcap.generators import needs_training
    from medcap.launch import make_trained
    from medcap.models.distributed import env_rank, launched

    if folds is not None:
        overrides = (*overrides, f"generators.{name}.folds={folds}")
    pipe = pipeline_of(config, overrides)
    cfg = pipe.generator_cfg(name)
    if not needs_training(cfg):
        raise ValueError(
            f"generator {name} ({cfg.kind}, mode {cfg.mode}) has nothing to train: "
            "use kind: prefix, or a multimodal LLM with mode: sft and no adapter"
        )
    if cfg.folds >= 2 and launched():
        raise ValueError(
            f"generator {name}: cross-fitting (folds: {cfg.folds}) trains its fold models inside generation, in one "
            "process; run it without a launcher (the model on the whole index split can be launched on its own)"
        )
    with pipe.session(_command()):
        pipe.allowed = {"embed", "index", "retrieve", "train", "generate"}
        make_trained(pipe, "train", name)
        if cfg.folds >= 2:
            pipe.make(
                "generate", name, pipe.cfg.data.index_split
            )  # trains the fold models, writes out-of-fold candidates
    if env_rank() == 0:
        history(pipe)
    if folds is not None:
        click.echo(
            f"\ncross-fitted {name} in {folds} folds. Later commands must see the same setting: add `folds: {folds}` "
            f"to generator {name} in {config}, or pass --set generators.{name}.folds={folds}"
        )


@train.command("fuser")
@click.argument("name")
@config_option
@verbosity
@user_errors
def train_fuser_cmd(name: str, config: str, overrides: tuple[str, ...]) -> None:
    """Train fuser NAME of CONFIG on its train split's caption sets (made if missing; leakage-checked).

    Under `accelerate launch` or `torchrun` it trains data-parallel in the launched processes.
    """
    from medcap.fuser import fuser_kind
    from medcap.launch import make_trained
    from medcap.models.distributed import env_rank
    from medcap.pipeline import STAGES
    from medcap.preflight import preflight

    pipe = pipeline_of(config, overrides)
    cs = pipe.caption_set(name)
    if cs.stage != "fuse" or not fuser_kind(cs.cfg.kind).trains(cs.cfg):
        raise ValueError(f"{name} has nothing to train: only fusers of kind lm learn")
    preflight(pipe, ["train-fuser"]).raise_if_failed()
    with pipe.session(_command()):
        pipe.allowed = set(STAGES)
        make_trained(pipe, "train-fuser", name)
    if env_rank() == 0:
        history(pipe)


@train.command("encoder")
@config_option
@output_option("Folder for the trained encoder (default: RUN/models/encoder-ENCODER).", file=False)
@verbosity
@user_errors
def train_encoder_cmd(config: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Train CONFIG's retrieval encoder's projections contrastively on the index split's (image, caption) pairs."""
    from medcap.retrieval.stages import train_encoder

    pipe = pipeline_of(config, overrides)
    with pipe.session(_command()):
        pipe.allowed = {"embed"}
        name, folder = train_encoder(pipe, Path(output) if output else None)
    history(pipe)
    click.echo(
        f"trained encoder: {name}\nuse it with --set eval.clip_encoder.name={name} "
        f"(or retrieval.encoder.name); recall in {folder}/medcap_encoder.json"
    )


@main.command("ablate")
@config_argument
@click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="NAME[@CAPTION_SET]:KEY=VALUE;...",
    help="A variant (repeatable), e.g. 'k1@consensus:retrieval.k=1'. Default: the config's ablation section.",
)
@click.option("--reference", default=None, help="Variant the others are tested against (default: the first).")
@click.option("--split", default=None, help="Split to score (default: the first query split).")
@click.option(
    "--cv",
    "folds",
    type=click.IntRange(min=2),
    default=None,
    metavar="K",
    help="Case-grouped K-fold cross-validation over the captioned splits instead of one split: cvK.md + cvK.png.",
)
@click.option(
    "--nested",
    type=click.IntRange(min=2),
    default=None,
    metavar="J",
    help="With --cv: in each outer fold a J-fold CV of its training images chooses the variant; the outer fold "
    "reports the choice (the 'nested choice' row).",
)
@verbosity
@user_errors
def ablate_cmd(config: str, overrides, variants, reference, split, folds, nested) -> None:
    """Run variants of CONFIG through the shared cache: ablation.md (table, intervals, tests) + ablation.png."""
    from medcap.ablate import parse_variant, run_ablation
    from medcap.cv import run_cv
    from medcap.pipeline import Pipeline

    cfg = load(config, overrides)
    if cfg.task == "vqa":  # every answer set of the config, on image-grouped folds (medcap/vqa/cv.py)
        from medcap.vqa.cv import run_vqa_cv

        if folds is None or variants or nested or split:
            raise click.UsageError("a VQA config is ablated with --cv K alone: every answer set of it is compared")
        with Pipeline(cfg).session(_command()):
            out = run_vqa_cv(cfg, folds)
        click.echo(out.read_text())
        click.echo(f"wrote {relpath(out)} and {relpath(out.with_suffix('.json'))}")
        return
    chosen = [parse_variant(v) for v in variants] or None
    if folds is not None and split is not None:
        raise click.UsageError("--cv and --split exclude each other: a CV scores every captioned split")
    if nested is not None and folds is None:
        raise click.UsageError("--nested needs --cv K: it nests a choice inside each of the K outer folds")
    with Pipeline(cfg).session(_command()):  # the ablation table and plot go into the main run folder
        if folds is None:
            result = run_ablation(cfg, chosen, reference, split)
        else:
            result = run_cv(cfg, folds, chosen, reference, nested)
    click.echo(result.table_md.read_text())
    click.echo(f"wrote {relpath(result.table_md)} and {relpath(result.plot)}")


@main.command("demo")
@output_option("Folder for the phantom data, the run and the report.", file=False)
@click.option("--out", "out_alias", default=None, hidden=True)
@click.option("--n", default=240, show_default=True, help="Phantom images to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a demo profile value.")
@verbosity
@user_errors
def demo_cmd(output: str | None, out_alias: str | None, n: int, overrides: tuple[str, ...]) -> None:
    """The whole ensemble on the synthetic phantom data set, on a CPU, offline (a few minutes).

    Writes the data to OUTPUT/data (default medcap-demo/), the run to OUTPUT/runs/demo.
    """
    from medcap.demo import run_demo

    start = time.time()
    result = run_demo(output or out_alias or "medcap-demo", n=n, overrides=list(overrides))
    scores(result.scores)
    click.echo(f"\nsubmitted: {result.submitted} -> {relpath(result.submission)}")
    click.echo(f"demo finished in {time.time() - start:.0f} s")
    for label, path in (
        ("run folder", result.run_dir),
        ("ablation", result.ablation),
        ("forest plot", result.plot),
        ("report", result.report),
        ("log", result.run_dir / "logs" / "run.log"),
    ):
        click.echo(f"  {label:<12} {relpath(path)}")
