"""Checks before a VQA run loads any model: every split's questions read cleanly (file and line for each
problem), the query splits are answerable, the models the answerers name are there, the disk has room."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from medcap.data.problems import InputError
from medcap.models.hub import ModelNotFoundError
from medcap.preflight import Report, check_disk, hub_or_folder

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


def preflight(pipe: Pipeline, stages: list[str]) -> Report:
    from medcap.vqa.data import split_questions

    report = Report()
    for split in pipe.splits:
        try:
            qs = split_questions(pipe, split).questions
        except (InputError, FileNotFoundError, ValueError) as e:
            report.add(f"data split {split!r}", False, str(e).replace("\n", "\n    "))
            continue
        n_img = len({q.image_id for q in qs})
        report.add(f"data split {split!r}", bool(qs), f"{len(qs)} questions on {n_img} images" if qs else "empty")
        if split == pipe.cfg.data.index_split and any(q.answer is None for q in qs):
            report.add(f"data split {split!r}", False, "the index split needs an answer for every question")
    for a in pipe.cfg.vqa.answerers:
        for attr in ("model", "adapter"):
            name = getattr(a, attr, None)
            if name:
                try:
                    where = hub_or_folder(name, "adapter_config.json" if attr == "adapter" else "config.json")
                    report.add(f"vqa.answerers.{a.name}.{attr}", True, where)
                except (ModelNotFoundError, FileNotFoundError, ValueError, OSError) as e:
                    report.add(f"vqa.answerers.{a.name}.{attr}", False, str(e))
        engine = getattr(a, "engine", None)
        if engine is not None and engine.kind == "vllm" and importlib.util.find_spec("vllm") is None:
            report.add(
                f"vqa.answerers.{a.name}.engine",
                False,
                "kind vllm, but vLLM is not installed: pip install 'medcap[vllm]'",
            )
    check_disk(pipe, report)
    return report
