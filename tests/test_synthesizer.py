"""Synthesizer: prompt contents (and no leakage), templates, cleaning of messy outputs, end to end."""

from __future__ import annotations

import pytest

from medcap.config import EngineConfig, GenerationConfig, SynthesizerConfig
from medcap.engines.base import Completion, Request
from medcap.records import Candidate, Example, Neighbour, NeighbourList
from medcap.synthesizer import TEMPLATES, Synthesizer, build_synthesis_messages, get_template

REFERENCE = "Secret reference caption: hepatic hemangioma in segment VII."
QUERY = Example("ImageCLEF_q1", None, REFERENCE, ("C0000001",))
NEIGHBOURS = NeighbourList(
    "ImageCLEF_q1",
    (
        Neighbour("n1", 0.9, "Axial CT of the chest shows a right upper lobe mass.", ("C0040405", "C0817096")),
        Neighbour("n2", 0.8, "Chest X-ray demonstrates bilateral pleural effusion.", ("C1306645",)),
        Neighbour("ImageCLEF_q1", 0.7, REFERENCE, ("C0000001",)),  # the query itself: must never show
        Neighbour("n3", 0.6, "MRI of the brain with contrast reveals a ring enhancing lesion.", ()),
    ),
)
CANDIDATES = {
    "llava": "CT scan of the chest with a lung mass.",
    "qwen": "Computed tomography shows a pulmonary nodule.",
}


def text_of(messages) -> str:
    return "\n".join(p["text"] for m in messages for p in m["content"] if p["type"] == "text")


class FakeEngine:
    """Returns canned outputs and records the requests."""

    def __init__(self, outputs: list[str]):
        self.outputs = list(outputs)
        self.requests: list[Request] = []
        self.closed = False

    def generate(self, requests: list[Request]) -> list[Completion]:
        self.requests += requests
        return [Completion(r.id, self.outputs.pop(0)) for r in requests]

    def close(self) -> None:
        self.closed = True


def test_prompt_has_neighbours_and_candidates_and_nothing_of_the_reference():
    cfg = SynthesizerConfig(k=5)
    messages = build_synthesis_messages(cfg, NEIGHBOURS, CANDIDATES, query_id=QUERY.id)
    assert [m["role"] for m in messages] == ["system", "user"]
    text = text_of(messages)
    for n in NEIGHBOURS.neighbours:
        if n.id != QUERY.id:
            assert n.caption in text
    for name, caption in CANDIDATES.items():
        assert f"{name}: {caption}" in text
    assert "hemangioma" not in text and QUERY.id not in text and "C0000001" not in text
    assert "ONE concise diagnostic caption" in text
    # k caps the neighbours shown, counted after the query itself is dropped.
    two = text_of(build_synthesis_messages(SynthesizerConfig(k=2), NEIGHBOURS, CANDIDATES, query_id=QUERY.id))
    assert "pleural effusion" in two and "ring enhancing" not in two
    # Only the configured generators, in their order.
    only = text_of(build_synthesis_messages(SynthesizerConfig(candidates=["qwen"]), None, CANDIDATES, query_id="x"))
    assert "qwen:" in only and "llava:" not in only


def test_concepts_shown_only_when_asked_and_present():
    with_c = text_of(build_synthesis_messages(SynthesizerConfig(), NEIGHBOURS, CANDIDATES, query_id=QUERY.id))
    assert "[concepts: C0040405; C0817096]" in with_c and "[concepts: C1306645]" in with_c
    assert "lesion. [concepts" not in with_c  # n3 has none
    without = text_of(
        build_synthesis_messages(SynthesizerConfig(use_concepts=False), NEIGHBOURS, CANDIDATES, query_id=QUERY.id)
    )
    assert "C0040405" not in without


