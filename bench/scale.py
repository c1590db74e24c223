"""Scale: data check, resume scanning and submission writing on a synthetic manifest of up to 100,000 images.

    python bench/scale.py [--sizes 10000,30000,100000] [--repeat 3] [--works "resume scan,..."] [--dir DIR]

Writes N tiny JPEGs (8x8 grey, 64 distinct ones) and a CSV manifest of the first N of them for each
size, a partial candidates JSONL of N rows, then times each piece of work in a fresh child process:

- ``data check``: ``check_dataset`` on the manifest (every image decoded), the work of ``medcap data check``;
- ``load split``: ``load_split``, what every run does first (images verified too);
- ``resume scan``: reopening the partial JSONL with ``ResumableJsonl`` (the IDs already done);
- ``submission write`` / ``submission check``: ``write_submission`` for 2026 (CSV + zip) and
  ``check_submission`` of the zip against the N test IDs.

Each child reports its wall and CPU seconds and its peak RSS (``ru_maxrss``), and how far the peak
rose above the child's footprint after its imports; each measurement is the child with the least
CPU time of ``--repeat``. Growth is computed on CPU seconds: on shared cores wall time waits for
the other jobs and a single run can be 2x off, CPU time much less so. The summary gives, per work, the growth from the smallest to
the largest size: the time ratio, the exponent b of time ~ N^b (1 is linear) and the memory ratio.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

WORDS = ("axial", "coronal", "CT", "MRI", "scan", "shows", "a", "mass", "lesion", "in", "the", "left", "right", "lung")
WORDS += ("liver", "brain", "with", "contrast", "enhancing", "nodule", "of", "cm")
WORKS = ("data check", "load split", "resume scan", "submission write", "submission check")


def caption(i: int) -> str:
    """A deterministic ~20-word caption for image ``i`` (a comma in every third)."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(20)]
    if i % 3 == 0:
        words[9] += ","
    return " ".join(words)


def image_id(i: int) -> str:
    return f"synth_{i:06d}"


# --------------------------------------------------------------------------- the data (not timed)


def make_data(root: Path, sizes: list[int]) -> None:
    """Images for the largest size, a manifest and a partial JSONL per size; kept when already there."""
    from PIL import Image

    from medcap.runs import Manifest

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    variants = []
    for v in range(64):
        buf = io.BytesIO()
        Image.new("L", (8, 8), color=v * 4).save(buf, format="JPEG", quality=90)
        variants.append(buf.getvalue())
    n_max = max(sizes)
    start = time.perf_counter()
    for i in range(n_max):
        path = images / f"{image_id(i)}.jpg"
        if not path.exists():
            path.write_bytes(variants[i % 64])
    print(f"# {n_max:,} images in {images} ({time.perf_counter() - start:.0f} s)", flush=True)
    for n in sizes:
        manifest = root / f"manifest-{n}.csv"
        if not manifest.exists():
            with manifest.open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["id", "image", "caption"])
                w.writerows([image_id(i), f"images/{image_id(i)}.jpg", caption(i)] for i in range(n))
        partial = root / f"partial-{n}.jsonl"
        if not partial.exists():
            with partial.open("w", encoding="utf-8") as f:
                for i in range(n):
                    row = {"id": image_id(i), "caption": caption(i), "generator": "llava-sft", "mode": "sft"}
                    f.write(json.dumps({**row, "model": "llava-hf/llava-1.5-7b-hf", "raw": caption(i)}) + "\n")
            Manifest("generate", "bench-key", complete=False).write(partial)


# --------------------------------------------------------------------------- one measurement (child process)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(work: str, n: int, root: Path) -> dict:
    """Do one piece of work on size ``n``; its seconds and memory."""
    from medcap.config import DataConfig
    from medcap.data import check_dataset, load_split
    from medcap.eval.submission import check_submission, write_submission
    from medcap.runs import ResumableJsonl

    ids = [image_id(i) for i in range(n)]
    data = DataConfig(root=str(root / f"manifest-{n}.csv"), format="manifest", group_column=None)
    out = root / f"submission-{n}.csv"
    if work == "submission write":
        captions = {i: caption(k) for k, i in enumerate(ids)}
    base = _rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    if work == "data check":
        problems = check_dataset(data, ["train"])
        assert not problems, problems[:3]
    elif work == "load split":
        assert len(load_split(data, "train").examples) == n
    elif work == "resume scan":
        sink = ResumableJsonl(root / f"partial-{n}.jsonl", "generate", "bench-key")
        assert len(sink.done) == n
        sink.close()
    elif work == "submission write":
        write_submission(captions, out, 2026, order=ids)
    elif work == "submission check":
        check = check_submission(out.with_suffix(".zip"), ids, 2026)
        assert check.ok, check.errors[:3]
    else:
        raise ValueError(work)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu  # CPU: every thread of the process
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"work": work, "n": n, "seconds": seconds, "cpu": cpu, "peak_mb": peak, "growth_mb": max(0.0, peak - base)}


def measure(work: str, n: int, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", work, "--n", str(n), "--dir", str(root)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def report(results: list[dict], sizes: list[int]) -> None:
    print("\n| work | images | wall s | CPU s | CPU µs per image | peak RSS MB | rise over start MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['work']} | {r['n']:,} | {r['seconds']:.2f} | {r['cpu']:.2f} | {r['cpu'] / r['n'] * 1e6:.1f} | "
            f"{r['peak_mb']:.0f} | {r['growth_mb']:.0f} |"
        )
    lo, hi = min(sizes), max(sizes)
    print(f"\nGrowth from {lo:,} to {hi:,} images ({hi / lo:.0f}x): CPU time ~ N^b, b = 1 is linear")
    print("\n| work | CPU time ratio | b | memory rise ratio |\n| --- | ---: | ---: | ---: |")
    for work in WORKS:
        by_n = {r["n"]: r for r in results if r["work"] == work}
        if lo not in by_n or hi not in by_n:
            continue
        t = by_n[hi]["cpu"] / by_n[lo]["cpu"]
        m = by_n[hi]["growth_mb"] / by_n[lo]["growth_mb"] if by_n[lo]["growth_mb"] > 0 else float("nan")
        print(f"| {work} | {t:.1f}x | {math.log(t) / math.log(hi / lo):.2f} | {m:.1f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--works", default=",".join(WORKS), help=f"comma-separated subset of: {', '.join(WORKS)}")
    ap.add_argument("--repeat", type=int, default=3, help="children per measurement; the fastest is kept")
    ap.add_argument("--dir", default=None, help="where the synthetic data go (default: a temporary folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, Path(args.dir))))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="medcap-scale-") as tmp:
        root = Path(args.dir or tmp)
        make_data(root, sizes)
        results = []
        works = [w.strip() for w in args.works.split(",")]
        unknown = set(works) - set(WORKS)
        if unknown:
            raise SystemExit(f"unknown work(s) {sorted(unknown)}; choose from {WORKS}")
        for work in works:
            for n in sizes:
                results.append(min((measure(work, n, root) for _ in range(args.repeat)), key=lambda r: r["cpu"]))
                r = results[-1]
                print(
                    f"# {work} {n:,}: {r['seconds']:.2f} s ({r['cpu']:.2f} s CPU), peak {r['peak_mb']:.0f} MB",
                    flush=True,
                )
        report(results, sizes)


if __name__ == "__main__":
    main()
