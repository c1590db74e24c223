"""The ``medcap`` command line: thin click commands that parse, load the config and call the library."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from medcap.config import ConfigError, DataConfig, load_config
from medcap.problems import InputError, ModelNotFoundError

USER_ERRORS = (ConfigError, InputError, ModelNotFoundError, FileNotFoundError, ValueError)


def _user_errors(fn):
    """Turn the errors a user can fix into a clean message and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from medcap.pipeline import StageInputError
        from medcap.runs import RunLockedError

        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, StageInputError, RunLockedError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.version_option(package_name="medcap")
def main(log_level: str) -> None:
    """medcap: diagnostic captions for medical images with a multi-stage ensemble."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


# --------------------------------------------------------------------------- data


@main.group()
def data() -> None:
    """Check or make data sets."""


@data.command("check")
@click.argument("data_dir")
@click.option(
    "--format", "fmt", default="imageclef", show_default=True, type=click.Choice(["imageclef", "manifest", "hf"])
)
@click.option("--split", "splits", multiple=True, help="Split(s) to check (default: all found).")
@click.option("--group-column", default="case_id", show_default=True, help="metadata.csv column naming the case.")
@click.option(
    "--image-dir", "image_dirs", multiple=True, help="Image folder template under DATA_DIR ({split} allowed)."
)
@_user_errors
def data_check(data_dir: str, fmt: str, splits: tuple[str, ...], group_column: str, image_dirs: tuple[str, ...]):
    """Validate a data set: every problem with its file and line; non-zero exit if any."""
    from medcap.data import check_dataset, list_splits

    cfg = DataConfig(root=data_dir, format=fmt, group_column=group_column or None)
    if image_dirs:
        cfg.image_dirs = list(image_dirs)
    wanted = list(splits) or list_splits(cfg)
    problems = check_dataset(cfg, wanted)
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {data_dir} (splits: {', '.join(wanted)})", err=True)
        sys.exit(1)
    click.echo(f"{data_dir}: OK (splits: {', '.join(wanted)})")


@data.command("synth")
@click.argument("out_dir")
@click.option("--n", default=240, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@_user_errors
def data_synth(out_dir: str, n: int, seed: int, size: int) -> None:
    """Write the synthetic phantom data set (ImageCLEF layout) to OUT_DIR."""
    from medcap.phantom import write_phantom

    path = write_phantom(out_dir, n=n, seed=seed, image_size=size)
    click.echo(f"wrote {n} phantom images to {path}")


# --------------------------------------------------------------------------- pipeline


def _config_options(fn):
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set retrieval.k=3 (repeatable).",
    )(fn)
    return click.argument("config", type=click.Path(dir_okay=False))(fn)


def _pipeline(config: str, overrides: tuple[str, ...]):
    from medcap.pipeline import Pipeline

    return Pipeline(load_config(config, overrides))


def _report(pipe) -> None:
    ran = [s for s in pipe.history if s.ran]
    cached = [s for s in pipe.history if not s.ran]
    click.echo(f"{len(ran)} artifact(s) written, {len(cached)} up to date, in {pipe.run.root}")
    for s in pipe.history:
        click.echo(f"  {'done  ' if s.ran else 'cached'} {s.stage:<9} {s.artifact}")


@main.command("run")
@_config_options
@click.option("--only", multiple=True, help="Run only this stage (repeatable).")
@click.option("--skip", multiple=True, help="Skip this stage (repeatable).")
@_user_errors
def run_cmd(config: str, overrides: tuple[str, ...], only: tuple[str, ...], skip: tuple[str, ...]) -> None:
    """Run the whole pipeline of CONFIG, cached and resumable."""
    from medcap.runs import summarise_scores

    pipe = _pipeline(config, overrides)
    pipe.run_stages(only, skip)
    _report(pipe)
    _print_scores(summarise_scores(pipe.run))


def _stage_command(stage: str, help_text: str):
    @_config_options
    @_user_errors
    def command(config: str, overrides: tuple[str, ...]) -> None:
        pipe = _pipeline(config, overrides)
        pipe.run_stages(only=[stage])
        _report(pipe)

    command.__doc__ = help_text
    return main.command(stage)(command)


_stage_command("embed", "Embed the images of every split with the retrieval encoder.")
_stage_command("index", "Build the FAISS index of the index split.")
_stage_command("retrieve", "Find each query image's k nearest index images.")
_stage_command("generate", "Write candidate captions with every generator of the config.")
_stage_command("synthesize", "Merge neighbours' captions and candidates with every synthesizer of the config.")
_stage_command("fuse", "Fuse the caption sets with every fuser of the config (training LM-Fusers first).")


@main.group()
def train() -> None:
    """Train models: a generator's LoRA adapter (SFT) or prefix captioner."""


