"""Scale of the fuse path: index, retrieve, pool, generate, fuse (each fuser kind), evaluate and submit on a
ROCO-sized synthetic index, through the real pipeline stages (issue 19, part 3).

    python bench/scale_fuse.py [--sizes 10000,20000,40000,80000] [--queries 17237] [--text medpix|synthetic]
                               [--cases roco|medpix]
                               [--stages index,retrieve,...] [--exact-max 10000] [--resume-check] [--dir DIR]
                               [--set KEY=VALUE]...

The data (not timed, no image is decoded):

- **text**: ROCO-like captions, 1-3 sentences recombined from a bank of sentences of the real MedPix 2.0
  captions (``../shared/data/medpix2/*_captions.csv`` from the repository root; ``--text medpix``, the
  default, stops with a message when they are absent) within one body region, or of template sentences
  (``--text synthetic``, runs anywhere). ``--cases roco`` (the default): one image per case and a caption of
  2-3 sentences of its own, never repeated (ImageCLEF 2024: 80,080 images, as many captions); ``--cases
  medpix``: cases of 1-4 images share a caption of 1-3 sentences. The index of each size is the
  first N images of the largest; the ``--queries`` query images (split ``valid``, with references) are
  the same for every size.
- **images**: 512-d embeddings near a 16-d subspace: each body region and bank sentence has a random latent, a
  caption's is its region's plus the mean of its sentences', each image adds its own jitter and off-subspace noise, so images whose
  captions share sentences are near each other and retrieval means something. They are written as the
  run's ``embed`` artifacts (``embeddings/ENCODER/SPLIT.npy`` + ``.ids.json`` + the manifest with the key
  the ``embed`` stage expects), so the pipeline never loads an encoder; image files are symlinks to one
  1x1 JPEG (the data layer checks that they exist; ``data.verify_images: false``).

The run is the ``medpix-cpu`` profile (caption-space retrieval, k = 200, its generators ``nearest`` and
``consensus``, its fusers ``mbr-neighbours`` and ``mbr-pool``), the learned ``ranker`` on ``mbr-pool``'s
settings (``top: 32``, as ``docs/experiments/medpix-learned.yaml``), and ``mbr-exact``, pool-MBR
with ``shortlist: null`` (the exact, quadratic baseline, only at sizes up to ``--exact-max``), scored with
BERTScore (MiniLM) and ROUGE-1 (``evaluate``) and submitted (``submit``, 2024 rules): both of the submitted
caption set, ``mbr-pool``. ``--set`` overrides its config as ``medcap run --set`` does.

Each stage runs in a fresh child process per size (``bench/scale.py``'s method): ``pipe.make`` of the
stage's artifacts with only that stage allowed (its inputs must be fresh; when they are not, a preparing
child makes them first, untimed). The child reports the stage's wall and CPU seconds (after the split is
loaded and the keys computed, which it reports as setup), and its peak RSS (``ru_maxrss``, imports and
models included). The summary gives each stage's growth from the smallest to the largest index: the
exponent b of time ~ N^b (1 is linear; the query count is fixed, so a per-query stage that does not grow
with the index has b ~ 0).

``--resume-check`` (at the largest size): the ``mbr-pool`` fuse is started again from nothing, killed
(SIGKILL) once its JSONL holds half the queries, and rerun; its output must equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling roco_like.py

from roco_like import INDEX, MEDPIX, QUERY, make_data  # noqa: E402

FUSE_BATCH = 64  # medcap.fuser.stage.BATCH: rows the fuse stage writes at once
SUBMITTED = "<submitted>"  # the run's submit.caption_set (mbr-pool unless --set says otherwise)

# work -> (stages allowed in its child, targets made: (stage, *target)); the order they run in
WORKS: dict[str, tuple[set[str], list[tuple]]] = {
    "index": ({"index"}, [("index",)]),
    "retrieve": ({"retrieve"}, [("retrieve", QUERY)]),
    "pool": ({"pool"}, [("pool", "minilm")]),
    "generate nearest": ({"generate"}, [("generate", "nearest", QUERY)]),
    "generate consensus": ({"generate"}, [("generate", "consensus", QUERY)]),
    "fuse pool-mbr": ({"fuse"}, [("fuse", "mbr-pool", QUERY)]),
    "fuse mbr-neighbours": ({"fuse"}, [("fuse", "mbr-neighbours", QUERY)]),
    "ranker inputs": (
        {"retrieve", "generate"},
        [("retrieve", INDEX), ("generate", "nearest", INDEX), ("generate", "consensus", INDEX)],
    ),
    "train ranker": ({"train-fuser"}, [("train-fuser", "ranker")]),
    "fuse ranker": ({"fuse"}, [("fuse", "ranker", QUERY)]),
    "fuse pool-mbr exact": ({"fuse"}, [("fuse", "mbr-exact", QUERY)]),
    "evaluate": ({"evaluate"}, [("evaluate", SUBMITTED, QUERY)]),
    "submit": ({"submit"}, [("submit", SUBMITTED, QUERY)]),
}
PER_QUERY = {"retrieve", "generate nearest", "generate consensus", "evaluate", "submit"}
PER_QUERY |= {w for w in WORKS if w.startswith("fuse")}
EXACT = "fuse pool-mbr exact"
RESUMED = "fuse pool-mbr"


# --------------------------------------------------------------------------- one stage (in a child)


def child(work: str, n: int, root: Path, prepare: bool, resume: bool = False) -> dict:
    """Make ``work``'s artifacts for the run of size ``n``; report its times and peak memory."""
    from medcap.config import load_config
    from medcap.pipeline import Pipeline, get_stage
    from medcap.runs import manifest_path

    t0, c0 = time.perf_counter(), time.process_time()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pipe = Pipeline(load_config(root / f"n{n}.yaml"))
    allowed, targets = WORKS[work]
    targets = [tuple(pipe.submitted if x == SUBMITTED else x for x in t) for t in targets]
    if prepare:  # the inputs of the work, untimed
        with pipe.session(f"bench prepare {work}"):
            for t in targets:
                for need in get_stage(t[0]).needs(pipe, *t[1:]):
                    if need not in targets:
                        pipe.make(*need)
        return {"work": work, "n": n, "prepared": True}
    for t in targets:
        pipe.key(*t)  # loads the splits and hashes the data: setup, not the stage
    preload(pipe, work)
    missing = [
        need
        for t in targets
        for need in get_stage(t[0]).needs(pipe, *t[1:])
        if need not in targets and not pipe.fresh(*need)
    ]
    if missing:
        return {"work": work, "n": n, "missing": [list(map(str, m)) for m in missing]}
    for t in targets if not resume else ():  # a benchmark times the work: an earlier run's artifact is made again
        manifest_path(pipe.path(*t)).unlink(missing_ok=True)  # without it, JSONL and folders start afresh
    setup = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    pipe.allowed = allowed
    shared: dict = {}
    close = pipe.close
    pipe.close = lambda: (shared.update(pipe._resources), close())  # keep a look at the scorer before it goes
    with pipe.session(f"bench {work}"):
        for t in targets:
            pipe.make(*t)
    seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
    scorers = [v for k, v in shared.items() if isinstance(k, tuple) and k[0] == "pool-scorer"]
    # hypotheses whose genericity was scored (each against the whole sample, once per process): a per-run cost
    # that grows with the number of distinct hypotheses the queries' shortlists reach
    generic = {"pool_rows": len(scorers[0].pool), "genericity_rows": len(scorers[0]._g)} if scorers else {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    ran = [h.stage for h in pipe.history if h.ran]
    return {"work": work, "n": n, "seconds": seconds, "cpu": cpu, "setup": setup, "peak_mb": peak,
            "base_mb": base, "ran": ran, "total_cpu": time.process_time() - c0, **generic}  # fmt: skip


def preload(pipe, work: str) -> None:
    """Load the models a stage shares through ``pipe.resource`` (MiniLM, the BERTScore model): a fixed cost per
    process, reported as setup, not as the stage's time."""
    from medcap.eval.metrics import load_bertscorer
    from medcap.retrieval.stages import sentence_model_of

    if work == "index" and pipe.cfg.retrieval.index.space == "caption" or work == "pool" or work.startswith("fuse"):
        sentence_model_of(pipe)
    if work == "pool" or work.startswith("fuse") or work == "train ranker":
        pipe.resource(("bertscorer", "minilm"), lambda: load_bertscorer("minilm", batch_size=64, device="cpu"))
    if work == "train ranker":
        sentence_model_of(pipe)


def _cmd(work: str, n: int, root: Path, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--child", work, "--n", str(n), "--dir", str(root), *extra]


def _run(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"child failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(work: str, n: int, root: Path, *extra: str) -> dict:
    r = _run(_cmd(work, n, root, *extra))
    if "missing" in r:  # inputs of a stage left out of --stages: made first, untimed
        print(f"#   {work} {n:,}: preparing its inputs {r['missing']} (untimed)", flush=True)
        _run(_cmd(work, n, root, "--prepare"))
        r = _run(_cmd(work, n, root, *extra))
    if "missing" in r:
        raise SystemExit(f"{work} {n:,}: inputs still missing after preparing them: {r['missing']}")
    return r


# --------------------------------------------------------------------------- resumability


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def resume_check(n: int, root: Path, queries: int) -> dict:
    """Kill the mbr-pool fuse halfway, rerun it, and compare with the uninterrupted run's output."""
    out = root / "runs" / f"n{n}" / "fused" / "mbr-pool" / f"{QUERY}.jsonl"
    manifest = out.with_name(out.name + ".manifest.json")
    if not out.is_file():
        measure(RESUMED, n, root)
    reference = out.read_bytes()
    out.unlink()
    manifest.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(_cmd(RESUMED, n, root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and _lines(out) < queries // 2:
        time.sleep(0.2)
    killed_at = _lines(out)
    finished_first = proc.poll() is not None
    if not finished_first:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = time.perf_counter() - t0
    r = measure(RESUMED, n, root, "--resume")  # the same child, keeping what the killed one wrote
    again = out.read_bytes()
    same_rows = [json.loads(x) for x in reference.splitlines()] == [json.loads(x) for x in again.splitlines()]
    if not same_rows:
        shutil.copy(out, out.with_suffix(".resumed.jsonl"))
        out.with_suffix(".uninterrupted.jsonl").write_bytes(reference)
    return {"n": n, "killed_at": killed_at, "finished_first": finished_first, "first_s": first,
            "rerun_s": r["seconds"], "identical": reference == again, "same_rows": same_rows,
            "rows": len(again.splitlines())}  # fmt: skip


# --------------------------------------------------------------------------- report


def report(results: list[dict], sizes: list[int], queries: int, skipped: list[str]) -> None:
    print(
        f"\n{queries:,} queries. Wall and CPU seconds of the stage itself; setup = reading the splits, keys and loading the shared models; "
        "genericity rows: hypotheses the fuser scored against the genericity sample, of the pool's."
    )
    print(
        "\n| stage | index captions | wall s | CPU s | setup s | ms per query (wall) | peak RSS MB | genericity rows |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        per = f"{r['seconds'] / queries * 1e3:.1f}" if r["work"] in PER_QUERY else ""
        g = f"{r['genericity_rows']:,} of {r['pool_rows']:,}" if "pool_rows" in r else ""
        print(
            f"| {r['work']} | {r['n']:,} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['setup']:.1f} | {per} | "
            f"{r['peak_mb']:.0f} | {g} |"
        )
    for line in skipped:
        print(f"\n{line}")
    lo, hi = min(sizes), max(sizes)
    if lo == hi:
        return
    print(f"\nGrowth from {lo:,} to {hi:,} index captions ({hi / lo:.0f}x): time ~ N^b, b = 1 is linear")
    print(
        "\n| stage | wall ratio | b (wall) | CPU ratio | b (CPU) | peak RSS ratio |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for work in WORKS:
        by_n = {r["n"]: r for r in results if r["work"] == work}
        if lo not in by_n or hi not in by_n:
            continue
        a, b = by_n[lo], by_n[hi]
        tw, tc = b["seconds"] / max(a["seconds"], 1e-9), b["cpu"] / max(a["cpu"], 1e-9)
        e = math.log(hi / lo)
        print(
            f"| {work} | {tw:.2f}x | {math.log(tw) / e:.2f} | {tc:.2f}x | {math.log(tc) / e:.2f} | "
            f"{b['peak_mb'] / a['peak_mb']:.2f}x |"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,20000,40000,80000", help="index sizes (captions)")
    ap.add_argument("--queries", type=int, default=17237, help="query images (ImageCLEF 2024's test: 17,237)")
    ap.add_argument("--text", choices=("medpix", "synthetic"), default="medpix")
    ap.add_argument("--cases", choices=("roco", "medpix"), default="roco", help="one image per caption, or cases")
    ap.add_argument("--stages", default=",".join(WORKS), help=f"comma-separated subset of: {', '.join(WORKS)}")
    ap.add_argument("--exact-max", type=int, default=10000, help="largest index the exact pool-MBR runs on")
    ap.add_argument("--resume-check", action="store_true", help="kill the mbr-pool fuse halfway at the largest size")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--dir", default=None, help="where the data and runs go (kept; default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        print(json.dumps(child(args.child, args.n, Path(args.dir), args.prepare, args.resume)))
        return []
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    works = [w.strip() for w in args.stages.split(",") if w.strip()]
    unknown = set(works) - set(WORKS)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; choose from {list(WORKS)}")
    works = [w for w in WORKS if w in works]  # pipeline order
    results: list[dict] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medcap-scale-fuse-") as tmp:
        root = Path(args.dir or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        make_data(root, sizes, args.queries, args.text, args.set, cases=args.cases, medpix=MEDPIX)
        for n in sizes:
            for work in works:
                if work == EXACT and n > args.exact_max:
                    skipped.append(f"{EXACT} {n:,}: skipped (index > --exact-max {args.exact_max:,}: quadratic)")
                    print(f"# {skipped[-1]}", flush=True)
                    continue
                r = measure(work, n, root)
                results.append(r)
                print(
                    f"# {work} {n:,}: {r['seconds']:.1f} s ({r['cpu']:.1f} s CPU, setup {r['setup']:.1f} s), "
                    f"peak {r['peak_mb']:.0f} MB",
                    flush=True,
                )
        report(results, sizes, args.queries, skipped)
        if args.resume_check:
            rc = resume_check(max(sizes), root, args.queries)
            print(
                f"\nResume check at {rc['n']:,} index captions: mbr-pool fuse killed with {rc['killed_at']:,} of "
                f"{args.queries:,} rows written{' (it finished before the kill)' if rc['finished_first'] else ''}, "
                f"rerun {rc['rerun_s']:.1f} s; output identical to the uninterrupted run: "
                f"{'yes' if rc['identical'] else 'NO'} (rows equal: {'yes' if rc['same_rows'] else 'NO'})"
            )
            if rc["killed_at"] >= args.queries:
                print(
                    f"(every row was written before the kill: use more than {2 * FUSE_BATCH} queries for a mid-run one)"
                )
            results.append({"work": "resume check", **rc})
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
