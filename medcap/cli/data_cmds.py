"""``medcap data``, ``medcap config`` and ``medcap env``: data sets, shipped profiles, this machine."""

from __future__ import annotations

import sys

import click

from medcap.cli.common import config_argument, load, main, user_errors, verbosity
from medcap.cli.show import table
from medcap.config import DataConfig, dump_config


@main.group()
@verbosity
def data() -> None:
    """Check or make data sets."""


@data.command("check")
@click.argument("data_dir")
@click.option(
    "--format",
    "fmt",
    default="imageclef",
    show_default=True,
    type=click.Choice(["imageclef", "manifest", "hf", "vqa-rad", "slake", "vqa-manifest"]),
)
@click.option("--split", "splits", multiple=True, help="Split(s) to check (default: all found).")
@click.option("--group-column", default="case_id", show_default=True, help="metadata.csv column naming the case.")
@click.option(
    "--image-dir", "image_dirs", multiple=True, help="Image folder template under DATA_DIR ({split} allowed)."
)
@verbosity
@user_errors
def data_check(data_dir: str, fmt: str, splits: tuple[str, ...], group_column: str, image_dirs: tuple[str, ...]):
    """Validate a data set: every problem with its file and line; non-zero exit if any."""
    from medcap.data import check_dataset, list_splits
    from medcap.preflight import id_problems

    if fmt in ("vqa-rad", "slake", "vqa-manifest"):  # question-answer data (medcap/vqa/data.py)
        from medcap.vqa.data import check_vqa

        vqa_format = "manifest" if fmt == "vqa-manifest" else fmt
        problems, counts = check_vqa(DataConfig(root=data_dir, format=vqa_format), list(splits))
        for p in problems:
            click.echo(str(p))
        if problems:
            click.echo(f"{len(problems)} problem(s) in {data_dir}", err=True)
            sys.exit(1)
        click.echo(f"{data_dir}: OK ({', '.join(f'{s}: {n} questions' for s, n in counts.items())})")
        return
    cfg = DataConfig(root=data_dir, format=fmt, group_column=group_column or None)
    if image_dirs:
        cfg.image_dirs = list(image_dirs)
    wanted = list(splits) or list_splits(cfg)
    from medcap.data import unreferenced_images

    problems = check_dataset(cfg, wanted)
    for p in problems:
        click.echo(str(p))
    for warning in unreferenced_images(cfg, wanted):
        click.echo(f"warning: {warning}")
    if problems:
        click.echo(f"{len(problems)} problem(s) in {data_dir} (splits: {', '.join(wanted)})", err=True)
        sys.exit(1)
    from medcap.data import load_split

    for split in wanted:  # IDs that no submission file can hold fail now, not after a day of generation
        bad = id_problems([ex.id for ex in load_split(cfg, split).examples])
        for b in bad:
            click.echo(f"{split}: {b}: no submission file can hold them")
        if bad:
            sys.exit(1)
    click.echo(f"{data_dir}: OK (splits: {', '.join(wanted)})")


@data.command("synth")
@click.argument("out_dir")
@click.option("--n", default=240, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@verbosity
@user_errors
def data_synth(out_dir: str, n: int, seed: int, size: int) -> None:
    """Write the synthetic phantom data set (ImageCLEF layout) to OUT_DIR."""
    from medcap.data.phantom import write_phantom

    path = write_phantom(out_dir, n=n, seed=seed, image_size=size)
    click.echo(f"wrote {n} phantom images to {path}")


@main.group("config")
@verbosity
def config_group() -> None:
    """The run profiles shipped with medcap, and resolved configs."""


@config_group.command("ls")
@verbosity
def config_ls() -> None:
    """List the packaged profiles (use one as CONFIG: `medcap run NAME`)."""
    from medcap.profiles import profile_names, profile_path, profile_summary

    rows = [["profile", "what", "file"]]
    rows += [[n, profile_summary(n), str(profile_path(n))] for n in profile_names()]
    click.echo(table(rows))


@config_group.command("show")
@config_argument
@verbosity
@user_errors
def config_show(config: str, overrides: tuple[str, ...]) -> None:
    """Print CONFIG resolved: every default filled in, every --set applied (save it to start your own)."""
    click.echo(dump_config(load(config, overrides)), nl=False)


@main.command("env")
@click.argument("config", metavar="[CONFIG]", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@verbosity
@user_errors
def env_cmd(config: str | None, overrides: tuple[str, ...]) -> None:
    """What this machine has (torch, CUDA, FAISS, vLLM, Java); with CONFIG, which models are here and which
    metrics will be skipped, before any work."""
    from medcap.envinfo import machine

    click.echo(table([["component", "what is here"], *machine()]))
    if config is None:
        return
    from medcap.pipeline import Pipeline
    from medcap.preflight import Report, check_metrics, check_models

    pipe = Pipeline(load(config, overrides))
    report = Report()
    check_models(pipe, [], report)
    check_metrics(pipe, report)
    click.echo(f"\n{config}: models and metrics")
    report.echo()
    if report.problems:
        click.echo(f"\n{len(report.problems)} model(s) missing: `medcap run` would stop before any work", err=True)
