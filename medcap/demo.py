"""``medcap demo``: the whole ensemble on the embedded default, on a CPU, with models that exist offline.

Writes the synthetic phantom data set, runs the packaged ``demo`` profile (retrieval, neighbour
captioners, a prefix captioner it trains, a synthesizer, MBR and an LM-Fuser it trains), scores
every caption set, writes a submission, the ablation table and plot, and the HTML report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medcap.config import RunConfig, load_config
from medcap.profiles import profile_path

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    run_dir: Path
    data_dir: Path
    submitted: str
    submission: Path
    ablation: Path
    plot: Path
    report: Path
    scores: list[dict]


def demo_config(out: Path, overrides: list[str] = ()) -> RunConfig:
    """The packaged demo profile with its data and runs under ``out``."""
    base = [f"data.root={out / 'data' / 'phantom'}", f"runs_dir={out / 'runs'}"]
    return load_config(profile_path("demo"), [*base, *overrides])


def run_demo(out: str | Path = "medcap-demo", n: int = 240, overrides: list[str] = ()) -> DemoResult:
    from medcap.ablate import run_ablation
    from medcap.data.phantom import write_phantom
    from medcap.eval.report import write_report
    from medcap.eval.stage import current_scores
    from medcap.pipeline import Pipeline

    out = Path(out)
    data = out / "data" / "phantom"
    if not (data / "phantom.json").exists():
        log.info("writing %d phantom images to %s", n, data)
        write_phantom(data, n=n, seed=0)
    cfg = demo_config(out, list(overrides))
    pipe = Pipeline(cfg)
    with pipe.session("medcap demo"):
        pipe.run_stages()
        ablation = run_ablation(cfg)
        split = cfg.ablation.split or cfg.data.query_splits[-1]
        report = write_report(pipe.run.root, split=split)
    return DemoResult(
        pipe.run.root,
        data,
        pipe.submitted,
        pipe.path("submit", pipe.submitted, pipe.submit_split),
        ablation.table_md,
        ablation.plot,
        report,
        current_scores(pipe),
    )
