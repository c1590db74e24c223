"""The ``lm`` suite of bench/generate.py: SmolLM2 synthesizer prompts through hf and vLLM in fp32 and bf16.

Also ``quality``: real synthesis (EOS allowed) on MedPix validation images in hf fp32, hf bf16 and
vLLM bf16, scored with 95% bootstrap intervals, to check that bf16 does not change the captions'
quality.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from medcap.config import EngineConfig, GenerationConfig, SynthesizerConfig
from medcap.engines.base import Request
from medcap.records import Example, Neighbour, NeighbourList

MEDPIX = Path(__file__).resolve().parents[2] / "shared" / "data" / "medpix2"


@dataclass
class LMRow:
    mode: str
    seconds: float
    items: int
    tokens: int

    @property
    def items_s(self) -> float:
        return self.items / self.seconds

    @property
    def tokens_s(self) -> float:
        return self.tokens / self.seconds


def synthesis_items(n: int, k: int = 5, split: str = "valid", seed: int = 0) -> tuple[list, str]:
    """``n`` (example, neighbours, candidates) of ``split``: neighbours are train images of the same body region
    and modality (MedPix metadata; a stand-in for retrieval), candidates two of their captions."""
    import pandas as pd

    if not MEDPIX.is_dir():
        raise SystemExit(f"{MEDPIX} is absent: the lm suite needs MedPix 2.0 (../shared/data/medpix2)")
    meta = pd.read_csv(MEDPIX / "metadata.csv")
    caps = {**_captions("train"), **_captions(split)}
    train = meta[meta.split == "train"]
    pools = defaultdict(list)
    for row in train.itertuples():
        pools[(row.location_category, row.type)].append(row.ID)
    rng = random.Random(seed)
    queries = meta[meta.split == split].sample(frac=1.0, random_state=seed).itertuples()
    items = []
    for row in queries:
        pool = [i for i in pools.get((row.location_category, row.type), []) if i in caps]
        if len(pool) < k:
            continue
        shown = rng.sample(pool, k)
        nl = NeighbourList(row.ID, tuple(Neighbour(i, 1.0 - j / 10, caps[i]) for j, i in enumerate(shown)))
        ex = Example(row.ID, str(MEDPIX / "images" / f"{row.ID}.jpg"), caps.get(row.ID))
        items.append((ex, nl, {"nearest": caps[shown[0]], "consensus": caps[shown[1]]}))
        if len(items) == n:
            break
    return items, f"MedPix 2.0 {split}"


def _captions(split: str) -> dict[str, str]:
    import pandas as pd

    df = pd.read_csv(MEDPIX / f"{split}_captions.csv")
    return dict(zip(df.ID, df.Caption, strict=True))


def requests(items: list, max_new_tokens: int) -> list[Request]:
    """The synthesizer's own prompts (template v1)."""
    from medcap.synthesizer.synthesize import build_synthesis_messages

    cfg = SynthesizerConfig(model="smollm2", generation=GenerationConfig(max_new_tokens=max_new_tokens))
    return [
        Request(ex.id, tuple(build_synthesis_messages(cfg, nl, cands, query_id=ex.id)), params=cfg.generation)
        for ex, nl, cands in items
    ]


def run_lm(n: int, max_new_tokens: int, engines: set[str]) -> list[LMRow]:
    """The table: hf one at a time (baseline), hf batch 16 fp32/bf16, vLLM fp32/bf16; fixed-length outputs."""
    from medcap.models.lms import resolve_lm_path

    model = resolve_lm_path("smollm2")
    items, source = synthesis_items(n)
    reqs = requests(items, max_new_tokens)
    print(f"## SmolLM2-135M-Instruct: {len(reqs)} synthesizer prompts ({source} neighbours' captions), "
          f"{max_new_tokens} new tokens each, greedy\n")  # fmt: skip
    runs = [
        lambda: _hf(model, reqs, "fp32", 1, "hf fp32, one prompt at a time", max_new_tokens),
        lambda: _hf(model, reqs, "fp32", 16, "hf fp32, batch 16", max_new_tokens),
        lambda: _hf(model, reqs, "bf16", 16, "hf bf16, batch 16", max_new_tokens),
    ]
    if "vllm" in engines and _has_vllm():
        runs += [lambda: _vllm(model, reqs, "fp32"), lambda: _vllm(model, reqs, "bf16")]
    rows = []
    for run in runs:
        rows.append(run())
        r = rows[-1]
        print(f"  measured {r.mode}: {r.items_s:.2f} items/s, {r.tokens_s:.0f} tokens/s", flush=True)
    return rows


