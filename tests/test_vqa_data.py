"""VQA readers on small fixtures: VQA-RAD's OSF JSON (train/test by phrase_type, "CLOSED "), SLAKE's JSON
(English rows only), CSV/JSONL manifests, and bad input named by file and line before any model loads."""

import json

import pytest
from vqa_fixtures import slake, vqa_rad

from medcap.config import ConfigError, DataConfig, load_config
from medcap.data.problems import InputError
from medcap.vqa.data import list_vqa_splits, load_image_split, load_questions


def data(root, fmt, **kw):
    return DataConfig(root=str(root), format=fmt, **kw)


def test_vqa_rad_train_and_test_splits_by_phrase_type(tmp_path):
    root = vqa_rad(tmp_path / "rad", n_images=6, test_images=2)
    cfg = data(root, "vqa-rad")
    assert list_vqa_splits(cfg) == ["train", "test"]
    train, test = load_questions(cfg, "train"), load_questions(cfg, "test")
    assert len(train.questions) == 6 * 4 * 2 and len(test.questions) == 2 * 4
    q = train.questions[0]
    assert q.answer_type == "CLOSED"  # the fixture writes "CLOSED " here, as two VQA-RAD rows do
    assert q.image_id == "synpic1000" and q.image.is_file() and q.where == f"{root / 'VQA_RAD Dataset Public.json'}:2"
    assert set(test.image_ids) <= set(train.image_ids)  # VQA-RAD's test questions are about training images
    images = load_image_split(cfg, "train")
    assert [ex.id for ex in images.examples] == [f"synpic{1000 + i}" for i in range(6)]


def test_slake_english_rows_and_union(tmp_path):
    root = slake(tmp_path / "slake")
    cfg = data(root, "slake")
    assert list_vqa_splits(cfg) == ["train", "validate", "test"]
    train = load_questions(cfg, "train")
    assert len(train.questions) == 10 * 4  # the Chinese question of every image is left out
    assert train.questions[0].image_id == "xmlab0" and train.questions[0].raw_qid == 0
    both = load_questions(cfg, "train+validate")
    assert len(both.questions) == 14 * 4
    assert train.questions[0].content_type == "Pres"


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_manifest_csv_and_jsonl(tmp_path, suffix):
    vqa_rad(tmp_path / "imgs_src", n_images=2, test_images=0)
    (tmp_path / "img.jpg").write_bytes((tmp_path / "imgs_src" / "VQA_RAD Image Folder" / "synpic1000.jpg").read_bytes())
    rows = [
        {"image": "img.jpg", "question": "Is there a mass?", "answer": "yes", "answer_type": "CLOSED", "qid": "a"},
        {"image": "img.jpg", "question": "What organ?", "answer": "lung", "answer_type": "open", "qid": "b",
         "split": "test"},
    ]  # fmt: skip
    path = tmp_path / f"manifest.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(
            "image,question,answer,answer_type,qid,split\n"
            "img.jpg,Is there a mass?,yes,CLOSED,a,\nimg.jpg,What organ?,lung,open,b,test\n"
        )
    cfg = data(path, "manifest")
    assert [q.qid for q in load_questions(cfg, "train").questions] == ["a"]
    test = load_questions(cfg, "test").questions
    assert test[0].answer_type == "OPEN" and test[0].image_id == "img"


def test_bad_input_is_named_by_file_and_line(tmp_path):
    root = vqa_rad(tmp_path / "rad", n_images=2, test_images=0)
    path = root / "VQA_RAD Dataset Public.json"
    rows = json.loads(path.read_text())
    rows[0]["question"] = " "
    rows[1]["answer_type"] = "MAYBE"
    rows[2]["answer"] = ""
    rows[4]["qid"] = rows[5]["qid"]
    rows[6]["image_name"] = "synpic9.jpg"
    path.write_text(json.dumps(rows, indent=1))
    with pytest.raises(InputError) as e:
        load_questions(data(root, "vqa-rad"), "train")
    text = str(e.value)
    lines = {p.message.split(" ")[0]: p.line for p in e.value.problems}
    assert f"{path}:2: empty question" in text  # the first object starts on line 2 of the file
    assert "unknown answer_type 'MAYBE'" in text and "empty answer" in text
    assert "repeats the one at line" in text and "'synpic9.jpg' not found" in text
    assert len(e.value.problems) == 5 and all(line is not None for line in lines.values())


