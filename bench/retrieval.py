"""Benchmark of the retrieval stage: FAISS indexes against numpy brute force, and batched embedding.

    python bench/retrieval.py [--n 100000 --d 512 --queries 1000 --k 10]
                              [--encoder medcap-effnet-minilm --images 64 --batch-size 32]

Part 1 builds seeded L2-normalised vectors, takes numpy brute force (one matrix product and
``argpartition``) as the baseline and the truth, then times FAISS flat, IVF and HNSW: build
seconds, queries per second, speed-up over brute force measured in the same run, and recall@k.
Part 2 embeds images generated in memory with the chosen encoder, batched and one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medcap.config import EncoderConfig, IndexConfig  # noqa: E402
from medcap.retrieval.index import build_index, import_faiss, search  # noqa: E402


def structured_vectors(n: int, d: int, seed: int, latent: int = 32, noise: float = 0.1) -> np.ndarray:
    """Unit vectors on a noisy ``latent``-dimensional subspace (one fixed basis for every seed).

    Real image embeddings have a low intrinsic dimension; uniform noise in 512-d (where every
    point is nearly equidistant) is a worst case no approximate index is built for.
    """
    basis = np.random.default_rng(12345).standard_normal((latent, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, latent), dtype=np.float32) @ basis
    x += noise * np.sqrt(latent) * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """Top-k positions by inner product: matrix product + argpartition, in query blocks."""
    out = np.empty((len(xq), k), dtype=np.int64)
    for s in range(0, len(xq), block):
        scores = xq[s : s + block] @ xb.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def bench_indexes(args: argparse.Namespace) -> None:
    faiss = import_faiss()
    xb = structured_vectors(args.n, args.d, seed=0, latent=args.latent)
    xq = structured_vectors(args.queries, args.d, seed=1, latent=args.latent)
    print(f"## Index search: n={args.n:,} d={args.d} (intrinsic {args.latent}) queries={args.queries:,} k={args.k}")
    print(
        f"threads: faiss {faiss.omp_get_max_threads()}, cpu count {os.cpu_count()}, GPUs seen by faiss {faiss.get_num_gpus()}"
    )
    t = time.perf_counter()
    truth = brute_force(xb, xq, args.k)
    brute_s = time.perf_counter() - t
    rows = [("numpy brute force", 0.0, args.queries / brute_s, 1.0, 1.0)]
    builds = {
        "faiss flat": IndexConfig(kind="flat", gpu="never"),
        "faiss ivf": IndexConfig(kind="ivf", gpu="never"),
        "faiss hnsw": IndexConfig(kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, gpu="never"),
    }
    for label, cfg in builds.items():
        t = time.perf_counter()
        index = build_index(xb, cfg)
        build_s = time.perf_counter() - t
        # search-time knobs change without a rebuild: one row per setting
        settings = {"flat": [None], "ivf": args.nprobe, "hnsw": args.ef_search}[cfg.kind]
        for value in settings:
            name = label
            if cfg.kind == "ivf":
                index.nprobe = value
                name += f" (nlist={index.nlist}, nprobe={value})"
            elif cfg.kind == "hnsw":
                index.hnsw.efSearch = value
                name += f" (M={cfg.hnsw_m}, efC={cfg.ef_construction}, efS={value})"
            t = time.perf_counter()
            _, found = search(index, xq, args.k)
            search_s = time.perf_counter() - t
            rows.append((name, build_s, args.queries / search_s, brute_s / search_s, recall(found, truth)))
    print(f"| {'method':<44} | build s | queries/s | speed-up vs brute | recall@{args.k} |")
    print(f"|{'-' * 46}|--------:|----------:|------------------:|----------:|")
    for label, build_s, qps, speedup, rec in rows:
        print(f"| {label:<44} | {build_s:7.2f} | {qps:9,.0f} | {speedup:16.2f}x | {rec:9.3f} |")


def bench_embedding(args: argparse.Namespace) -> None:
    from PIL import Image

    from medcap.retrieval.encoders import load_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    encoder = load_encoder(EncoderConfig(name=args.encoder, batch_size=args.batch_size))
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(args.images)]
    print(f"\n## Embedding: encoder={args.encoder} images={args.images} (256x256, in memory) device={encoder.device}")
    print(f"load {load_s:.1f} s, dim {encoder.dim}, dtype {encoder.dtype}")
    encoder.encode_images(images[: args.batch_size])  # warm-up: first calls at a new shape set up kernels
    encoder.encode_images(images[:1])
    t = time.perf_counter()
    for s in range(0, len(images), args.batch_size):
        batched = encoder.encode_images(images[s : s + args.batch_size])
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    for im in images:
        single = encoder.encode_images([im])
    single_s = time.perf_counter() - t
    assert np.allclose(batched[-1], single[0], atol=1e-3)  # same vector either way
    print("| mode                 | images/s | speed-up |\n|----------------------|---------:|---------:|")
    print(f"| per image (batch 1)  | {args.images / single_s:8.1f} |    1.00x |")
    print(f"| batch {args.batch_size:<14} | {args.images / batched_s:8.1f} | {single_s / batched_s:7.2f}x |")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="database vectors")
    p.add_argument("--d", type=int, default=512, help="dimension")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--latent", type=int, default=32, help="intrinsic dimension of the synthetic vectors")
    p.add_argument("--nprobe", type=_ints, default=[16, 64], help="IVF cells visited, comma-separated")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW build effort (faiss default 40)")
    p.add_argument("--ef-search", type=_ints, default=[64, 128], help="HNSW search breadth, comma-separated")
    p.add_argument("--encoder", default="medcap-effnet-minilm", help="encoder name, or 'none' to skip part 2")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    bench_indexes(args)
    if args.encoder != "none":
        bench_embedding(args)


if __name__ == "__main__":
    main()
