"""The Python API: a run's whole trained ensemble, ready to caption new images, over the same stages as the CLI.

    import medcap
    captioner = medcap.Captioner.from_run("runs/demo")   # retrieval, every generator, synthesizers, fusers
    captioner(["scan1.jpg", pil_image])                    # -> ["Axial CT of ...", ...]: the submitted caption set
    captioner.caption(["scan1.jpg"])[0].candidates         # -> {"nearest": ..., "prefix": ..., "lmf": ...}
    medcap.Captioner("medpix-cpu")                         # from a config: trains what the run lacks first

New images are a split of their own in ``RUN/api/``: they are embedded, retrieved against the run's
index and captioned by every caption set the final one is made from, with the run's trained models
and index taken from the run folder (hard links), never retrained.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.config import RunConfig, load_config
from medcap.records import Example

SPLIT = "api"
USES = ("embed", "retrieve", "generate", "synthesize", "fuse")  # what runs on new images; models come from the run
TRAINED = ("index", "train", "train-fuser")  # what the run must already have


@dataclass(frozen=True)
class Captions:
    """One image's captions: the final one (the run's submitted caption set) and every caption set's."""

    id: str
    caption: str
    candidates: dict[str, str]


class Captioner:
    """A run's trained ensemble: ``Captioner(config)`` trains what is missing; ``Captioner.from_run(RUN)`` never does."""

    def __init__(
        self,
        config: RunConfig | str | Path,
        caption_set: str | None = None,
        overrides: Sequence[str] = (),
        *,
        generator: str | None = None,  # the name this argument had before caption sets
        train: bool = True,
    ):
        from medcap.pipeline import Pipeline, get_stage
        from medcap.profiles import resolve_config

        self.cfg = config if isinstance(config, RunConfig) else load_config(resolve_config(config), list(overrides))
        source = Pipeline(self.cfg)
        self.final = caption_set or generator or source.submitted
        source.caption_set(self.final)  # an unknown name fails before any work
        if train:  # the models of the ensemble, made from the config where missing
            with source.session("medcap api: train"):
                source.allowed = None
                for stage in TRAINED:
                    for t in get_stage(stage).targets(source):
                        source.make(stage, *t)
        scratch = copy.deepcopy(self.cfg)
        scratch.runs_dir, scratch.name = str(source.run.root), "api"
        self.pipeline = Pipeline(scratch, peers=[source.run.root])

    @classmethod
    def from_run(cls, run_dir: str | Path, caption_set: str | None = None, overrides: Sequence[str] = ()) -> Captioner:
        """The ensemble a run folder holds (its ``config.yaml``, index and trained models); nothing is trained."""
        run = Path(run_dir)
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no config.yaml); make one with `medcap run CONFIG`")
        cfg = load_config(run / "config.yaml", list(overrides))
        cfg.runs_dir, cfg.name = str(run.parent), run.name
        return cls(cfg, caption_set, train=False)

    def caption(self, images: Sequence[Any], groups: Sequence[str | None] | None = None) -> list[Captions]:
        """Captions for images given as file paths or PIL images, in order; ``groups`` (cases) enable same-case exclusion."""
        if not images:
            return []
        groups = list(groups) if groups is not None else [None] * len(images)
        examples = [
            Example(f"image-{i:06d}", _as_source(img), group=g)
            for i, (img, g) in enumerate(zip(images, groups, strict=True))
        ]
        pipe = self.pipeline
        pipe.add_split(SPLIT, examples)
        pipe.history.clear()
        with pipe.session("medcap api: caption"):
            pipe.allowed = set(USES)
            sets = {name: pipe.captions(name, SPLIT) for name in pipe.caption_sets}
        return [
            Captions(ex.id, sets[self.final][ex.id], {name: caps[ex.id] for name, caps in sets.items()})
            for ex in examples
        ]

    def __call__(self, images: Sequence[Any]) -> list[str]:
        """The final caption of each image, in order."""
        return [c.caption for c in self.caption(images)]


def caption(
    images: Sequence[Any], config: RunConfig | str | Path, caption_set: str | None = None, **kw: Any
) -> list[str]:
    """Caption images with the ensemble of ``config`` (one call; keep a ``Captioner`` to caption many times)."""
    return Captioner(config, caption_set, **kw)(images)


def _as_source(image: Any) -> Path | bytes:
    if isinstance(image, (str, Path)):
        return Path(image)
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"expected an image path or a PIL image, got {type(image).__name__}")
