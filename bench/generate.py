"""Benchmarks of caption generation: engines and dtypes on SmolLM2, one shared vLLM engine, batched hf on a VLM.

    python bench/generate.py [--suite lm,pool,vlm] [--n 96] [--max-new-tokens 48] [--quality 191]

``lm``: the synthesizer's workload. SmolLM2-135M-Instruct (the dense copy medcap builds from the
packaged GGUF), ``--n`` synthesizer prompts built from MedPix 2.0 neighbours' captions (the phantom
set where ../shared/data/medpix2 is absent), each generating exactly ``--max-new-tokens`` tokens
(EOS suppressed), greedy: hf one prompt at a time (fp32, the baseline), hf batch 16 in fp32 and
bf16, vLLM in fp32 and bf16. ``--quality N`` also captions N MedPix validation images for real (EOS
allowed) with hf fp32, hf bf16 and vLLM bf16 and scores them (ROUGE-1, BERTScore with MiniLM) with
95% bootstrap intervals: bf16 must not move them. ``pool``: two SFT adapters of one tiny
Qwen2.5-VL, an engine per generator against one shared engine (``EnginePool``), wall time
including the engine starts. ``vlm``: a tiny random VLM, batched hf against a per-image loop
(``--family``, ``--size 7b`` for LLaVA-1.5-7B shapes on a GPU). vLLM rows need vLLM (run in the
environment ``bash .ci/vllm`` builds: ``.venv-vllm/bin/python bench/generate.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # tiny_vlms: the tiny random models the tests use
sys.path.insert(0, str(ROOT / "bench"))  # the lm and pool suites

from medcap.config import EngineConfig, GenerationConfig  # noqa: E402
from medcap.engines.base import Request  # noqa: E402
from medcap.models.families import get_family  # noqa: E402


@dataclass
class Row:
    mode: str
    batch: int | str
    seconds: float
    images: int
    tokens: int
    peak_mb: float | None

    @property
    def images_s(self) -> float:
        return self.images / self.seconds

    @property
    def tokens_s(self) -> float:
        return self.tokens / self.seconds


# --------------------------------------------------------------------------- models


def build_model(family: str, size: str, out: Path, max_new_tokens: int) -> Path:
    """Save a random-init model of ``family`` (tiny, or LLaVA-1.5-7B-sized) whose generation never stops early."""
    from tiny_vlms import make_tiny_vlm

    make_tiny_vlm(family, out)
    if size == "7b":
        if family != "llava":
            raise SystemExit("--size 7b is built for --family llava only")
        _llava_7b(out)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["min_new_tokens"] = max_new_tokens  # hf: suppress EOS until the fixed length
    gen_path.write_text(json.dumps(gen, indent=2))
    return out


def _llava_7b(out: Path) -> None:
    """Overwrite the tiny LLaVA in ``out`` with LLaVA-1.5-7B's shapes (random bf16 weights, built on the GPU)."""
    import torch
    from transformers import (
        AutoProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    proc = AutoProcessor.from_pretrained(out)
    tok = proc.tokenizer
    proc.image_processor.size = {"shortest_edge": 336}
    proc.image_processor.crop_size = {"height": 336, "width": 336}
    proc.patch_size = 14
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_requests(family: str, n: int, image_size: int, max_new_tokens: int) -> list[Request]:
    from PIL import Image

    rng = np.random.default_rng(0)
    prompt = get_family(family).default_prompt
    params = GenerationConfig(max_new_tokens=max_new_tokens)
    messages = ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},)
    return [
        Request(
            f"img{i}",
            messages,
            (Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype="uint8")),),
            params=params,
        )  # fmt: skip
        for i in range(n)
    ]


# --------------------------------------------------------------------------- memory


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process lifetime peak (Linux: KiB)


# --------------------------------------------------------------------------- runs


def timed(mode: str, batch: int | str, run, requests: list[Request], memory: bool = True) -> Row:
    gc.collect()
    reset_peak()
    t0 = time.perf_counter()
    completions = run(requests)
    seconds = time.perf_counter() - t0
    assert [c.id for c in completions] == [r.id for r in requests]
    return Row(mode, batch, seconds, len(requests), sum(c.n_tokens for c in completions), peak_mb() if memory else None)


def bench_hf(model_dir: Path, family: str, requests: list[Request], batch_size: int, dtype: str) -> list[Row]:
    from medcap.engines.hf import HFEngine

    eng = HFEngine(get_family(family), str(model_dir), EngineConfig(batch_size=batch_size, dtype=dtype))
    try:
        eng.generate(requests[:1])  # warm-up
        per_image = timed("hf, per-image loop", 1, lambda rs: [c for r in rs for c in eng.generate([r])], requests)
        batched = timed("hf, batched", batch_size, eng.generate, requests)
    finally:
        eng.close()
    return [per_image, batched]


