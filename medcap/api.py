"""The Python API for notebook users, over the same code as the CLI.

import medcap
captioner = medcap.Captioner("configs/phantom.yaml")      # builds or loads the run's index and models
captioner(["scan1.jpg", pil_image])                          # -> ["Axial CT of ...", ...]
medcap.caption(["scan1.jpg"], "configs/phantom.yaml")        # the same, in one call
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medcap.config import RunConfig, load_config
from medcap.records import Example


class Captioner:
    """A loaded pipeline: the run's index (built if missing), encoder and one generator, ready to caption."""

    def __init__(self, config: RunConfig | str | Path, generator: str | None = None, overrides: Sequence[str] = ()):
        from medcap.pipeline import Pipeline
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.encoders import load_encoder
        from medcap.retrieval.index import load_index

        self.cfg = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
        self.pipeline = Pipeline(self.cfg)
        index_split = self.cfg.data.index_split
        self.generator = generator or self.pipeline.submit_variant
        self.pipeline.embed(index_split)
        index_path = self.pipeline.build_index()
        self.pipeline.train(self.generator)  # no-op unless the generator must be trained
        enc = self.cfg.retrieval.encoder
        self.index_ids, _ = load_embeddings(self.pipeline.run.embeddings(enc.name, index_split))
        self.index = load_index(index_path, self.cfg.retrieval.index)
        self.index_examples = {ex.id: ex for ex in self.pipeline.split(index_split).examples}
        self.encoder = load_encoder(enc)

    def __call__(self, images: Sequence[Any]) -> list[str]:
        """Captions for images given as file paths or PIL images, in order."""
        from medcap.data import load_image
        from medcap.generators import GeneratorInputs, build_generator
        from medcap.retrieval.neighbours import find_neighbours, neighbour_records

        examples = [Example(f"image-{i:06d}", _as_source(img)) for i, img in enumerate(images)]
        if not examples:
            return []
        ids = [ex.id for ex in examples]
        vectors = self.encoder.encode_images([load_image(ex) for ex in examples])
        hits = find_neighbours(self.index, self.index_ids, ids, vectors, self.cfg.retrieval.k, exclude_same_group=False)
        neighbours = neighbour_records(hits, ids, self.index_examples)
        gcfg = self.pipeline.generator_cfg(self.generator)
        inputs = GeneratorInputs(
            self.pipeline.run.model(self.generator), vectors=(ids, vectors), index_examples=self.index_examples
        )
        generate = build_generator(gcfg, inputs)
        try:
            captions = {c.id: c.caption for c in generate(list(zip(examples, neighbours, strict=True)))}
        finally:
            close = getattr(generate, "close", None)
            if close is not None:
                close()
        return [captions[i] for i in ids]


def caption(images: Sequence[Any], config: RunConfig | str | Path, generator: str | None = None) -> list[str]:
    """Caption images with the pipeline of ``config`` (one call; keep a ``Captioner`` to caption many times)."""
    return Captioner(config, generator)(images)


def _as_source(image: Any) -> Path | bytes:
    if isinstance(image, (str, Path)):
        return Path(image)
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"expected an image path or a PIL image, got {type(image).__name__}")