@train.command("generator")
@click.argument("name")
@click.option("-c", "--config", required=True, type=click.Path(dir_okay=False), help="Run config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option(
    "--folds",
    type=int,
    default=None,
    help="Cross-fit: K models on K-1 folds each write the held-out fold's candidates (honest fuser data).",
)
@_user_errors
def train_generator_cmd(name: str, config: str, overrides: tuple[str, ...], folds: int | None) -> None:
    """Train generator NAME of CONFIG on the index split (its inputs are made or taken from the cache)."""
    from medcap.generators import needs_training

    if folds is not None:
        overrides = (*overrides, f"generators.{name}.folds={folds}")
    pipe = _pipeline(config, overrides)
    gcfg = pipe.generator_cfg(name)
    if not needs_training(gcfg):
        raise ValueError(
            f"generator {name} ({gcfg.kind}, mode {gcfg.mode}) has nothing to train: "
            "use kind: prefix, or a multimodal LLM with mode: sft and no adapter"
        )
    split = pipe.cfg.data.index_split
    pipe.embed(split)
    if gcfg.mode == "few-shot" or gcfg.folds >= 2:
        pipe.build_index()
        pipe.retrieve(split)
    pipe.train(name)
    if gcfg.folds >= 2:
        pipe.generate(name, split)  # trains the fold models and writes out-of-fold candidates
    _report(pipe)


