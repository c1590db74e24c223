"""A submission always covers the test set: skipped or uncaptioned images get a fallback, listed where people look."""

import json
import shutil

import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.eval.submission import read_test_ids


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_unreadable_test_image_still_gets_a_validated_caption(tmp_path, phantom_dir, tiny_clip):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    victim = sorted((data / "test").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    (data / "test" / "STRAY_0001.jpg").write_bytes(victim.read_bytes())  # an image no CSV row names
    cfg = {
        "name": "fb",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(data), "query_splits": ["valid", "test"], "on_error": "skip"},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 2},
        "eval": {"metrics": ["rouge1"], "bootstrap": 0},
        "submit": {"year": 2026, "caption_set": "consensus"},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    res = invoke("run", config)
    assert res.exit_code == 0, res.output
    assert f"fallback {victim.stem}: constant caption" in res.output
    run = tmp_path / "runs" / "fb"
    from medcap.runs import Manifest

    sub = Manifest.read(run / "submissions" / "consensus.csv").info["upload"]  # 2026: the zip the platform takes
    check = invoke("validate", sub, "--testset", data / "test_captions.csv", "--year", "2026")
    assert check.exit_code == 0, check.output  # the full test list, not the reduced one
    side = json.loads((run / "submissions" / "consensus.fallbacks.json").read_text())
    assert list(side) == [victim.stem] and side[victim.stem]["caption"]
    assert victim.stem in (run / "rejects" / "test.csv").read_text()

    # a caption set that lost an image's row: that image falls back to its nearest neighbour's caption
    cands = run / "candidates" / "consensus" / "test.jsonl"
    rows = cands.read_text().splitlines(keepends=True)
    dropped = json.loads(rows[0])["id"]
    cands.write_text("".join(rows[1:]))
    out = tmp_path / "sub.csv"
    res = invoke("submit", run, "--year", "2024", "-o", out)
    assert res.exit_code == 0, res.output
    assert f"fallback {dropped}: nearest neighbour" in res.output
    assert len(out.read_text().splitlines()) == len(read_test_ids(data / "test_captions.csv"))  # 2024: no header

    check = invoke("data", "check", data)
    assert "STRAY_0001.jpg" in check.output and "no row of" in check.output
