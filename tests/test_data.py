"""Data readers and validation: every bad input is reported with its file and line."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from medcap.config import DataConfig
from medcap.data import check_dataset, list_splits, load_image, load_split, write_rejects
from medcap.data.problems import InputError

MEDPIX2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "medpix2"


# --------------------------------------------------------------------------- helpers


def _image(path: Path, grey: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (grey, grey, grey)).save(path)
    return path


def _dataset(
    root: Path,
    captions: str | bytes | None,
    split: str = "train",
    images: tuple[str, ...] = ("a", "b", "c"),
    concepts: str | None = None,
    metadata: str | None = None,
    **cfg: object,
) -> DataConfig:
    """A tiny ImageCLEF-layout data set: ``{split}/ID.jpg`` images and the given CSV texts."""
    for i, name in enumerate(images):
        _image(root / split / f"{name}.jpg", grey=40 * i)
    if captions is not None:
        data = captions.encode() if isinstance(captions, str) else captions
        (root / f"{split}_captions.csv").write_bytes(data)
    if concepts is not None:
        (root / f"{split}_concepts.csv").write_text(concepts)
    if metadata is not None:
        (root / "metadata.csv").write_text(metadata)
    return DataConfig(root=str(root), **cfg)


def _problems(cfg: DataConfig, split: str = "train") -> list[tuple[str, int | None, str]]:
    with pytest.raises(InputError) as err:
        load_split(cfg, split)
    return [(Path(p.file).name, p.line, p.message) for p in err.value.problems]


GOOD = 'ID,Caption\na,"CT of the chest, axial."\nb,MRI of the brain.\nc,"Lesion ""quoted"" here."\n'


# --------------------------------------------------------------------------- ImageCLEF layout


def test_clean_split_loads_with_concepts_and_groups(tmp_path: Path) -> None:
    cfg = _dataset(
        tmp_path,
        GOOD,
        concepts="ID,CUIs\na,C0040405;C0817096\nc,C0024485\n",
        metadata="ID,case_id,split\na,case1,train\nb,case1,train\nc,case2,train\nz,case9,valid\n",
    )
    data = load_split(cfg, "train")
    assert data.rejects == []
    assert [e.id for e in data.examples] == ["a", "b", "c"]
    assert data.examples[0].caption == "CT of the chest, axial."
    assert data.examples[2].caption == 'Lesion "quoted" here.'
    assert data.examples[0].concepts == ("C0040405", "C0817096")
    assert data.examples[1].concepts == ()
    assert [e.group for e in data.examples] == ["case1", "case1", "case2"]
    assert data.examples[1].image == tmp_path / "train" / "b.jpg"
    img = load_image(data.examples[1])
    assert img.mode == "RGB" and img.size == (8, 8)
    assert list_splits(cfg) == ["train"]
    assert check_dataset(cfg) == []


def test_no_group_column_means_no_groups(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, GOOD, metadata="ID,patient\na,p1\n", group_column="case_id")
    assert {e.group for e in load_split(cfg, "train").examples} == {None}


def test_missing_column_names_file_and_header_line(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, "ID,Text\na,x\n")
    [(name, line, message)] = _problems(cfg)
    assert (name, line) == ("train_captions.csv", 1)
    assert "missing column 'Caption'" in message
    cfg.on_error = "skip"  # a file without its columns cannot be skipped around
    with pytest.raises(InputError):
        load_split(cfg, "train")


def test_malformed_rows_are_reported_and_reading_goes_on(tmp_path: Path) -> None:
    cfg = _dataset(
        tmp_path, 'ID,Caption\na,ok.\nb,one, two\nc,"never closed\nd,"fine, fine"\n', images=("a", "b", "c", "d")
    )
    found = _problems(cfg)
    assert [(n, line) for n, line, _ in found] == [("train_captions.csv", 3), ("train_captions.csv", 4)]
    assert "expected 2 fields" in found[0][2] and "found 3" in found[0][2]
    assert "malformed row" in found[1][2]
    cfg.on_error = "skip"
    data = load_split(cfg, "train")
    assert [e.id for e in data.examples] == ["a", "d"]
    assert data.examples[1].caption == "fine, fine"


def test_empty_caption(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, 'ID,Caption\na,x\nb,"   "\nc,\n')
    found = _problems(cfg)
    assert [(line, "empty caption" in m) for _, line, m in found] == [(3, True), (4, True)]


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, "ID,Caption\na,x\nb,y\na,z\n")
    [(name, line, message)] = _problems(cfg)
    assert (name, line) == ("train_captions.csv", 4)
    assert "duplicate ID 'a'" in message and "line 2" in message


def test_missing_image(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, "ID,Caption\na,x\nnope,y\n")
    [(name, line, message)] = _problems(cfg)
    assert (name, line) == ("train_captions.csv", 3)
    assert "image missing" in message and "nope" in message


def test_corrupt_images_found_by_check_dataset_and_load_split(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, GOOD)
    (tmp_path / "train" / "b.jpg").write_bytes(b"this is not a jpeg")
    good = tmp_path / "train" / "c.jpg"
    Image.new("RGB", (256, 256), (10, 200, 30)).save(good, quality=95)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    fast = dataclasses.replace(cfg, verify_images=False)
    assert load_split(fast, "train").rejects == []  # without verify_images only existence is checked
    found = [(Path(p.file).name, p.line, p.message) for p in check_dataset(cfg)]
    assert [(n, line) for n, line, _ in found] == [("train_captions.csv", 3), ("train_captions.csv", 4)]
    assert all("image unreadable" in m for _, _, m in found)
    assert "b.jpg" in found[0][2] and "c.jpg" in found[1][2]
    with pytest.raises(InputError, match="b.jpg"):
        load_image(load_split(fast, "train").examples[1])
    with pytest.raises(InputError, match="c.jpg"):
        load_split(cfg, "train")
    skipped = load_split(dataclasses.replace(cfg, on_error="skip"), "train")
    assert [e.id for e in skipped.examples] == ["a"] and len(skipped.rejects) == 2


def test_empty_image_file_caught_by_load_split(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, GOOD)
    (tmp_path / "train" / "a.jpg").write_bytes(b"")
    [(_, line, message)] = _problems(cfg)
    assert line == 2 and "empty" in message


def test_concepts_for_unknown_id(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, GOOD, concepts="ID,CUIs\na,C1\nghost,C2\n")
    [(name, line, message)] = _problems(cfg)
    assert (name, line) == ("train_concepts.csv", 3)
    assert "'ghost'" in message
    cfg.on_error = "skip"
    data = load_split(cfg, "train")
    assert len(data.examples) == 3 and len(data.rejects) == 1  # reported, no example dropped


def test_non_utf8_line(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, b"ID,Caption\na,fine\nb,caf\xe9 latin-1\nc,ok\n")
    [(name, line, message)] = _problems(cfg)
    assert (name, line) == ("train_captions.csv", 3)
    assert "UTF-8" in message


def test_raise_lists_every_problem_and_skip_drops_exactly_the_bad_rows(tmp_path: Path) -> None:
    text = "ID,Caption\na,x\nb,\nc,y\na,again\nmissing,z\nd,too,many\n"
    cfg = _dataset(tmp_path, text, images=("a", "b", "c", "d"), concepts="ID,CUIs\nzz,C1\n")
    with pytest.raises(InputError) as err:
        load_split(cfg, "train")
    where = sorted((Path(p.file).name, p.line) for p in err.value.problems)
    expected = [("train_captions.csv", n) for n in (3, 5, 6, 7)] + [("train_concepts.csv", 2)]
    assert where == sorted(expected)
    assert "train_captions.csv:6" in str(err.value)
    cfg.on_error = "skip"
    data = load_split(cfg, "train")
    assert [e.id for e in data.examples] == ["a", "c"]
    assert sorted((Path(p.file).name, p.line) for p in data.rejects) == sorted(expected)
    out = tmp_path / "rejects" / "train.csv"
    write_rejects(out, data.rejects)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and set(rows[0]) == {"file", "line", "message"}
    assert {r["line"] for r in rows} == {"2", "3", "5", "6", "7"}


def test_test_split_without_captions_lists_its_folder(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, GOOD)
    _dataset(tmp_path, None, split="test", images=("t2", "t1", "t3"))
    assert list_splits(cfg) == ["train", "test"]
    data = load_split(cfg, "test")
    assert [e.id for e in data.examples] == ["t1", "t2", "t3"]
    assert all(e.caption is None for e in data.examples)
    assert check_dataset(cfg) == []


def test_unknown_split_and_id_in_two_splits(tmp_path: Path) -> None:
    cfg = _dataset(tmp_path, GOOD)
    _dataset(tmp_path, "ID,Caption\nv1,x\na,y\n", split="valid", images=("v1", "a"))
    with pytest.raises(InputError, match="no split 'nope'"):
        load_split(cfg, "nope")
    [problem] = check_dataset(cfg)
    assert (Path(problem.file).name, problem.line) == ("valid_captions.csv", 3)
    assert "also in split 'train'" in problem.message


def test_shared_image_folder_from_image_dirs(tmp_path: Path) -> None:
    for name in "abc":
        _image(tmp_path / "images" / f"{name}.png")
    (tmp_path / "train_captions.csv").write_text(GOOD)
    cfg = DataConfig(root=str(tmp_path), image_dirs=["images"])
    assert [e.image.name for e in load_split(cfg, "train").examples] == ["a.png", "b.png", "c.png"]


def test_unreferenced_images_reads_the_parts_of_a_union_split(tmp_path: Path) -> None:
    from medcap.data import unreferenced_images

    for name in ("a", "b", "c", "stray"):
        _image(tmp_path / "images" / f"{name}.jpg")
    (tmp_path / "train_captions.csv").write_text("ID,Caption\na,CT of the chest.\nb,MRI of the brain.\n")
    (tmp_path / "valid_captions.csv").write_text("ID,Caption\nc,CT of the head.\n")
    cfg = DataConfig(root=str(tmp_path), image_dirs=["images"])
    warnings = unreferenced_images(cfg, ["train+valid"])
    assert len(warnings) == 1 and "1 image(s) that no row of train, valid names (stray.jpg)" in warnings[0]
    assert unreferenced_images(cfg, ["train+valid", "valid"]) == warnings


def test_load_image_rescales_16_bit(tmp_path: Path) -> None:
    import numpy as np

    from medcap.records import Example

    path = tmp_path / "x.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(path)
    img = load_image(Example("x", path))
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (255, 255, 255)
    with pytest.raises(InputError, match="missing.png"):
        load_image(Example("y", tmp_path / "missing.png"))


# --------------------------------------------------------------------------- manifests


def test_manifest_csv(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "1.png")
    absolute = _image(tmp_path / "elsewhere" / "2.png")
    _image(tmp_path / "imgs" / "3.png")
    manifest = tmp_path / "data" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "id,image,caption,concepts,group,split\n"
        f'1,../imgs/1.png,"A, b.",C1;C2,g1,train\n'
        f"2,{absolute},Second.,,g1,train\n"
        "3,../imgs/3.png,Third.,C3,g2,valid\n"
    )
    cfg = DataConfig(root=str(manifest), format="manifest")
    assert list_splits(cfg) == ["train", "valid"]
    train = load_split(cfg, "train").examples
    assert [(e.id, e.caption, e.concepts, e.group) for e in train] == [
        ("1", "A, b.", ("C1", "C2"), "g1"),
        ("2", "Second.", (), "g1"),
    ]
    assert train[0].image.resolve() == (tmp_path / "imgs" / "1.png").resolve()
    assert load_image(train[1]).mode == "RGB"
    assert [e.id for e in load_split(cfg, "valid").examples] == ["3"]
    assert check_dataset(cfg) == []


def test_manifest_jsonl_problems_and_default_split(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    rows = [
        json.dumps({"id": "a", "image": "a.jpg", "caption": "x", "concepts": ["C1", "C2"], "case_id": "k"}),
        json.dumps({"id": "b", "image": "b.jpg", "caption": ""}),
        "{not json",
        json.dumps({"id": "c", "caption": "no image key"}),
        json.dumps({"id": "d", "image": "gone.jpg", "caption": "y"}),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(root=str(manifest), format="manifest", on_error="skip")
    assert list_splits(cfg) == ["train"]
    data = load_split(cfg, "train")
    assert [(e.id, e.concepts, e.group) for e in data.examples] == [("a", ("C1", "C2"), "k")]
    found = {p.line: p.message for p in data.rejects}
    assert set(found) == {2, 3, 4, 5}
    assert "empty caption" in found[2] and "JSON" in found[3] and "'image'" in found[4] and "gone.jpg" in found[5]
    assert all(p.file == str(manifest) for p in data.rejects)


def test_manifest_unlabelled_split(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,caption,split\na,a.jpg,Ref.,train\nb,b.jpg,,test\n")
    cfg = DataConfig(root=str(manifest), format="manifest")
    assert load_split(cfg, "test").examples[0].caption is None
    assert load_split(cfg, "train").examples[0].caption == "Ref."


# --------------------------------------------------------------------------- Hugging Face imagefolder


def test_hf_imagefolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "folder"
    for i in range(3):
        _image(folder / f"img{i}.png", grey=60 * i)
    (folder / "metadata.csv").write_text(
        'file_name,caption,case_id\nimg0.png,"First, caption.",c1\nimg1.png,Second.,c1\nimg2.png,Third.,c2\n'
    )
    cfg = DataConfig(root=str(folder), format="hf")
    assert list_splits(cfg) == ["train"]
    data = load_split(cfg, "train")
    by_id = {e.id: e for e in data.examples}
    assert set(by_id) == {"img0", "img1", "img2"}
    assert by_id["img0"].caption == "First, caption." and by_id["img2"].group == "c2"
    assert isinstance(by_id["img1"].image, Path) and by_id["img1"].image.name == "img1.png"
    assert load_image(by_id["img1"]).getpixel((0, 0)) == (60, 60, 60)
    assert check_dataset(cfg) == []
    with pytest.raises(InputError, match="no split 'valid'"):
        load_split(cfg, "valid")


# --------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_medpix2_loads_without_problems() -> None:
    if not MEDPIX2.is_dir():
        pytest.skip(f"real data not found at {MEDPIX2} (../shared/data/medpix2 beside the repo)")
    cfg = DataConfig(root=str(MEDPIX2), group_column="case_id", image_dirs=["images"])
    assert list_splits(cfg) == ["train", "valid"]
    train, valid = load_split(cfg, "train"), load_split(cfg, "valid")
    assert len(train.examples) == 1638 and len(valid.examples) == 191
    assert all(e.group for e in train.examples + valid.examples)
    assert not {e.group for e in train.examples} & {e.group for e in valid.examples}
    assert check_dataset(cfg) == []