@train.command("fuser")
@click.argument("name")
@click.option("-c", "--config", required=True, type=click.Path(dir_okay=False), help="Run config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@_user_errors
def train_fuser_cmd(name: str, config: str, overrides: tuple[str, ...]) -> None:
    """Train LM-Fuser NAME of CONFIG on its train split's candidates (made if missing; leakage-checked)."""
    pipe = _pipeline(config, overrides)
    if pipe.train_fuser(name) is None:
        raise ValueError(f"fuser {name} has nothing to train: only kind: lm fusers learn")
    _report(pipe)


@train.command("encoder")
@click.option("-c", "--config", required=True, type=click.Path(dir_okay=False), help="Run config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the trained encoder (default: RUN/models/encoder-ENCODER).",
)
@_user_errors
def train_encoder_cmd(config: str, overrides: tuple[str, ...], out: str | None) -> None:
    """Train CONFIG's retrieval encoder's projections contrastively on the index split's (image, caption) pairs."""
    from medcap.retrieval.stage import train_encoder

    pipe = _pipeline(config, overrides)
    name, folder = train_encoder(pipe, Path(out) if out else None)
    _report(pipe)
    click.echo(
        f"trained encoder: {name}\nuse it with --set eval.clip_encoder.name={name} "
        f"(or retrieval.encoder.name); recall in {folder}/medcap_encoder.json"
    )


@main.command("ablate")
@_config_options
@click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="NAME[@OUTPUT]:KEY=VALUE;...",
    help="A variant (repeatable), e.g. 'k1@consensus:retrieval.k=1'. Default: the config's ablation section.",
)
@click.option("--reference", default=None, help="Variant the others are tested against (default: the first).")
@click.option("--split", default=None, help="Split to score (default: the first query split).")
@_user_errors
def ablate_cmd(config: str, overrides, variants, reference, split) -> None:
    """Run variants of CONFIG through the shared cache: ablation.md (table, intervals, tests) + ablation.png."""
    from medcap.ablate import parse_variant, run_ablation

    cfg = load_config(config, overrides)
    result = run_ablation(cfg, [parse_variant(v) for v in variants] or None, reference, split)
    click.echo(result.table_md.read_text())
    click.echo(f"wrote {result.table_md} and {result.plot}")


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default=None, help="Split to show (default: the first query split with artifacts).")
@click.option("--max-images", type=int, default=None, help="Show only the first N images.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="Output HTML file.")
@_user_errors
def report_cmd(run_dir: str, split: str | None, max_images: int | None, out: str | None) -> None:
    """Write RUN_DIR/report.html: a self-contained gallery of images, neighbours, captions and scores."""
    from medcap.eval.report import write_report

    path = write_report(Path(run_dir), Path(out) if out else None, split=split, max_images=max_images)
    click.echo(f"wrote {path}")


@main.command("demo")
@click.option(
    "--out",
    default="medcap-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the phantom data, the run and the report.",
)
@click.option("--n", default=240, show_default=True, help="Phantom images to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a demo profile value.")
@_user_errors
def demo_cmd(out: str, n: int, overrides: tuple[str, ...]) -> None:
    """The whole ensemble on the synthetic phantom data set, on a CPU, offline (about 10 minutes)."""
    import time

    from medcap.demo import run_demo

    start = time.time()
    result = run_demo(out, n=n, overrides=list(overrides))
    click.echo(result.ablation.read_text())
    _print_scores(result.scores)
    click.echo(f"\ndemo finished in {time.time() - start:.0f} s")
    for label, path in (
        ("run folder", result.run_dir),
        ("submission", result.submission),
        ("ablation table", result.ablation),
        ("ablation plot", result.plot),
        ("report", result.report),
    ):
        click.echo(f"  {label:<15} {path}")


def _run_config(run_dir: str, overrides: tuple[str, ...] = ()):
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a run directory (no config.yaml); make one with `medcap run CONFIG`")
    cfg = load_config(cfg_path, overrides)
    cfg.runs_dir, cfg.name = str(run.parent), run.name
    return cfg


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--split", "splits", multiple=True, help="Split(s) to score (default: every query split).")
@click.option("--variant", "variants", multiple=True, help="Candidate set(s) to score (default: all generators).")
@click.option(
    "--suite",
    default="imageclef2024",
    show_default=True,
    help="Metric suite; this version scores BERTScore and ROUGE-1.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override e.g. eval.bertscore_model.")
@_user_errors
def evaluate_cmd(run_dir: str, splits, variants, suite: str, overrides) -> None:
    """Score a run's candidates with the organisers' preprocessing."""
    from medcap.pipeline import Pipeline
    from medcap.runs import summarise_scores

    cfg = _run_config(run_dir, overrides)
    if suite:
        cfg.eval.suite, cfg.eval.metrics = suite, None
    pipe = Pipeline(cfg)
    for split in splits or pipe.cfg.data.query_splits:
        for variant in variants or [o for o in pipe.outputs if pipe.output_path(o, split).exists()]:
            pipe.evaluate(variant, split)
    _report(pipe)
    _print_scores(summarise_scores(pipe.run))


@main.command("submit")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--variant", default=None, help="Candidate set to submit (default: the config's submit.variant).")
@click.option("--year", type=int, default=None, help="Submission rules of this ImageCLEF year.")
@click.option("--split", default=None, help="Split to submit (default: test if queried, else the last query split).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Output CSV.")
@_user_errors
def submit_cmd(run_dir: str, variant: str | None, year: int | None, split: str | None, output: str | None) -> None:
    """Write (and validate) a competition submission file from a run."""
    from medcap.pipeline import Pipeline

    pipe = Pipeline(_run_config(run_dir))
    written = pipe.submit(
        variant or pipe.submit_variant, split or pipe.submit_split, year, Path(output) if output else None
    )
    click.echo(f"wrote {written} (valid for {year or pipe.cfg.submit.year})")


@main.command("validate")
@click.argument("submission", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--testset",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="The test set's ID,Caption CSV (or a list of IDs), in ground-truth order.",
)
@click.option("--year", type=int, default=2024, show_default=True)
@_user_errors
def validate_cmd(submission: str, testset: str, year: int) -> None:
    """Check a submission file against a test set with every rule of YEAR."""
    from medcap.eval.submission import read_test_ids, validate_submission

    problems = validate_submission(Path(submission), read_test_ids(Path(testset)), year)
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"{len(problems)} problem(s): {submission} would be rejected in {year}", err=True)
        sys.exit(1)
    click.echo(f"{submission}: valid for {year}")


def _print_scores(rows: list[dict]) -> None:
    if not rows:
        return
    metrics = sorted({k for r in rows for k in r} - {"variant", "split", "n"})
    click.echo("\n" + " | ".join(["variant", "split", "n", *metrics]))
    for r in rows:
        vals = [f"{r[m]:.4f}" if isinstance(r.get(m), float) else str(r.get(m, "-")) for m in metrics]
        click.echo(" | ".join([r["variant"], r["split"], str(r["n"]), *vals]))


if __name__ == "__main__":
    main()
