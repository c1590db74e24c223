"""A VQA run end to end on tiny models: VQA-RAD's layout with test rows, SLAKE's, the CLI, the cache, CV and
the Python API."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from vqa_fixtures import slake, vqa_config, vqa_rad

from medcap.cli import main
from medcap.config import load_config
from medcap.pipeline import Pipeline


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from tiny_models import make_tiny_bert

    return str(make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny_bert"))


@pytest.fixture(scope="module")
def rad_run(tmp_path_factory, tiny_clip, tiny_text):
    tmp = tmp_path_factory.mktemp("vqarad")
    root = vqa_rad(tmp / "VQA-RAD full")
    path = tmp / "vqa.yaml"
    path.write_text(yaml.safe_dump(vqa_config(tmp, root, "vqa-rad", tiny_clip, tiny_text)))
    result = CliRunner().invoke(
        main, ["run", str(path), "--set", f"data.root={root}", "--set", "data.query_splits=[test]"]
    )
    assert result.exit_code == 0, result.output
    return tmp, root, path, result


def test_run_answers_every_test_question_with_its_qid(rad_run):
    tmp, root, _, result = rad_run
    run = tmp / "runs" / "vqa-vqa-rad"
    test_rows = [
        r for r in json.loads((root / "VQA_RAD Dataset Public.json").read_text()) if r["phrase_type"] == "test_freeform"
    ]
    for name in ("prior", "vote", "classifier", "fused"):
        rows = [json.loads(line) for line in (run / "answers" / name / "test.jsonl").read_text().splitlines()]
        assert sorted(r["qid"] for r in rows) == sorted(r["qid"] for r in test_rows)
        assert all(isinstance(r["answer"], str) and r["answer"] for r in rows)
    sub = [json.loads(line) for line in (run / "submissions" / "fused.test.jsonl").read_text().splitlines()]
    assert [r["qid"] for r in sub] == [r["qid"] for r in test_rows]
    csv = (run / "submissions" / "fused.test.csv").read_text().splitlines()
    assert csv[0] == "qid,image,question,answer" and len(csv) == len(test_rows) + 1
    scores = json.loads((run / "scores" / "fused.test.json").read_text())
    assert {"closed_accuracy", "open_recall", "open_f1", "open_exact", "open_bleu1"} <= set(scores["means"])
    assert scores["n_closed"] + scores["n_open"] == len(test_rows)
    assert "closed_accuracy" in scores["intervals"] and "MODALITY" in scores["by_type"]
    # the bright/dark rule is in the images and the training questions: the yes/no question is learnable
    closed = [r for r in scores["per_question"] if r["question"] == "Is there a mass?"]
    assert closed and sum(r["exact"] for r in closed) / len(closed) >= 0.5
    assert "closed_accuracy" in result.output and "submitted:" in result.output


def test_second_run_hits_the_cache(rad_run):
    tmp, root, path, _ = rad_run
    cfg = load_config(path, [f"data.root={root}", "data.query_splits=[test]"])
    pipe = Pipeline(cfg)
    with pipe.session():
        history = pipe.run_stages()
    assert history and not any(s.ran for s in history)


def test_answer_question_and_answerer_from_run(rad_run):
    import medcap

    tmp, root, _, _ = rad_run
    run = tmp / "runs" / "vqa-vqa-rad"
    image = root / "VQA_RAD Image Folder" / "synpic1000.jpg"
    answer = medcap.answer_question(image, "Is there a mass?", run=run)
    assert answer in ("yes", "no")
    answerer = medcap.Answerer.from_run(run)
    out = answerer.answer([(image, "Is this a CT or an MRI?"), (str(image), "What modality is this?")])
    assert out[0].answer in ("ct", "mri") and set(out[0].answers) == {"prior", "vote", "classifier", "fused"}
    assert out[1].answer not in ("yes", "no")


def test_evaluate_and_report_read_a_vqa_run(rad_run):
    tmp, _, _, _ = rad_run
    run = tmp / "runs" / "vqa-vqa-rad"
    result = CliRunner().invoke(main, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    assert "fused" in result.output and "closed_accuracy" in result.output
    result = CliRunner().invoke(main, ["report", str(run), "-o", str(tmp / "report.html")])
    assert result.exit_code == 0, result.output
    html = (tmp / "report.html").read_text()
    assert "Is there a mass?" in html and "classifier" in html


def test_cross_validation_by_image(rad_run):
    tmp, root, path, _ = rad_run
    result = CliRunner().invoke(main, ["ablate", str(path), "--set", f"data.root={root}", "--cv", "3"])
    assert result.exit_code == 0, result.output
    out = json.loads((tmp / "runs" / "vqa-vqa-rad" / "cv3.json").read_text())
    assert set(out["table"]) == {"prior", "vote", "classifier", "fused"}
    assert sum(out["folds"]) == out["n_images"] == 12
    assert set(out["p_closed_better"]) == {"prior", "vote", "classifier"}


@pytest.mark.parametrize("profile, make, fmt", [("vqa-rad-cpu", vqa_rad, "vqa-rad"), ("slake-cpu", slake, "slake")])
def test_the_shipped_profiles_answer_an_official_test_split(tmp_path, tiny_clip, tiny_text, profile, make, fmt):
    """The command the official test splits are scored with, on tiny models (the profiles' encoders swapped)."""
    root = make(tmp_path / "full")
    args = ["run", profile, "--set", f"data.root={root}", "--set", "data.query_splits=[test]"]
    args += ["--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"retrieval.encoder.name={tiny_clip}"]
    args += ["--set", f"vqa.question_encoder={tiny_text}", "--set", "vqa.bootstrap=20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cfg = load_config(Path(__file__).parents[1] / "medcap" / "profiles" / f"{profile}.yaml")
    sub = tmp_path / "runs" / profile / "submissions" / f"{cfg.vqa.answer_set}.test.jsonl"
    rows = [json.loads(line) for line in sub.read_text().splitlines()]
    assert len(rows) == 16  # 4 test images x 4 questions, every qid
    if fmt == "slake":  # SLAKE's integer qids as shipped, English rows only, in file order
        test = [r for r in json.loads((root / "test.json").read_text()) if r["q_lang"] == "en"]
        assert [r["qid"] for r in rows] == [r["qid"] for r in test]


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.integration
@pytest.mark.skipif(not (SHARED / "vqa-rad").is_dir(), reason="../shared/data/vqa-rad is not here")
def test_vqa_rad_cpu_on_the_shared_data(tmp_path):
    result = CliRunner().invoke(
        main, ["run", "vqa-rad-cpu", "--set", f"data.root={SHARED / 'vqa-rad'}", "--set", f"runs_dir={tmp_path}"]
    )
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "vqa-rad-cpu" / "scores" / "vote.train.json").read_text())
    assert scores["n_closed"] + scores["n_open"] == 1797 and scores["means"]["closed_accuracy"] > 0.55
