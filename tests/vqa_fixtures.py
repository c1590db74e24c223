"""Small VQA data sets built in a test, in the layouts the real ones ship in (VQA-RAD's OSF JSON, SLAKE's
train/validate/test JSON), with images whose brightness decides the answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = [  # (question, answer_type, content type, answer for a bright image, for a dark one)
    ("Is there a mass?", "CLOSED", "PRES", "Yes", "No"),
    ("What modality is this?", "OPEN", "MODALITY", "CT", "MRI"),
    ("Is this a CT or an MRI?", "CLOSED", "MODALITY", "CT", "MRI"),
    ("Which organ is shown?", "OPEN", "ORGAN", "the left lung", "Brain"),
]


def _image(path: Path, bright: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = 200 if bright else 40
    arr = np.clip(base + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def vqa_rad(root: Path, n_images: int = 12, test_images: int = 4) -> Path:
    """``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``: freeform and para rows, plus test rows on
    images that also have training rows (as in the full release)."""
    folder = root / "VQA_RAD Image Folder"
    rows, qid = [], 0
    for i in range(n_images):
        bright = i % 2 == 0
        _image(folder / f"synpic{1000 + i}.jpg", bright, i)
        for q, atype, ctype, a_bright, a_dark in QUESTIONS:
            for phrase in ("freeform", "para") + (("test_freeform",) if i < test_images else ()):
                text = q if phrase != "para" else q.replace("Is there", "Do you see")
                rows.append(
                    {"qid": str(qid), "phrase_type": phrase, "image_name": f"synpic{1000 + i}.jpg",
                     "image_organ": "CHEST", "question": text, "answer": a_bright if bright else a_dark,
                     "answer_type": atype + (" " if qid == 0 else ""), "question_type": ctype}
                )  # fmt: skip
                qid += 1
    root.mkdir(parents=True, exist_ok=True)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows, indent=1))
    return root


def slake(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """``train.json``, ``validate.json``, ``test.json`` and ``imgs/xmlabN/source.jpg``, with a Chinese row."""
    sizes = sizes or {"train": 10, "validate": 4, "test": 4}
    qid, img = 0, 0
    for split, n in sizes.items():
        rows = []
        for _ in range(n):
            bright = img % 2 == 0
            _image(root / "imgs" / f"xmlab{img}" / "source.jpg", bright, img)
            for q, atype, ctype, a_bright, a_dark in QUESTIONS:
                rows.append(
                    {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": q,
                     "answer": a_bright if bright else a_dark, "q_lang": "en", "location": "Chest", "modality": "CT",
                     "answer_type": atype, "content_type": ctype.title(), "base_type": "vqa", "qid": qid}
                )  # fmt: skip
                qid += 1
            rows.append(
                {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": "这是什么?", "answer": "CT",
                 "q_lang": "zh", "answer_type": "OPEN", "content_type": "Modality", "qid": qid}
            )  # fmt: skip
            qid += 1
            img += 1
        (root / f"{split}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return root


def vqa_config(tmp: Path, root: Path, fmt: str, encoder: str, question_encoder: str, **extra) -> dict:
    index = "train+validate" if fmt == "slake" else "train"
    cfg = {
        "task": "vqa",
        "name": f"vqa-{fmt}",
        "runs_dir": str(tmp / "runs"),
        "data": {"root": str(root), "format": fmt, "index_split": index, "query_splits": ["test"]},
        "retrieval": {"encoder": {"name": encoder, "batch_size": 8}},
        "vqa": {
            "question_encoder": question_encoder,
            "bootstrap": 50,
            "answerers": [
                {"name": "prior", "kind": "prior"},
                {"name": "vote", "kind": "vote", "k": 5},
                {"name": "classifier", "kind": "classifier", "hidden": 16, "epochs": 5, "batch_size": 16},
            ],
            "fusers": [{"name": "fused", "kind": "vote"}],
            "answer_set": "fused",
        },
    }
    for key, value in extra.items():
        cfg[key] = value
    return cfg
