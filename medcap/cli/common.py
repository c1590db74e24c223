"""The ``medcap`` group and what its commands share: verbosity, error handling, config arguments.

Every command accepts ``-v`` (more detail, repeatable) and ``-q`` (warnings only), before or after
its name. Errors a user can fix end with one ``error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from medcap.config import ConfigError, RunConfig, load_config
from medcap.data.problems import InputError
from medcap.models.hub import ModelNotFoundError

USER_ERRORS = (ConfigError, InputError, ModelNotFoundError, FileNotFoundError, ValueError)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# --------------------------------------------------------------------------- shared options


def _verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    from medcap.logs import setup_logging

    meta = ctx.find_root().meta
    if param.name == "verbose":
        meta["medcap.verbose"] = meta.get("medcap.verbose", 0) + int(value or 0)
    elif value:
        meta["medcap.quiet"] = True
    setup_logging(-1 if meta.get("medcap.quiet") else meta.get("medcap.verbose", 0))


def verbosity(fn: Callable) -> Callable:
    """``-v``/``-q`` on a command (they also work on the group, before the command's name)."""
    fn = click.option(
        "-v", "--verbose", count=True, expose_value=False, callback=_verbosity, help="More detail (-vv: libraries too)."
    )(fn)
    return click.option(
        "-q", "--quiet", is_flag=True, expose_value=False, callback=_verbosity, help="Warnings and errors only."
    )(fn)


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can fix into one clean message and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from medcap.fuser.leakage import LeakageError
        from medcap.launch import LaunchError
        from medcap.pipeline import StageInputError
        from medcap.preflight import PreflightError
        from medcap.runs import RunLockedError

        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, StageInputError, RunLockedError, LeakageError, PreflightError, LaunchError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def config_argument(fn: Callable) -> Callable:
    """``CONFIG`` (a YAML file or a packaged profile name) and ``--set KEY=VALUE`` overrides."""
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set retrieval.k=3 (repeatable).",
    )(fn)
    return click.argument("config", metavar="CONFIG")(fn)


def config_option(fn: Callable) -> Callable:
    """``-c/--config CONFIG`` and ``--set`` for commands whose argument is something else."""
    fn = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable)."
    )(fn)
    return click.option(
        "-c", "--config", required=True, metavar="CONFIG", help="Run config: a YAML file or a packaged profile name."
    )(fn)


def output_option(help_text: str, file: bool = True) -> Callable:
    return click.option(
        "-o", "--output", type=click.Path(dir_okay=not file, file_okay=file), default=None, help=help_text
    )


def load(config: str, overrides: tuple[str, ...] = ()) -> RunConfig:
    from medcap.profiles import resolve_config

    return load_config(resolve_config(config), list(overrides))


def run_config(run_dir: str | Path, overrides: tuple[str, ...] = ()) -> RunConfig:
    """The config a run folder was made with (its ``config.yaml``), pointed at that folder."""
    run = Path(run_dir)
    path = run / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no config.yaml); make one with `medcap run CONFIG`")
    cfg = load_config(path, list(overrides))
    cfg.runs_dir, cfg.name = str(run.parent), run.name
    return cfg


@click.group(context_settings=CONTEXT)
@verbosity
@click.version_option(package_name="medcap")
def main() -> None:
    """medcap: diagnostic captions for medical images with a multi-stage ensemble.

    CONFIG is a YAML file or the name of a packaged profile (`medcap config ls`).
    """
    from medcap.logs import setup_logging

    meta = click.get_current_context().meta
    setup_logging(-1 if meta.get("medcap.quiet") else meta.get("medcap.verbose", 0))
