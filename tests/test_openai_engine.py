"""The openai engine against a real local HTTP server (engines/testserver.py): parity, concurrency, retries."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from medcap.config import EngineConfig, GenerationConfig
from medcap.engines.base import Completion, Request
from medcap.engines.openai import OpenAIEngine, OpenAIEngineError, openai_messages, sampling_fields
from medcap.engines.testserver import engine_messages, generation_config, serve


def _digest(im: Image.Image) -> str:
    return hashlib.sha1(im.convert("RGB").tobytes()).hexdigest()[:8]


class EchoEngine:
    """Answers with what it was given: adapter, image digests, text, max_new_tokens."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, requests: list[Request]) -> list[Completion]:
        self.calls += len(requests)
        out = []
        for r in requests:
            text = " ".join(p["text"] for m in r.messages for p in m["content"] if p["type"] == "text")
            digests = ",".join(_digest(i) for i in r.images)
            out.append(Completion(r.id, f"{r.adapter}|{digests}|{text}|{r.params.max_new_tokens}", n_tokens=len(text)))
        return out

    def close(self) -> None:
        pass


class Server:
    """A served engine with a hook that can delay or fail calls; counts POSTs."""

    def __init__(self, engine, **kw) -> None:
        self.calls = 0
        self.fail_first = 0
        self.fail_status = 503
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server, self.url = serve(engine, before=self._before, **kw)

    def _before(self, path: str, body: dict) -> int | None:
        with self._lock:
            self.calls += 1
            n = self.calls
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
        finally:
            with self._lock:
                self.in_flight -= 1
        return self.fail_status if n <= self.fail_first else None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def echo_server(tmp_path):
    adapter = tmp_path / "adapters" / "sft"
    adapter.mkdir(parents=True)
    s = Server(EchoEngine(), adapters={"sft": str(adapter)}, base_model="base")
    yield s
    s.close()


def _cfg(url: str, **kw) -> EngineConfig:
    extra = kw.pop("extra", {})
    return EngineConfig(kind="openai", base_url=url, extra={"backoff": 0.01, **extra}, **kw)


def _image(seed: int, size: int = 24) -> Image.Image:
    import numpy as np

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype="uint8"))


def _request(i: int, n_images: int = 1, adapter: str | None = None, max_new_tokens: int = 8) -> Request:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": f"caption {i}"}]
    return Request(
        id=f"img{i}",
        messages=({"role": "user", "content": content},),
        images=tuple(_image(i * 10 + k) for k in range(n_images)),
        adapter=adapter,
        params=GenerationConfig(max_new_tokens=max_new_tokens),
    )


# --------------------------------------------------------------------------- payloads (no server)


