"""Data-parallel training: the speed-up of N processes over one, with the same global batch, and their weights.

    python bench/train_ddp.py [--processes 2] [--steps 40] [--batch-size 16] [--grad-accum 4] [--repeat 2]

The demo's trainer: the prefix captioner with a scratch GPT-2 (2 layers, hidden 192) learned with
its mapper, on ``--examples`` phantom captions and random 384-d image embeddings, every run
``batch_size x grad_accum`` examples a step. Rows: one process on one core (one thread, as a GPU
process has one device), one process with torch's threads over every core, and ``--processes``
processes under torchrun with one thread each (gloo). The speed-up is against the first row.
Seconds are the training call (process start and imports left out), the best of ``--repeat``;
the load average before and after says how busy the shared cores were, and the CPU seconds of all
processes together what data parallelism costs besides the work (they hardly move with the load).
The table also gives the largest weight difference between the 1- and N-process models.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(out: Path, steps: int, batch_size: int, grad_accum: int, n: int) -> None:
    """Train the prefix captioner into ``out`` (in each process of a launch); rank 0 writes ``out/seconds``."""
    import numpy as np

    from medcap.config import TrainConfig
    from medcap.data.phantom import caption, sample_case
    from medcap.generators.prefix_train import PrefixGeneratorConfig, train_prefix
    from medcap.models.distributed import world
    from medcap.models.lms import build_scratch_lm

    w = world()
    rng = np.random.default_rng(0)
    captions = [caption(sample_case(rng, i)) for i in range(n)]
    embeds = np.random.default_rng(1).standard_normal((n, 384)).astype(np.float32)
    with w.main_first():
        lm = build_scratch_lm(captions, out / "scratch-lm")
    tc = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, save_every=10**6)
    cfg = PrefixGeneratorConfig(name="prefix", kind="prefix", train=tc)
    cfg.prefix.lm, cfg.prefix.train_lm, cfg.prefix.prefix_length = str(lm), True, 4
    cfg.engine.device = "cpu" if not os.environ.get("BENCH_CUDA") else "cuda"
    ids = [f"i{i}" for i in range(n)]
    w.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    train_prefix(cfg, ids, embeds, captions, [], None, [], out / "run")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    (out / f"seconds-{w.rank}").write_text(json.dumps({"seconds": seconds, "cpu": cpu}))


def run(out: Path, processes: int, threads: int, args: argparse.Namespace) -> tuple[float, float]:
    """(wall seconds of rank 0, CPU seconds of every process together) of one training."""
    cmd = [str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--grad-accum", str(args.grad_accum), "--examples", str(args.examples)]  # fmt: skip
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port), *cmd]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, *cmd], env=env, check=True, capture_output=not args.verbose)
    ranks = [json.loads((out / f"seconds-{r}").read_text()) for r in range(processes)]
    return ranks[0]["seconds"], sum(r["cpu"] for r in ranks)


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for name in ("mapper.safetensors", "lm/model.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        worst = max(worst, max(float((x[k] - y[k]).abs().max()) for k in x))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps, args.batch_size, args.grad_accum, args.examples)
        return
    cores = os.cpu_count() or 1
    rows = [("1 process, 1 thread", 1, 1), (f"1 process, {cores} threads", 1, cores),
            (f"{args.processes} processes, 1 thread each", args.processes, 1)]  # fmt: skip
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        best: dict[str, tuple[float, float]] = {}
        for r in range(args.repeat):
            for label, processes, threads in rows:
                got = run(Path(tmp) / f"{processes}-{threads}-{r}", processes, threads, args)
                best[label] = min(best.get(label, got), got)
        diff = max_difference(Path(tmp) / "1-1-0/run/model", Path(tmp) / f"{args.processes}-1-0/run/model")
    g = args.batch_size * args.grad_accum
    print(f"## Prefix captioner, {args.steps} steps of {g} examples (batch_size {args.batch_size} x grad_accum "
          f"{args.grad_accum}), {cores} CPUs, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after\n")  # fmt: skip
    print("| run | seconds | steps/s | speed-up | CPU seconds, all processes |\n| --- | --- | --- | --- | --- |")
    base = best[rows[0][0]][0]
    for label, _, _ in rows:
        wall, cpu = best[label]
        print(f"| {label} | {wall:.1f} | {args.steps / wall:.2f} | {base / wall:.2f} | {cpu:.1f} |")
    print(f"\nlargest weight difference, {args.processes} processes against 1: {diff:.2e}")


if __name__ == "__main__":
    main()