def test_a_test_file_that_repeats_a_question_id_and_a_missing_split(tmp_path):
    root = slake(tmp_path / "slake", {"train": 2, "test": 2})
    rows = json.loads((root / "test.json").read_text())
    rows[1]["qid"] = rows[0]["qid"]
    rows[2]["answer"] = ""  # a split with answers needs every answer
    (root / "test.json").write_text(json.dumps(rows, indent=1))
    with pytest.raises(InputError, match="repeats the one at line") as e:
        load_questions(data(root, "slake"), "test", training=True)
    assert "test.json:" in str(e.value) and "empty answer" in str(e.value)
    rows[1]["qid"] = 999
    (root / "test.json").write_text(json.dumps(rows, indent=1))
    test = load_questions(data(root, "slake"), "test")  # a query split: answered, that question not scored
    assert [q.answer for q in test.questions].count(None) == 1
    with pytest.raises(InputError, match="empty answer"):  # training data needs every answer
        load_questions(data(root, "slake", index_split="test"), "test")
    with pytest.raises(InputError, match="no such file"):
        load_questions(data(root, "slake"), "validate")


def test_run_config_task_and_format_choices(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: vqa\ndata: {format: imageclef}\n")
    with pytest.raises(ConfigError, match="data.format"):
        load_config(path)
    path.write_text("task: vqa\ndata: {format: slake}\nvqa: {answerers: [{name: a, kind: vote, epochs: 3}]}\n")
    with pytest.raises(ConfigError, match="classifier"):  # another kind's key names the kind it belongs to
        load_config(path)
    path.write_text("task: vqa\ndata: {format: slake}\nvqa: {answer_set: nothing}\n")
    with pytest.raises(ConfigError, match="answer_set"):
        load_config(path)
    path.write_text("task: translate\n")
    with pytest.raises(ConfigError, match="task"):
        load_config(path)
    assert load_config(None).task == "caption"


def test_data_check_names_problems_of_a_vqa_set(tmp_path):
    from click.testing import CliRunner

    from medcap.cli import main

    root = vqa_rad(tmp_path / "rad", n_images=2, test_images=1)
    result = CliRunner().invoke(main, ["data", "check", str(root), "--format", "vqa-rad"])
    assert result.exit_code == 0 and "train: 16 questions, test: 4 questions" in result.output
    (root / "VQA_RAD Image Folder" / "synpic1001.jpg").unlink()
    result = CliRunner().invoke(main, ["data", "check", str(root), "--format", "vqa-rad"])
    assert result.exit_code == 1 and "'synpic1001.jpg' not found" in result.output and ".json:" in result.output


def test_a_run_stops_on_bad_input_before_any_model_loads(tmp_path):
    import yaml
    from click.testing import CliRunner
    from vqa_fixtures import vqa_config

    from medcap.cli import main

    root = vqa_rad(tmp_path / "rad", n_images=2, test_images=1)
    (root / "VQA_RAD Image Folder" / "synpic1001.jpg").unlink()
    path = tmp_path / "c.yaml"  # models that do not exist: nothing may try to load them
    path.write_text(yaml.safe_dump(vqa_config(tmp_path, root, "vqa-rad", "local-dir:/nonexistent", "/nonexistent")))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code != 0
    assert "VQA_RAD Dataset Public.json:" in result.output and "'synpic1001.jpg' not found" in result.output
    assert not (tmp_path / "runs" / "vqa-vqa-rad" / "embeddings").exists()