def test_custom_template_and_versions():
    custom = 'Examples:\n{neighbours}\nConcepts: {concepts}\nModels said:\n{candidates}\nJSON {"caption": ...}'
    cfg = SynthesizerConfig(template=custom)
    user = build_synthesis_messages(cfg, NEIGHBOURS, CANDIDATES, query_id=QUERY.id)[1]["content"][0]["text"]
    assert user.startswith("Examples:\n1. Axial CT of the chest")
    assert "Concepts: C0040405; C0817096; C1306645\n" in user  # a {concepts} block: none inline
    assert "[concepts:" not in user and '{"caption": ...}' in user and "- qwen: Computed" in user
    assert get_template(custom).version.startswith("custom-") and get_template("v2") is TEMPLATES["v2"]
    with pytest.raises(ValueError, match="placeholders"):
        get_template("v9")
    short = text_of(build_synthesis_messages(SynthesizerConfig(template="v2"), None, CANDIDATES, query_id="x"))
    assert "(none)" in short and len(short) < len(
        text_of(build_synthesis_messages(SynthesizerConfig(), None, CANDIDATES, query_id="x"))
    )


def test_multimodal_prompt_puts_the_image_first(tmp_path):
    from PIL import Image

    cfg = SynthesizerConfig(multimodal=True, family="llava")
    messages = build_synthesis_messages(cfg, NEIGHBOURS, CANDIDATES, query_id=QUERY.id)
    assert messages[1]["content"][0] == {"type": "image"}
    Image.new("RGB", (8, 8)).save(tmp_path / "q.png")
    engine = FakeEngine(["A caption."])
    Synthesizer(cfg, engine)([(Example("q", tmp_path / "q.png"), None, CANDIDATES)])
    assert len(engine.requests[0].images) == 1
    with pytest.raises(ValueError, match="family"):
        Synthesizer(SynthesizerConfig(multimodal=True))


def test_messy_outputs_become_one_caption():
    prompt = text_of(build_synthesis_messages(SynthesizerConfig(), NEIGHBOURS, CANDIDATES, query_id=QUERY.id))
    outputs = [
        "Sure! Here's a concise caption: Axial CT shows a right upper lobe mass",
        prompt + "\n\nCT of the chest shows a pulmonary mass.",  # the prompt echoed first
        "1. CT of the chest shows a mass.\n2. Chest CT with a nodule.\n3. A lung lesion.",
        '**Caption:** "Contrast-enhanced CT shows a lung mass."',
        "assistant\nCT shows a lung mass.<|eot_id|>",
        "- llava: CT scan of the chest with a lung mass.",  # a copied candidate line is still an answer
    ]
    items = [(Example(f"i{i}", None), NEIGHBOURS, CANDIDATES) for i in range(len(outputs))]
    synth = Synthesizer(SynthesizerConfig(engine=EngineConfig(batch_size=4)), FakeEngine(outputs))
    got = [c.caption for c in synth(items)]
    assert got == [
        "Axial CT shows a right upper lobe mass.",
        "CT of the chest shows a pulmonary mass.",
        "CT of the chest shows a mass.",
        "Contrast-enhanced CT shows a lung mass.",
        "CT shows a lung mass.",
        "CT scan of the chest with a lung mass.",
    ]
    synth.close()
    assert synth.engine.closed


def test_synthesizer_end_to_end_with_tiny_llama(tmp_path):
    from tiny_vlms import make_tiny_llama

    model = str(make_tiny_llama(tmp_path / "llama"))
    cfg = SynthesizerConfig(
        name="synth", model=model, engine=EngineConfig(batch_size=2), generation=GenerationConfig(max_new_tokens=8)
    )
    synth = Synthesizer(cfg)
    items = [(QUERY, NEIGHBOURS, CANDIDATES), (Example("q2", None), None, {"llava": "Chest X-ray."})]
    out = synth(items)
    synth.close()
    assert [c.id for c in out] == ["ImageCLEF_q1", "q2"]
    for c in out:
        assert isinstance(c, Candidate) and c.generator == "synth" and c.caption.strip()
        assert c.extra["template"] == "v1" and c.extra["model"] == model and c.extra["raw"]


@pytest.mark.slow
def test_synthesizer_with_smollm2():
    cfg = SynthesizerConfig(model="smollm2", generation=GenerationConfig(max_new_tokens=40))
    synth = Synthesizer(cfg)
    out = synth([(QUERY, NEIGHBOURS, CANDIDATES)])
    synth.close()
    assert out[0].caption and "hemangioma" not in out[0].caption
