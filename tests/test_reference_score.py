"""medcap's figures against the independent cross-check shared/tools/reference_score.py, on real MedPix captions."""

import csv
import json
import subprocess
import sys

import pytest
from conftest import SHARED_DATA

from medcap.config import EvalConfig
from medcap.eval.suites import run_suite

SCRIPT = SHARED_DATA.parent / "tools" / "reference_score.py"
VALID = SHARED_DATA / "medpix2" / "valid_captions.csv"
N = 80  # images: 6,400 caption x reference pairs, under a minute on 2 cores

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SCRIPT.is_file() and VALID.is_file()), reason=f"needs {SCRIPT} and {VALID}"),
]


def _write(tmp_path, refs: dict[str, str], sets: dict[str, dict[str, str]]):
    gt = tmp_path / "test_captions.csv"
    with gt.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Caption"])
        writer.writerows(refs.items())
    files = {}
    for name, hyps in sets.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in hyps.items()))
    return gt, files


@pytest.mark.parametrize("kind", ["other_image", "constant"])
def test_figures_agree_with_reference_score(tmp_path, kind):
    with VALID.open(newline="") as f:
        rows = list(csv.DictReader(f))[:N]
    refs = {r["ID"]: r["Caption"] for r in rows}
    ids = list(refs)
    if kind == "other_image":  # a caption of another image: what a retrieval baseline writes at worst
        hyps = {i: refs[ids[(k + 7) % N]] for k, i in enumerate(ids)}
    else:
        hyps = {i: "CT of the abdomen shows no abnormality." for i in ids}
    gt, files = _write(tmp_path, refs, {kind: hyps})
    out = subprocess.run([sys.executable, str(SCRIPT), str(gt), str(files[kind])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    result = run_suite(
        "imageclef2023", refs, hyps, eval_cfg=EvalConfig(bertscore_model="minilm", device="cpu", bootstrap=0)
    )
    got = result.metrics
    assert expected["n"] == result.n == N and got["distinct"] == expected["distinct"]
    # bert-score's batched run pads with zero similarities: a pair can differ by ~1e-3 (docs/metrics.md)
    assert got["bertscore"] == pytest.approx(expected["bertscore"], abs=5e-4)
    assert got["rouge1"] == pytest.approx(expected["rouge1"], abs=1e-9)
    assert got["specificity"] == pytest.approx(expected["specificity"], abs=5e-4)
    assert abs(got["median_rank"] - expected["median_rank"]) <= 1.0