def test_messages_roundtrip_through_data_urls(tmp_path):
    im_path = tmp_path / "x.png"
    _image(7).save(im_path)
    req = Request("a", ({"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]},),
                  images=(_image(3), im_path))  # fmt: skip
    wire = openai_messages(req)
    assert [p["type"] for p in wire[0]["content"]] == ["image_url", "image_url", "text"]
    assert wire[0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    messages, images = engine_messages(wire)
    assert messages == req.messages
    assert [_digest(i) for i in images] == [_digest(_image(3)), _digest(_image(7))]


def test_image_count_must_match_parts():
    req = Request("a", ({"role": "user", "content": [{"type": "image"}]},), images=())
    with pytest.raises(ValueError, match="request a"):
        openai_messages(req)
    req = Request("b", ({"role": "user", "content": [{"type": "text", "text": "x"}]},), images=(_image(0),))
    with pytest.raises(ValueError, match="1 images for 0 image parts"):
        openai_messages(req)


def test_sampling_fields_and_back():
    greedy = GenerationConfig(max_new_tokens=40, seed=3)
    fields = sampling_fields(greedy)
    assert fields == {"max_tokens": 40, "temperature": 0.0, "top_p": 1.0, "seed": 3}
    assert generation_config(fields) == greedy
    sampled = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2, seed=1)
    assert generation_config(sampling_fields(sampled)) == sampled
    beam = GenerationConfig(num_beams=4)
    assert sampling_fields(beam)["use_beam_search"] is True and sampling_fields(beam)["n"] == 4
    assert generation_config(sampling_fields(beam)) == beam


def test_served_model_names(tmp_path):
    a = tmp_path / "adapters" / "llava-sft"
    eng = OpenAIEngine("base", _cfg("http://127.0.0.1:1/v1", extra={"lora_modules": {"sft": str(a)}}))
    assert eng.served_model(None) == "base"
    assert eng.served_model(str(a)) == "sft"  # mapped path
    assert eng.served_model("sft") == "sft"  # already a served name
    assert eng.served_model(str(tmp_path / "other")) == "other"  # default: the folder name
    eng.close()


def test_serve_is_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        serve(EchoEngine(), host="8.8.8.8")


# --------------------------------------------------------------------------- against the server


def test_roundtrip_order_adapters_and_images(echo_server, tmp_path):
    adapter = str(tmp_path / "adapters" / "sft")
    eng = OpenAIEngine("base", _cfg(echo_server.url, concurrency=3))
    reqs = [_request(i, n_images=i % 3, adapter=adapter if i % 2 else None, max_new_tokens=5 + i) for i in range(7)]
    out = eng.generate(reqs)
    assert [c.id for c in out] == [r.id for r in reqs]
    for r, c in zip(reqs, out, strict=True):
        adapter_echo, digests, text, max_new = c.text.split("|")
        assert adapter_echo == (adapter if r.adapter else "None")
        assert digests == ",".join(_digest(i) for i in r.images)  # pixels survive the data URL
        assert text == f"caption {r.id[3:]}" and int(max_new) == r.params.max_new_tokens
        assert c.n_tokens == len(text)  # from usage.completion_tokens
    assert eng.served_models() == ["base", "sft"]
    eng.close()


def test_concurrent_requests_in_flight(echo_server):
    echo_server.delay = 0.3
    eng = OpenAIEngine("base", _cfg(echo_server.url, concurrency=4))
    t0 = time.perf_counter()
    out = eng.generate([_request(i, n_images=0) for i in range(8)])
    elapsed = time.perf_counter() - t0
    assert [c.id for c in out] == [f"img{i}" for i in range(8)]
    assert echo_server.max_in_flight == 4
    assert elapsed < 8 * 0.3 * 0.75  # well under the serial time (2.4 s)
    eng.close()


def test_retries_503_then_succeeds(echo_server):
    echo_server.fail_first = 2
    eng = OpenAIEngine("base", _cfg(echo_server.url, max_retries=3, concurrency=1))
    (c,) = eng.generate([_request(0)])
    assert c.text.endswith("|caption 0|8")
    assert echo_server.calls == 3  # two 503s, then the answer
    eng.close()


def test_gives_up_after_max_retries_naming_url_and_status(echo_server):
    echo_server.fail_first = 100
    eng = OpenAIEngine("base", _cfg(echo_server.url, max_retries=2, concurrency=1))
    with pytest.raises(OpenAIEngineError, match=r"chat/completions.*3 attempt.*HTTP 503"):
        eng.generate([_request(0)])
    assert echo_server.calls == 3
    eng.close()


def test_client_errors_are_not_retried(echo_server, tmp_path):
    eng = OpenAIEngine("base", _cfg(echo_server.url, max_retries=3))
    with pytest.raises(OpenAIEngineError, match="HTTP 404.*lora-modules"):
        eng.generate([_request(0, adapter=str(tmp_path / "not-served"))])
    assert echo_server.calls == 1
    eng.close()


def test_dead_port_fails_clearly_in_bounded_time():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    eng = OpenAIEngine("base", _cfg(url, max_retries=2, timeout=2.0))
    t0 = time.perf_counter()
    with pytest.raises(OpenAIEngineError, match=rf"{port}/v1/chat/completions.*3 attempt.*connection failed"):
        eng.generate([_request(0)])
    assert time.perf_counter() - t0 < 3.0
    eng.close()


def test_timeout_is_retried_then_reported(echo_server):
    echo_server.delay = 1.0
    eng = OpenAIEngine("base", _cfg(echo_server.url, max_retries=1, timeout=0.2, concurrency=1))
    t0 = time.perf_counter()
    with pytest.raises(OpenAIEngineError, match=r"2 attempt.*no answer within 0.2 s"):
        eng.generate([_request(0)])
    assert time.perf_counter() - t0 < 1.5
    assert echo_server.calls == 2
    eng.close()


# --------------------------------------------------------------------------- parity with HFEngine


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random LLaVA and a LoRA adapter on its language model (non-zero, so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_vlms import make_tiny_vlm
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("llava")
    model_dir = make_tiny_vlm("llava", root / "model")
    base = LlavaForConditionalGeneration.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(root / "adapter-sft")
    return model_dir, root / "adapter-sft"


def test_parity_with_hf_engine(tiny_llava):
    from medcap.engines.hf import HFEngine
    from medcap.models.families import get_family

    model_dir, adapter = tiny_llava
    hf = HFEngine(get_family("llava"), str(model_dir), EngineConfig(batch_size=4))
    reqs = [_request(i // 2, adapter=str(adapter) if i % 2 else None, max_new_tokens=6) for i in range(6)]
    reqs = [Request(f"{r.id}-{k}", r.messages, r.images, r.adapter, r.params) for k, r in enumerate(reqs)]
    direct = hf.generate(reqs)
    s = Server(hf, adapters={"sft": str(adapter)}, base_model="tiny-llava")
    try:
        eng = OpenAIEngine("tiny-llava", _cfg(s.url, concurrency=3, extra={"lora_modules": {"sft": str(adapter)}}))
        served = eng.generate(reqs)
        eng.close()
    finally:
        s.close()
        hf.close()
    assert [c.id for c in served] == [r.id for r in reqs]
    assert [(c.text, c.n_tokens) for c in served] == [(c.text, c.n_tokens) for c in direct]
    assert any(direct[i].text != direct[i + 1].text for i in (0, 2, 4))  # the adapter changes outputs
