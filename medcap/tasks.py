"""The tasks medcap runs through one runner and run folder: captioning and visual question answering.

Each task has its run config class (``task:`` in a YAML file picks it; a caption config has no such key),
its stages in pipeline order and the reader of its image-level splits. Nothing here imports them: the
registries name ``module:attr`` and load on first use.
"""

from __future__ import annotations

from typing import Any

from medcap.configio import chosen
from medcap.registry import Registry

CONFIGS = Registry("task", {"caption": "medcap.config:RunConfig", "vqa": "medcap.vqa.config:VQARunConfig"})

# Stage name -> where it lives ("module:Class"), in pipeline order. A stage is imported when first used.
STAGES = Registry(
    "stage",
    {
        "embed": "medcap.retrieval.stages:Embed",
        "index": "medcap.retrieval.stages:Index",
        "retrieve": "medcap.retrieval.stages:Retrieve",
        "train": "medcap.generators.stage:Train",
        "generate": "medcap.generators.stage:Generate",
        "synthesize": "medcap.synthesizer.stage:Synthesize",
        "pool": "medcap.fuser.stage:Pool",
        "train-fuser": "medcap.fuser.stage:TrainFuser",
        "fuse": "medcap.fuser.stage:Fuse",
        "evaluate": "medcap.eval.stage:Evaluate",
        "submit": "medcap.eval.stage:Submit",
    },
)
# The VQA task's stages (medcap/vqa/): the same runner and run folder, its own chain after the shared
# image stages. ``TASKS`` maps each task to its stages and the reader of its image-level splits.
VQA_STAGES = Registry(
    "stage",
    {
        "embed": "medcap.retrieval.stages:Embed",
        "questions": "medcap.vqa.stages:Questions",
        "train-answerer": "medcap.vqa.stages:TrainAnswerer",
        "answer": "medcap.vqa.stages:Answer",
        "fuse-answers": "medcap.vqa.stages:FuseAnswers",
        "evaluate-answers": "medcap.vqa.stages:EvaluateAnswers",
        "submit-answers": "medcap.vqa.stages:SubmitAnswers",
    },
)
TASKS: dict[str, tuple[Registry, str]] = {
    "caption": (STAGES, "medcap.data:load_split"),
    "vqa": (VQA_STAGES, "medcap.vqa.data:load_image_split"),
}
SPLIT_READERS = Registry("task", {task: reader for task, (_, reader) in TASKS.items()})


def all_stages() -> list[str]:
    """Every stage name of every task, in order (the CLI's --only/--skip choices)."""
    return list(dict.fromkeys(name for stages, _ in TASKS.values() for name in stages))


def task_class(data: dict[str, Any]) -> type:
    """The run config class of ``data``'s ``task`` (caption: ``RunConfig``; vqa: ``VQARunConfig``); a caption
    config's ``task: caption`` key is dropped."""
    task = data.get("task", "caption")
    cls = chosen(CONFIGS.get, task, "task", "task")
    if task == "caption":
        data.pop("task", None)
    return cls
