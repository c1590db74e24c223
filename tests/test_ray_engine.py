"""Ray Data batch generation: a local one-node Ray cluster on CPU, tiny LLaVA engines on 2 actors."""

from __future__ import annotations

import functools

import pytest
from PIL import Image
from tiny_vlms import cached_tiny_vlm

from medcap.config import EngineConfig, GenerationConfig, GeneratorConfig
from medcap.engines import make_engine
from medcap.engines.base import Request
from medcap.engines.ray import image_bytes, request_row, row_request

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'medcap[ray]')")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def make_requests(tmp_path, n: int = 6) -> list[Request]:
    params = GenerationConfig(max_new_tokens=5)
    out = []
    for i in range(n):
        image = Image.new("RGB", (40 + 4 * i, 36), (30 * i % 255, 90, 200 - 20 * i))
        if i % 2:  # half as files, half as PIL images: both must travel as bytes
            path = tmp_path / f"img{i}.png"
            image.save(path)
            image = path
        messages = ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe {i}."}]},)
        out.append(Request(id=f"img{i}", messages=messages, images=(image,), params=params))
    return out


def test_rows_round_trip_requests(tmp_path):
    req = make_requests(tmp_path, 2)[1]
    row = request_row(7, req)
    assert row["index"] == 7 and row["images"][0] == (tmp_path / "img1.png").read_bytes()
    back = row_request(row)
    assert (back.id, back.messages, back.adapter, back.params) == (req.id, req.messages, None, req.params)
    assert back.images[0].size == (44, 36)
    assert image_bytes(Image.new("RGB", (2, 2))).startswith(b"\x89PNG")


def test_ray_engine_needs_known_keys():
    cfg = GeneratorConfig("g", "llava", engine=EngineConfig(extra={"ray": {"workers": 2}}))
    with pytest.raises(ValueError, match="unknown key"):
        make_engine(cfg.model, cfg.engine, family=cfg.kind)


def test_ray_completions_equal_direct_hf_in_order(tmp_path, tmp_path_factory, ray_cluster):
    from medcap.engines.hf import HFEngine
    from medcap.models.families import get_family

    model = str(cached_tiny_vlm(tmp_path_factory.getbasetemp(), "llava"))
    requests = make_requests(tmp_path)
    engine_cfg = EngineConfig(batch_size=2, device="cpu")
    direct = HFEngine(get_family("llava"), model, engine_cfg).generate(requests)

    cfg = GeneratorConfig(
        "llava-ray", "llava", model=model, engine=EngineConfig(batch_size=2, device="cpu", extra={"ray": {}})
    )
    cfg.engine.extra["ray"] = {"num_workers": 2, "batch_size": 2, "num_cpus_per_worker": 1}
    engine = make_engine(cfg.model, cfg.engine, family=cfg.kind)
    assert isinstance(engine.engine_factory, functools.partial)
    got = engine.generate(requests)

    assert [c.id for c in got] == [r.id for r in requests]
    assert [(c.text, c.n_tokens) for c in got] == [(c.text, c.n_tokens) for c in direct]
    assert any(c.n_tokens for c in got)


def test_missing_ray_says_how_to_install(monkeypatch):
    import sys

    from medcap.engines.ray import generate_with_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'medcap\[ray\]'"):
        generate_with_ray([Request("a", ())], lambda: None)
