"""The pool-MBR BERTScore kernel on many images' work (shortlist x evidence), as ratios against the old way.

    python bench/pool_kernel.py [--images 24] [--hyps 64] [--refs 200] [--threads 2]

Each image gets its own texts, with MedPix-like token counts (log-normal around 40 tokens, some past 150)
and random unit token embeddings, as in a fuse where every image brings new lengths. Each variant runs in
a fresh process (oneDNN keeps the products it compiled for the life of a process), scores every image's
hypotheses against its references with ``eval.bertscore.match_tokens``, and is timed in wall and CPU
seconds over all images, after one warm-up image:

- **baseline**: fixed blocks of 64 hypotheses x 128 references in length order, each padded to its longest
  text, the maxima taken on the kernel's own dtype (medcap before 0.2);
- **length bands**: blocks whose longest text is at most 1.25x + 4 tokens its shortest (``pool_score._chunks``),
  the block's similarities converted to fp32 before the maxima;
- **+ fixed shapes**: blocks padded to 8 texts x 8 tokens (``pool_score._prepared``): bf16 products on
  oneDNN are compiled once per shape, and free shapes compiled on nearly every block;
- **+ 8-text blocks** (medcap): 8 hypotheses per block (``HYP_CHUNK``): the similarity block stays in cache.

Run in fp32 and bf16 (bf16 is what ``precision: auto`` picks on CUDA and on CPUs with AMX). The scores of
every variant are checked against the baseline's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
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


def prepare(emb, w, lengths, side, dtype, fixed: bool):
    from medcap.fuser.pool_score import _prepared

    return _prepared(emb, w, lengths, side, dtype, pad=fixed)


def score(hyp, ref, dtype, variant: dict) -> np.ndarray:
    import torch

    (h, hw, hl), (r, rw, rl) = hyp, ref
    chunker, match = variant["chunker"], variant["match"]
    blocks = [(idx, prepare(r[idx], rw[idx], rl[idx], "ref", dtype, variant["fixed"])) for idx in chunker(rl, 128)]
    out = np.zeros((len(hl), len(rl)))
    with torch.inference_mode():
        for hidx in chunker(hl, variant["hyp_chunk"]):
            p = prepare(h[hidx], hw[hidx], hl[hidx], "hyp", dtype, variant["fixed"])
            for ridx, b in blocks:
                out[np.ix_(hidx, ridx)] = match(p, b)[: len(hidx), : len(ridx)].double().numpy()
    return out


def variants() -> dict[str, dict]:
    from medcap.eval.bertscore import match_tokens
    from medcap.fuser.pool_score import HYP_CHUNK, _chunks

    return {
        "baseline: fixed blocks, max on the kernel dtype": dict(chunker=fixed_blocks, match=old_match, fixed=False, hyp_chunk=64),
        "length bands, fp32 max (medcap in fp32)": dict(chunker=_chunks, match=match_tokens, fixed=False, hyp_chunk=64),
        "+ fixed shapes": dict(chunker=_chunks, match=match_tokens, fixed=True, hyp_chunk=64),
        f"+ {HYP_CHUNK}-text blocks (medcap in bf16)": dict(chunker=_chunks, match=match_tokens, fixed=True, hyp_chunk=HYP_CHUNK),
    }  # fmt: skip


def child(args, name: str, dtype_name: str) -> dict:
    """One variant in this process: wall and CPU seconds over the images after a warm-up; the scores' digest."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, dtype_name)
    rng = np.random.default_rng(0)
    images = [(texts(rng, args.hyps), texts(rng, args.refs)) for _ in range(args.images + 1)]
    variant = variants()[name]
    score(*images[0], dtype, variant)
    wall, cpu = time.perf_counter(), time.process_time()
    out = [score(h, r, dtype, variant) for h, r in images[1:]]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    np.save(args.scores, np.concatenate([o.ravel() for o in out]))
    return {"wall": wall, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="images timed (each with its own texts)")
    ap.add_argument("--hyps", type=int, default=64, help="hypotheses per image (pool-MBR's shortlist)")
    ap.add_argument("--refs", type=int, default=200, help="references per image (the evidence: evidence_k)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU time is counted over all)")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args, *args.child)))
        return
    import tempfile

    print(
        f"{args.images} images, each {args.hyps} hypotheses x {args.refs} references of its own lengths, "
        f"{args.threads} thread(s)"
    )
    print("\n| dtype | variant | ms per image (wall) | CPU ms | vs baseline (wall) | max |Δ score| |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            base = None
            for k, name in enumerate(variants()):
                path = Path(tmp) / f"{dtype}-{k}.npy"
                cmd = [sys.executable, __file__, "--child", name, dtype, "--scores", str(path)]
                cmd += ["--images", str(args.images), "--hyps", str(args.hyps), "--refs", str(args.refs)]
                cmd += ["--threads", str(args.threads)]
                r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                scores = np.load(path)
                base = base or (r, scores)
                diff = float(np.abs(scores - base[1]).max())
                print(
                    f"| {dtype} | {name} | {r['wall'] / args.images * 1e3:.0f} | {r['cpu'] / args.images * 1e3:.0f} | "
                    f"{base[0]['wall'] / r['wall']:.2f}x | {diff:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