def bench_vllm(model_dir: Path, family: str, requests: list[Request], dtype: str) -> Row | None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("(vllm is not installed: its row is skipped; pip install 'medcap[vllm]')")
        return None
    from medcap.engines.vllm import VLLMEngine

    cfg = EngineConfig(kind="vllm", dtype=dtype, max_model_len=2048, extra={"sampling_params": {"ignore_eos": True}})
    eng = VLLMEngine(get_family(family), str(model_dir), cfg)
    try:
        eng.generate(requests[:1])
        # vLLM preallocates gpu_memory_utilization of the GPU (and runs in its own process): no peak to report
        return timed("vllm", "auto", eng.generate, requests, memory=False)
    finally:
        eng.close()


def table(rows: list[Row]) -> str:
    base = rows[0]
    lines = [
        "| engine | batch | images/s | tokens/s | peak MB | images/s vs per-image | tokens/s vs per-image | memory vs per-image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mem = f"{r.peak_mb:,.0f}" if r.peak_mb is not None else "n/a"
        mem_ratio = f"{r.peak_mb / base.peak_mb:.2f}x" if r.peak_mb and base.peak_mb else "n/a"
        lines.append(
            f"| {r.mode} | {r.batch} | {r.images_s:.2f} | {r.tokens_s:.1f} | {mem} | {r.images_s / base.images_s:.2f}x "
            f"| {r.tokens_s / base.tokens_s:.2f}x | {mem_ratio} |"
        )
    return "\n".join(lines)


def run_vlm(args) -> None:
    import torch

    if args.size == "7b" and not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("--size 7b needs a CUDA GPU (or --allow-cpu)")
    engines = {e.strip() for e in args.engine.split(",") if e.strip()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    image_size = 336 if args.size == "7b" else 64
    with tempfile.TemporaryDirectory(prefix="medcap-bench-") as tmp:
        model_dir = build_model(args.family, args.size, Path(tmp) / "model", args.vlm_tokens)
        requests = make_requests(args.family, args.vlm_n, image_size, args.vlm_tokens)
        print(f"## Generation: {args.family} ({args.size}, random weights), {args.vlm_n} images x "
              f"{args.vlm_tokens} new tokens, {device}\n")  # fmt: skip
        rows = bench_hf(model_dir, args.family, requests, args.batch_size, args.dtype)
        if "vllm" in engines:
            row = bench_vllm(model_dir, args.family, requests, args.dtype)
            if row is not None:
                rows.append(row)
        print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="lm,pool", help="comma-separated: lm, pool, vlm")
    ap.add_argument("--n", type=int, default=96, help="lm: synthesizer prompts")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="lm and pool: tokens per item (fixed)")
    ap.add_argument("--quality", type=int, default=0, help="lm: also caption and score this many MedPix images")
    ap.add_argument("--pool-n", type=int, default=16, help="pool: images per generator")
    ap.add_argument("--engine", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--family", default="llava", choices=["llava", "qwen2_5_vl", "medgemma", "smolvlm"])
    ap.add_argument("--vlm-n", type=int, default=16, help="vlm: images (requests)")
    ap.add_argument("--vlm-tokens", type=int, default=16, help="vlm: tokens generated per image (fixed)")
    ap.add_argument("--batch-size", type=int, default=8, help="vlm: hf batch size B")
    ap.add_argument("--size", default="tiny", choices=["tiny", "7b"])
    ap.add_argument("--dtype", default="auto", help="vlm: auto | fp32 | fp16 | bf16")
    ap.add_argument("--allow-cpu", action="store_true", help="let --size 7b run on a CPU (hours)")
    args = ap.parse_args()
    suites = {s.strip() for s in args.suite.split(",") if s.strip()}
    engines = {e.strip() for e in args.engine.split(",") if e.strip()}
    from medcap.models.devices import cpu_supports_bf16

    print(f"(CPU with native bf16: {cpu_supports_bf16()})\n")
    if "lm" in suites:
        from lm_engines import lm_table, run_lm, run_quality

        print(lm_table(run_lm(args.n, args.max_new_tokens, engines)) + "\n", flush=True)
        if args.quality:
            print(run_quality(args.quality, engines) + "\n", flush=True)
    if "pool" in suites:
        from engine_sharing import run_pool

        print(run_pool(args.pool_n, args.max_new_tokens) + "\n", flush=True)
    if "vlm" in suites:
        run_vlm(args)


if __name__ == "__main__":
    main()
