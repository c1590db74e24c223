"""The pool-MBR BERTScore kernel on one image's work: its shortlist x its evidence, as ratios against the old way.

    python bench/pool_kernel.py [--hyps 64] [--refs 200] [--repeat 5] [--threads 1]

Texts get MedPix-like token counts (log-normal around 40 tokens, some past 150) and random unit token
embeddings; each variant scores the same hypotheses against the same references with
``eval.bertscore.match_tokens`` and is timed in CPU seconds (the best of ``--repeat``):

- **baseline**: fixed blocks of 64 hypotheses x 128 references in length order, each padded to its longest
  text, the maxima taken on the kernel's own dtype (medcap before 0.2);
- **length bands**: blocks whose longest text is at most 1.25x + 4 tokens its shortest (``pool_score._chunks``);
- **length bands + fp32 max**: the block's similarities converted to fp32 before the maxima (``match_tokens``).

Run in fp32 and bf16 (bf16 is what ``precision: auto`` picks on CUDA and on CPUs with AMX). The scores of
every variant are checked against the baseline's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def texts(rng: np.random.Generator, n: int, dim: int = 384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.clip(rng.lognormal(np.log(40), 0.5, n).astype(int), 4, 220)
    emb = rng.standard_normal((n, lengths.max(), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    real = np.arange(lengths.max())[None] < lengths[:, None]
    emb[~real] = 0.0
    return emb, real.astype(np.float32), lengths


def fixed_blocks(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[s : s + size] for s in range(0, len(order), size)]


def old_match(hyp, ref):
    """``match_tokens`` as it was: maxima on the product's dtype."""
    import torch

    (h, hn), (r, rn) = hyp, ref
    n_h, l_h, d = h.shape
    n_r, l_r, _ = r.shape
    sim = (h.reshape(n_h * l_h, d) @ r.reshape(n_r * l_r, d).T).view(n_h, l_h, n_r, l_r)
    p = torch.bmm(hn[:, None, :], sim.amax(dim=3).float()).squeeze(1)
    rec = (sim.amax(dim=1).float() * rn[None]).sum(dim=2)
    return torch.nan_to_num(2 * p * rec / (p + rec), nan=0.0)


def score(hyp, ref, dtype, chunker, match) -> np.ndarray:
    import torch

    from medcap.eval.bertscore import prepare_tokens

    (h, hw, hl), (r, rw, rl) = hyp, ref
    blocks = []
    for idx in chunker(rl, 128):
        w = int(rl[idx].max())
        blocks.append((idx, prepare_tokens(np.ascontiguousarray(r[idx][:, :w]), rw[idx][:, :w], rl[idx], "ref", dtype)))
    out = np.zeros((len(hl), len(rl)))
    with torch.inference_mode():
        for hidx in chunker(hl, 64):
            w = int(hl[hidx].max())
            p = prepare_tokens(np.ascontiguousarray(h[hidx][:, :w]), hw[hidx][:, :w], hl[hidx], "hyp", dtype)
            for ridx, b in blocks:
                out[np.ix_(hidx, ridx)] = match(p, b).double().numpy()
    return out


def main() -> None:
    import torch

    from medcap.eval.bertscore import match_tokens
    from medcap.fuser.pool_score import _chunks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hyps", type=int, default=64, help="hypotheses (pool-MBR's shortlist)")
    ap.add_argument("--refs", type=int, default=200, help="references (the evidence: evidence_k)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is counted over all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    hyp, ref = texts(rng, args.hyps), texts(rng, args.refs)
    variants = {
        "baseline: fixed blocks, max on the kernel dtype": (fixed_blocks, old_match),
        "length bands": (_chunks, old_match),
        "length bands + fp32 max (medcap)": (_chunks, match_tokens),
    }
    print(
        f"one image: {args.hyps} hypotheses x {args.refs} references, {args.threads} thread(s), best of {args.repeat}"
    )
    print("\n| dtype | variant | CPU ms | vs baseline | max |Δ score| |\n| --- | --- | ---: | ---: | ---: |")
    for dtype in (torch.float32, torch.bfloat16):
        base_scores, base_time = None, None
        for name, (chunker, match) in variants.items():
            best, out = float("inf"), None
            for _ in range(args.repeat):
                start = time.process_time()
                out = score(hyp, ref, dtype, chunker, match)
                best = min(best, time.process_time() - start)
            if base_scores is None:
                base_scores, base_time = out, best
            diff = float(np.abs(out - base_scores).max())
            print(f"| {str(dtype).split('.')[-1]} | {name} | {best * 1e3:.0f} | {base_time / best:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
