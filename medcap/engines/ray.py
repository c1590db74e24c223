"""Batch generation past one machine: a Ray Data dataset of requests through a pool of engine actors.

The standard Ray Data batch-inference path: requests become rows of a dataset (images encoded to
bytes, so they travel to any node), ``map_batches`` runs a callable class on a fixed pool of
actors (``ActorPoolStrategy(size=num_workers)``, ``num_gpus`` each) that builds its engine once,
and the completions come back in request order by an index column. The engine is any medcap
engine (``vllm`` on GPU workers in production, ``hf`` in tests), built by a picklable factory on
each actor. ``ray`` is imported only when used: ``pip install 'medcap[ray]'``.

Why not ``ray.data.llm``: its vLLM processor renders prompts with its own chat-template stage,
routes LoRA by adapter name under one ``dynamic_lora_loading_path`` and has no beam search, so
its outputs would drift from the ``hf``/``vllm``/``openai`` engines, which share one prompt
renderer and BOS rule. Wrapping ``VLLMEngine`` keeps one code path; see docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcap.config import GenerationConfig
from medcap.engines.base import Completion, Engine, Request
from medcap.registry import optional_import

log = logging.getLogger(__name__)

INSTALL_HINT = "Ray batch generation needs Ray Data: pip install 'medcap[ray]'"


def import_ray() -> Any:
    """The ``ray`` module (with ``ray.data``), or an ImportError that says how to install it."""
    return optional_import("ray", "ray.data", hint=INSTALL_HINT)


# --------------------------------------------------------------------------- rows <-> requests


def image_bytes(image: Any) -> bytes:
    """An image as bytes that decode anywhere: a file's own bytes, a PIL image as lossless PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def request_row(index: int, request: Request) -> dict[str, Any]:
    """One dataset row: plain columns only (JSON text, bytes), so Arrow can hold it and ship it."""
    return {
        "index": index,
        "id": request.id,
        "messages": json.dumps(list(request.messages)),
        "images": [image_bytes(i) for i in request.images],
        "adapter": request.adapter or "",
        "params": json.dumps(dataclasses.asdict(request.params)),
    }


def row_request(row: dict[str, Any]) -> Request:
    """The request a row holds, images decoded to PIL."""
    from PIL import Image

    images = []
    for blob in row["images"] if row["images"] is not None else []:
        with Image.open(io.BytesIO(bytes(blob))) as im:
            images.append(im.convert("RGB"))
    return Request(
        id=str(row["id"]),
        messages=tuple(json.loads(row["messages"])),
        images=tuple(images),
        adapter=row["adapter"] or None,
        params=GenerationConfig(**json.loads(row["params"])),
    )


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A numpy-format batch (column -> array) as a list of row dicts."""
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*(batch[n] for n in names), strict=True)]


class EngineWorker:
    """The callable class ``map_batches`` runs on each actor: one engine per actor, built once."""

    def __init__(self, engine_factory: Callable[[], Engine]) -> None:
        self.engine = engine_factory()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = _rows(batch)
        completions = self.engine.generate([row_request(r) for r in rows])
        return {
            "index": [int(r["index"]) for r in rows],
            "id": [c.id for c in completions],
            "text": [c.text for c in completions],
            "n_tokens": [int(c.n_tokens) for c in completions],
        }

    def __del__(self) -> None:  # Ray Data tears actors down at the end of the dataset
        engine = getattr(self, "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):  # teardown must not raise
                engine.close()


# --------------------------------------------------------------------------- the distributed path


def generate_with_ray(
    requests: list[Request],
    engine_factory: Callable[[], Engine],
    *,
    num_workers: int = 1,
    batch_size: int = 8,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float = 1,
) -> list[Completion]:
    """Completions for ``requests``, in their order, from ``num_workers`` engine actors on a Ray cluster.

    Connects to the cluster ``RAY_ADDRESS`` names (or starts a local one) unless Ray is already
    initialised. ``engine_factory`` is pickled to every actor; adapter paths and model folders in
    the requests must exist on every node (a shared file system).
    """
    if not requests:
        return []
    if num_workers < 1 or batch_size < 1:
        raise ValueError(f"num_workers and batch_size must be >= 1, got {num_workers} and {batch_size}")
    ray = import_ray()
    if not ray.is_initialized():
        ray.init()  # honours RAY_ADDRESS; otherwise a local cluster of this machine
    ds = ray.data.from_items([request_row(i, r) for i, r in enumerate(requests)])
    out = ds.map_batches(
        EngineWorker,
        fn_constructor_args=(engine_factory,),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=num_gpus_per_worker,
        num_cpus=num_cpus_per_worker,
    )
    rows = sorted(out.take_all(), key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in rows] != list(range(len(requests))):
        raise RuntimeError(f"ray: got {len(rows)} completions back for {len(requests)} requests")
    log.info("ray: %d completions from %d worker(s)", len(rows), num_workers)
    return [Completion(str(r["id"]), str(r["text"]), int(r["n_tokens"])) for r in rows]


@dataclasses.dataclass
class RayEngine:
    """The engine contract over :func:`generate_with_ray`: each ``generate`` call runs one Ray dataset.

    Each call starts its actor pool (and so its engines) afresh: hand it large chunks (a whole split).
    """

    engine_factory: Callable[[], Engine]
    num_workers: int = 1
    batch_size: int = 8
    num_gpus_per_worker: float = 0
    num_cpus_per_worker: float = 1

    def generate(self, requests: list[Request]) -> list[Completion]:
        return generate_with_ray(
            requests,
            self.engine_factory,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            num_gpus_per_worker=self.num_gpus_per_worker,
            num_cpus_per_worker=self.num_cpus_per_worker,
        )

    def close(self) -> None:
        """Nothing to free here: the actors and their engines end with each dataset."""


RAY_KEYS = {"num_workers", "batch_size", "num_gpus_per_worker", "num_cpus_per_worker"}


def make_ray_engine(build: Callable[[], Any], settings: dict[str, Any], owner: str = "engine") -> RayEngine:
    """A RayEngine whose actors each serve the engine ``build()`` makes (``make_engine`` without the ``ray`` key).

    ``settings`` is the engine config's ``extra.ray`` mapping.
    """
    settings = dict(settings or {})
    unknown = sorted(set(settings) - RAY_KEYS)
    if unknown:
        raise ValueError(f"{owner}.engine.extra.ray: unknown key(s) {unknown}; known: {sorted(RAY_KEYS)}")
    return RayEngine(build, **settings)