def _timed(mode: str, generate, reqs: list[Request]) -> LMRow:
    generate(reqs[:2])  # warm-up
    t0 = time.perf_counter()
    out = generate(reqs)
    return LMRow(mode, time.perf_counter() - t0, len(out), sum(c.n_tokens for c in out))


def _hf(model: str, reqs: list[Request], dtype: str, batch: int, mode: str, max_new_tokens: int) -> LMRow:
    from medcap.engines.hf import HFEngine

    eng = HFEngine(None, model, EngineConfig(dtype=dtype, batch_size=batch))
    eng.model.generation_config.min_new_tokens = max_new_tokens  # fixed length, as vLLM's ignore_eos
    try:
        if batch == 1:
            return _timed(mode, lambda rs: [c for r in rs for c in eng.generate([r])], reqs)
        return _timed(mode, eng.generate, reqs)
    finally:
        eng.close()


def _vllm(model: str, reqs: list[Request], dtype: str) -> LMRow:
    from medcap.engines.vllm import VLLMEngine

    cfg = EngineConfig(kind="vllm", dtype=dtype, max_model_len=2048, extra={"sampling_params": {"ignore_eos": True}})
    eng = VLLMEngine(None, model, cfg)
    try:
        return _timed(f"vllm {dtype}", eng.generate, reqs)
    finally:
        eng.close()


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("(vllm is not installed: its rows are skipped; run in the environment bash .ci/vllm builds)")
        return False
    return True


def lm_table(rows: list[LMRow]) -> str:
    base = rows[0]
    lines = ["| engine, dtype, batch | items/s | tokens/s | vs one at a time | vs hf fp32 batch 16 |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    batch = rows[1] if len(rows) > 1 else base
    for r in rows:
        lines.append(f"| {r.mode} | {r.items_s:.2f} | {r.tokens_s:.0f} | {r.items_s / base.items_s:.2f}x "
                     f"| {r.items_s / batch.items_s:.2f}x |")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- quality


def run_quality(n: int, engines: set[str]) -> str:
    """Synthesis of ``n`` MedPix validation images in hf fp32, hf bf16 and vLLM bf16, scored with intervals."""
    from medcap.models.lms import resolve_lm_path

    model = resolve_lm_path("smollm2")
    items, source = synthesis_items(n)
    runs = {"hf fp32": ("hf", "fp32"), "hf bf16": ("hf", "bf16")}
    if "vllm" in engines and _has_vllm():
        runs |= {"vllm bf16": ("vllm", "bf16")}
    refs = {ex.id: ex.caption for ex, _, _ in items}
    captions = {name: _synthesise(model, items, kind, dtype) for name, (kind, dtype) in runs.items()}
    base = captions["hf fp32"]
    lines = [f"## Synthesis quality by engine and dtype: {len(items)} {source} images, SmolLM2, greedy, 96 tokens max\n",
             "| engine, dtype | ROUGE-1 [95% CI] | BERTScore-MiniLM F1 [95% CI] | captions equal to hf fp32 |",
             "| --- | --- | --- | ---: |"]  # fmt: skip
    for name, hyps in captions.items():
        scores = _score(refs, hyps)
        same = sum(hyps[i] == base[i] for i in hyps)
        lines.append(f"| {name} | {scores['rouge1']} | {scores['bertscore']} | {same}/{len(hyps)} |")
    return "\n".join(lines)


def _synthesise(model: str, items: list, kind: str, dtype: str) -> dict[str, str]:
    from medcap.synthesizer.synthesize import Synthesizer

    cfg = SynthesizerConfig(
        model="smollm2",
        engine=EngineConfig(kind=kind, dtype=dtype, batch_size=16, max_model_len=2048),
        generation=GenerationConfig(max_new_tokens=96),
    )
    synth = Synthesizer(cfg)
    try:
        return {c.id: c.caption for c in synth(items)}
    finally:
        synth.close()


def _score(refs: dict[str, str], hyps: dict[str, str]) -> dict[str, str]:
    import numpy as np

    from medcap.config import EvalConfig
    from medcap.eval.metrics import evaluate
    from medcap.eval.stats import bootstrap_ci

    out = evaluate(refs, hyps, EvalConfig(metrics=["rouge1", "bertscore"], bertscore_model="minilm"))
    cells = {}
    for m in ("rouge1", "bertscore"):
        if m not in out["metrics"]:
            cells[m] = f"skipped ({out['skipped'].get(m, '')[:40]})"
            continue
        values = np.array([out["per_image"][i][m] for i in out["per_image"]])
        lo, hi = bootstrap_ci(values)
        cells[m] = f"{out['metrics'][m]:.4f} [{lo:.4f}, {hi:.4f}]"
    return cells
