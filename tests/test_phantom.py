"""The synthetic phantom data set: deterministic, valid, and captions that say what is drawn."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medcap.config import DataConfig
from medcap.data import check_dataset, list_splits, load_split
from medcap.data.phantom import CUIS, ORGAN, Case, render, write_phantom
from medcap.data.problems import InputError

N = 60


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("ph") / "phantom", n=N, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _metadata(root: Path) -> list[dict[str, str]]:
    with (root / "metadata.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _files(write_phantom(tmp_path / "a", n=20, seed=7))
    b = _files(write_phantom(tmp_path / "b", n=20, seed=7))
    c = _files(write_phantom(tmp_path / "c", n=20, seed=8))
    assert a == b
    assert a != c
    assert sum(name.endswith(".jpg") for name in a) == 20


def test_layout_loads_without_problems(phantom: Path) -> None:
    cfg = DataConfig(root=str(phantom), group_column="case_id")
    assert list_splits(cfg) == ["train", "valid", "test"]
    sizes = {}
    for split in ("train", "valid", "test"):
        data = load_split(cfg, split)
        assert data.rejects == []
        assert all(e.id.startswith(f"PHANTOM_{split}_") and e.caption and e.concepts and e.group for e in data.examples)
        sizes[split] = len(data.examples)
    assert sum(sizes.values()) == N
    assert sizes["train"] > sizes["valid"] > 0 and sizes["test"] > 0
    assert check_dataset(cfg) == []
    names = {row[0]: row[1] for row in csv.reader((phantom / "cui_mapping.csv").open())}
    assert names["C0040405"] == "X-Ray Computed Tomography" and len(names) == len(CUIS) + 1


def test_captions_and_concepts_agree_with_metadata(phantom: Path) -> None:
    cfg = DataConfig(root=str(phantom))
    examples = {e.id: e for s in ("train", "valid", "test") for e in load_split(cfg, s).examples}
    for row in _metadata(phantom):
        ex = examples[row["ID"]]
        text = ex.caption.lower()
        assert row["modality"].lower() in text
        region = "brain" if row["region"] == "head" and row["modality"] == "MRI" else row["region"]
        assert f"of the {region}" in text
        assert CUIS[row["modality"]][0] in ex.concepts and CUIS[ORGAN[row["region"]]][0] in ex.concepts
        if row["finding"] == "none":
            assert "no focal" in text and len(ex.concepts) == 3
            continue
        word = "dense" if row["modality"] == "CT" else "intense"
        assert f"{row['size']} {row['density']}{word} {row['finding']} in the {row['side']}" in text
        level = {"head": {"upper": "frontal", "lower": "occipital"}}.get(row["region"], {}).get(
            row["level"], row["level"]
        )
        assert f"{row['side']} {level}" in text
        assert CUIS[row["finding"]][0] in ex.concepts


def test_cases_span_several_images_within_one_split(phantom: Path) -> None:
    rows = _metadata(phantom)
    per_case = Counter(r["case_id"] for r in rows)
    assert max(per_case.values()) >= 2 and min(per_case.values()) >= 1 and max(per_case.values()) <= 3
    assert sum(n >= 2 for n in per_case.values()) >= 5
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["case_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())


def test_captions_vary(phantom: Path) -> None:
    cfg = DataConfig(root=str(phantom))
    captions = [e.caption for e in load_split(cfg, "train").examples]
    rows = _metadata(phantom)
    assert len(set(captions)) >= 10
    assert {r["finding"] for r in rows} == {"none", "lesion", "mass", "cyst"}
    assert {r["modality"] for r in rows} == {"CT", "MRI"}
    assert {r["region"] for r in rows} == {"head", "chest", "abdomen"}


@pytest.mark.parametrize("modality", ["CT", "MRI"])
@pytest.mark.parametrize("region", ["head", "chest", "abdomen"])
def test_finding_is_visible_in_the_pixels(modality: str, region: str) -> None:
    """Hyper is brighter and hypo darker than the same spot without a finding; large covers more."""
    centres = {
        "head": (64 + 0.17 * 128, 64 - 0.17 * 128),
        "chest": (64 + 0.21 * 128, 64 - 0.10 * 128),
        "abdomen": (64 + 0.18 * 128, 64 - 0.09 * 128),
    }
    x, y = (int(v) for v in centres[region])

    def spot(case: Case, r: int = 3) -> float:
        img = render(case, 0, 128, seed=0, case_index=0).astype(float)
        return float(img[y - r : y + r + 1, x - r : x + r + 1].mean())

    base = dict(case_id="C", modality=modality, region=region, side="left", level="upper")
    normal = spot(Case(finding="none", **base))
    assert spot(Case(finding="lesion", size="small", density="hyper", **base)) > normal + 25
    assert spot(Case(finding="lesion", size="small", density="hypo", **base)) < normal - 25
    assert spot(Case(finding="cyst", size="small", density="hypo", **base)) < normal - 40
    ring = (0.07 * 128, 0.08 * 128)  # between the small and the large radius

    def ring_mean(case: Case) -> float:
        img = render(case, 0, 128, seed=0, case_index=0).astype(float)
        yy, xx = np.mgrid[0:128, 0:128] + 0.5
        d = np.hypot(xx - x, yy - y)
        return float(img[(d > ring[0]) & (d < ring[1])].mean())

    small = ring_mean(Case(finding="lesion", size="small", density="hyper", **base))
    large = ring_mean(Case(finding="lesion", size="large", density="hyper", **base))
    assert large > small + 25


def test_ct_has_bright_bone_and_mri_does_not() -> None:
    """Across the skull's left edge: CT goes bright bone -> brain; MRI goes fat rim -> dark bone -> brain."""

    def profile(modality: str) -> np.ndarray:
        img = render(Case("C", modality, "head", "none"), 0, 128, seed=0, case_index=0)
        row = img[64, :32].astype(int)
        return row[int(np.argmax(row > 100)) :]  # from the head's outer edge inwards

    ct, mri = profile("CT"), profile("MRI")
    assert ct.max() > 200 and ct.min() > 90
    assert mri.max() < 200 and mri[:6].min() < 60 and mri[-5:].mean() > 90


def test_refuses_foreign_folder_and_replaces_a_phantom(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a phantom data set"):
        write_phantom(foreign, n=6)
    assert (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_phantom(empty, n=6, seed=1)
    first = _files(empty)
    write_phantom(empty, n=9, seed=2)
    assert _files(empty) != first and sum(n.endswith(".jpg") for n in _files(empty)) == 9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
