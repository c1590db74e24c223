"""Every benchmark in one command: retrieval (FAISS vs numpy brute force, batched vs per-image
embedding), generation (batched hf vs a per-image loop, vLLM vs hf when installed) and, with
``--e2e``, end-to-end seconds per 1,000 images of the demo profile. Each table's ratios compare
runs made in the same process.

    python bench/run_all.py [--quick] [--e2e]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def run(script: str, *args: str) -> None:
    print(f"\n$ python bench/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def end_to_end(n: int) -> None:
    """Time the demo profile on ``n`` phantom images, from nothing to report."""
    from medcap.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_demo(Path(tmp) / "demo", n=n)
        seconds = time.perf_counter() - start
    print("\n## End to end: the demo profile (train everything, caption, fuse, score, ablate, report)")
    print("| images | seconds | seconds per 1,000 images |\n| --- | --- | --- |")
    print(f"| {n} | {seconds:.0f} | {seconds / n * 1000:.0f} |")
    print(f"(run folder was {result.run_dir})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a minute or two on 2 cores)")
    ap.add_argument("--e2e", action="store_true", help="also time the demo profile end to end (~10 min on 2 cores)")
    ap.add_argument("--e2e-images", type=int, default=240)
    args = ap.parse_args()
    n, queries = ("20000", "200") if args.quick else ("100000", "1000")
    run("retrieval.py", "--n", n, "--queries", queries, "--images", "32" if args.quick else "64")
    run("generate.py", "--suite", "vlm", "--vlm-n", "8" if args.quick else "16")
    run("scale.py", *(["--sizes", "2000,6000,20000", "--repeat", "1"] if args.quick else []))
    if args.e2e:
        end_to_end(args.e2e_images)


if __name__ == "__main__":
    main()
