"""The MLLM generator end to end on phantom images with a tiny LLaVA, and the engine factory."""

import pytest
from tiny_vlms import cached_tiny_vlm

from medcap.config import DataConfig, EngineConfig, GenerationConfig, GeneratorConfig
from medcap.data import load_image, load_split
from medcap.engines.base import Completion, Request
from medcap.generators.mllm import MLLMConfig, MLLMGenerator, make_engine
from medcap.records import Neighbour, NeighbourList


class FakeEngine:
    """Records requests and answers with messy raw text, as a chatty model would."""

    def __init__(self):
        self.batches: list[list[Request]] = []

    def generate(self, requests):
        self.batches.append(list(requests))
        return [Completion(r.id, f'ASSISTANT: Sure! Here is a caption:\n"CT image {r.id}"', 4) for r in requests]

    def close(self):
        pass


@pytest.fixture(scope="module")
def splits(phantom_dir):
    cfg = DataConfig(root=str(phantom_dir))
    return load_split(cfg, "train").examples, load_split(cfg, "valid").examples


def neighbours_for(query, train, k=3):
    return NeighbourList(query.id, tuple(Neighbour(t.id, 1.0 - i / 10, t.caption) for i, t in enumerate(train[:k])))


def test_end_to_end_with_tiny_llava_on_three_phantom_images(splits, tmp_path_factory):
    train, valid = splits
    path = cached_tiny_vlm(tmp_path_factory.getbasetemp(), "llava")
    cfg = GeneratorConfig(
        name="llava_zs",
        kind="llava",
        model=str(path),
        mode="zero-shot",
        engine=EngineConfig(kind="hf", batch_size=2),
        generation=GenerationConfig(max_new_tokens=6),
    )
    engine = make_engine(cfg)
    try:
        out = MLLMGenerator(cfg, engine)([(ex, None) for ex in valid[:3]])
    finally:
        engine.close()
    assert [c.id for c in out] == [ex.id for ex in valid[:3]]
    for c in out:
        assert c.generator == "llava_zs" and c.extra["mode"] == "zero-shot" and c.extra["model"] == str(path)
        assert isinstance(c.extra["raw"], str) and (c.caption == "" or c.caption.endswith((".", "!", "?")))


def test_few_shot_requests_carry_neighbour_captions_and_images(splits):
    train, valid = splits
    engine = FakeEngine()
    cfg = GeneratorConfig(name="fs", kind="qwen2_5_vl", mode="few-shot", k=2, shot_images=True)
    cfg.engine.batch_size = 2
    items = [(q, neighbours_for(q, train)) for q in valid[:3]]
    gen = MLLMGenerator(cfg, engine, adapter="runs/x/adapters/fs", index_examples={t.id: t for t in train})
    out = gen(items)
    assert [len(b) for b in engine.batches] == [2, 1]  # cfg.engine.batch_size chunks
    req = engine.batches[0][0]
    assert len(req.images) == 3  # two neighbour images, then the query's
    assert [im.tobytes() for im in req.images] == [load_image(e).tobytes() for e in (train[0], train[1], valid[0])]
    text = " ".join(p["text"] for p in req.messages[0]["content"] if p["type"] == "text")
    assert train[0].caption.split()[0] in text and valid[0].id not in text
    assert req.adapter == "runs/x/adapters/fs" and req.params == cfg.generation
    assert [c.caption for c in out] == [f"CT image {q.id}." for q in valid[:3]]
    assert out[0].extra["adapter"] == "runs/x/adapters/fs"


def test_shot_images_without_index_examples_is_an_error(splits):
    train, valid = splits
    cfg = GeneratorConfig(name="fs", kind="medgemma", mode="few-shot", shot_images=True)
    with pytest.raises(ValueError, match="index_examples"):
        MLLMGenerator(cfg, FakeEngine())([(valid[0], neighbours_for(valid[0], train))])


def test_make_engine_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="engine kind"):
        make_engine(GeneratorConfig(name="x", kind="llava", engine=EngineConfig(kind="tgi")))
    with pytest.raises(ValueError, match="family"):
        make_engine(MLLMConfig(name="x", kind="nearest"))  # a family-less kind in the MLLM settings
