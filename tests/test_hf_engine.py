"""The hf engine on tiny models of every family: batching, decoding modes, LoRA adapters per request."""

import pytest
import torch
from PIL import Image
from tiny_vlms import cached_tiny_vlm, make_tiny_llama, make_tiny_lora

from medcap.config import EngineConfig, GenerationConfig
from medcap.engines.base import Request
from medcap.engines.hf import HFEngine, HFTextEngine, generate_kwargs
from medcap.generators.prompts import build_messages
from medcap.models.families import FAMILIES, get_family
from medcap.models.hub import ModelNotFoundError

GREEDY = GenerationConfig(max_new_tokens=5)
BEAM = GenerationConfig(max_new_tokens=5, num_beams=3)


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(48, 56, 3, generator=g) * 255).to(torch.uint8).numpy())


def request(rid, instruction="Describe the image.", params=GREEDY, adapter=None, seed=0):
    messages, _ = build_messages("zero-shot", instruction=instruction)
    return Request(rid, tuple(messages), (image(seed),), adapter=adapter, params=params)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, tmp_path_factory):
    family = get_family(request.param)
    base = tmp_path_factory.getbasetemp()
    path = cached_tiny_vlm(base, family.name)
    lora = base / f"lora_{family.name}"
    if not (lora / "adapter_config.json").is_file():
        make_tiny_lora(family.name, path, lora)
    engine = HFEngine(family, str(path), EngineConfig(batch_size=2, dtype="fp32"))  # a tiny random LoRA: fp32 shows it
    yield family, engine, lora
    engine.close()


def test_greedy_decodes_only_new_tokens_like_a_manual_generate(setup):
    family, engine, _ = setup
    req = request("a")
    (out,) = engine.generate([req])
    text = engine.render(req)
    enc = family.encode(engine.processor, [text], [[req.images[0]]])
    with torch.inference_mode():
        ids = engine.model.generate(**enc, max_new_tokens=5, do_sample=False)
    new = ids[0, enc["input_ids"].shape[1] :]
    expected = engine.tokenizer.decode(new[: out.n_tokens], skip_special_tokens=True).strip()
    assert out.id == "a" and out.text == expected
    assert 1 <= out.n_tokens <= 5
    assert "Describe the image" not in out.text and "user" not in out.text.lower()


def test_batches_keep_order_and_match_single_requests(setup):
    _, engine, _ = setup
    reqs = [request("a", seed=1), request("b", "Write a long diagnostic caption for this image.", seed=2)]
    batched = engine.generate(reqs)  # one left-padded batch
    single = [engine.generate([r])[0] for r in reqs]
    assert [c.id for c in batched] == ["a", "b"]
    assert [c.text for c in batched] == [c.text for c in single]


def test_beam_search_runs(setup):
    _, engine, _ = setup
    (out,) = engine.generate([request("a", params=BEAM)])
    assert out.id == "a" and 1 <= out.n_tokens <= 5 and "Describe the image" not in out.text


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """One family for the engine behaviour that does not depend on the architecture."""
    base = tmp_path_factory.getbasetemp()
    path = cached_tiny_vlm(base, "smolvlm")
    engine = HFEngine(get_family("smolvlm"), str(path), EngineConfig(batch_size=2, dtype="fp32"))
    yield engine, path
    engine.close()


def test_sampling_is_seeded(smol):
    engine, _ = smol
    p = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=1.5, seed=7)
    assert engine.generate([request("a", params=p)]) == engine.generate([request("a", params=p)])


def test_lora_adapter_changes_output_and_none_gives_the_base_model(setup):
    _, engine, lora = setup
    base = engine.generate([request("a"), request("b", seed=5)])
    mixed = engine.generate(
        [request("a", adapter=str(lora)), request("a"), request("b", seed=5, adapter=str(lora)), request("b", seed=5)]
    )
    assert [c.id for c in mixed] == ["a", "a", "b", "b"]
    assert mixed[1] == base[0] and mixed[3] == base[1]  # adapter=None: the base model, even after loading one
    assert (mixed[0].text, mixed[2].text) != (base[0].text, base[1].text)


def test_second_adapter_is_loaded_beside_the_first(tmp_path, smol):
    engine, path = smol
    lora = make_tiny_lora("smolvlm", path, tmp_path / "one", seed=1)
    other = make_tiny_lora("smolvlm", path, tmp_path / "other", seed=2)
    a = engine.generate([request("a", adapter=str(lora))])
    b = engine.generate([request("a", adapter=str(other))])
    assert a == engine.generate([request("a", adapter=str(lora))])
    assert len(engine._adapters) == 2 and b != a


def test_missing_adapter_is_a_model_not_found_error(smol, tmp_path):
    engine, _ = smol
    with pytest.raises(ModelNotFoundError, match="adapter"):
        engine.generate([request("a", adapter=str(tmp_path / "missing"))])


def test_images_may_be_paths(smol, tmp_path):
    engine, _ = smol
    image(0).save(tmp_path / "im.png")
    messages, _ = build_messages("zero-shot", instruction="Describe the image.")
    from_path = engine.generate([Request("a", tuple(messages), (tmp_path / "im.png",), params=GREEDY)])
    assert from_path == engine.generate([request("a")])


def test_generate_kwargs_for_each_decoding_mode():
    assert generate_kwargs(GenerationConfig(max_new_tokens=9))["do_sample"] is False
    assert generate_kwargs(GenerationConfig(num_beams=4))["num_beams"] == 4
    kw = generate_kwargs(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9))
    assert (kw["temperature"], kw["top_p"], kw["do_sample"]) == (0.7, 0.9, True)


def test_text_engine_uses_the_tokenizer_chat_template(tmp_path):
    path = make_tiny_llama(tmp_path / "llama")
    engine = HFTextEngine(str(path), EngineConfig(batch_size=4))
    msgs = ({"role": "user", "content": [{"type": "text", "text": "Fuse these captions."}]},)
    reqs = [Request("x", msgs, params=GREEDY), Request("y", ({"role": "user", "content": "Hi"},), params=GREEDY)]
    out = engine.generate(reqs)
    assert [c.id for c in out] == ["x", "y"] and all(1 <= c.n_tokens <= 5 for c in out)
    prompt = engine.render(reqs[0])
    assert prompt.startswith("<|begin_of_text|>") and prompt.endswith("assistant<|end_header_id|>\n\n")
    assert "Fuse" not in out[0].text
    engine.close()
