"""A deterministic synthetic "phantom" data set in the ImageCLEF layout, for tests and demos.

Each case is one drawn study: a modality (CT or MRI), a body region (head, chest, abdomen) and a
finding (none, or a lesion, mass or cyst of some size, density and position). A case has 1-3
images (slices) that show the same finding with small changes, and all its images go to one
split, so same-case exclusion matters as it does on real data. Captions say exactly what is
drawn, so a model can learn them from the pixels:

- CT: bright bone (skull ring, spine), dark lungs; MRI: no bright bone (a dark bone ring inside
  a bright fat rim), bright fluid, a smooth intensity bias field.
- size: small (radius ~6 px at 128 px) or large (~12 px); density: darker (hypo-) or brighter
  (hyper-) than the organ it sits in; cysts are very dark, sharp and rimmed; masses are large
  and lobulated; lesions are round with soft edges.
- side follows the radiological convention: the patient's left is on the image's right.

Same ``seed``, ``n`` and ``image_size`` give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from medcap.data.problems import InputError, Problem
from medcap.files import atomic_dir

MARKER = "phantom.json"
JPEG_QUALITY = 90
SPLIT_SHARES = (("train", 0.70), ("valid", 0.85), ("test", 1.0))  # cumulative share of images

CUIS = {
    "CT": ("C0040405", "X-Ray Computed Tomography"),
    "MRI": ("C0024485", "Magnetic Resonance Imaging"),
    "abdomen": ("C0000726", "Abdomen"),
    "chest": ("C0817096", "Chest"),
    "head": ("C0018670", "Head"),
    "liver": ("C0023884", "Liver"),
    "lung": ("C0024109", "Lung"),
    "brain": ("C0006104", "Brain"),
    "lesion": ("C0221198", "Lesion"),
    "mass": ("C0577559", "Mass of body structure"),
    "cyst": ("C0010709", "Cyst"),
}
ORGAN = {"head": "brain", "chest": "lung", "abdomen": "liver"}

FINDING_TEMPLATES = (
    "Axial {mod} of the {region} shows a {size} {density} {noun} {where}.",
    "{mod} of the {region} demonstrates a {size} {density} {noun} {where}.",
    "There is a {size} {density} {noun} {where} on this axial {mod} of the {region}.",
)
NORMAL_TEMPLATES = (
    "Axial {mod} of the {region} shows no focal abnormality.",
    "{mod} of the {region} demonstrates no focal lesion.",
    "There is no focal abnormality on this axial {mod} of the {region}.",
)


@dataclass(frozen=True)
class Case:
    """One phantom study; ``finding`` is ``none``, ``lesion``, ``mass`` or ``cyst``."""

    case_id: str
    modality: str
    region: str
    finding: str
    size: str = ""  # small | large
    density: str = ""  # hypo | hyper
    side: str = ""  # left | right (the patient's)
    level: str = ""  # upper | lower
    template: int = 0
    dx: float = 0.0  # case-specific shift of the lesion, in image fractions
    dy: float = 0.0


def sample_case(rng: np.random.Generator, index: int) -> Case:
    """Draw the attributes of case number ``index``."""
    modality = str(rng.choice(["CT", "MRI"]))
    region = str(rng.choice(["head", "chest", "abdomen"]))
    finding = str(rng.choice(["none", "lesion", "mass", "cyst"], p=[0.25, 0.35, 0.2, 0.2]))
    template = int(rng.integers(len(FINDING_TEMPLATES)))
    if finding == "none":
        return Case(f"CASE{index:04d}", modality, region, finding, template=template)
    size = "large" if finding == "mass" else str(rng.choice(["small", "large"]))
    density = "hypo" if finding == "cyst" else str(rng.choice(["hypo", "hyper"]))
    side, level = str(rng.choice(["left", "right"])), str(rng.choice(["upper", "lower"]))
    dx, dy = (float(v) for v in rng.uniform(-0.02, 0.02, 2))
    return Case(f"CASE{index:04d}", modality, region, finding, size, density, side, level, template, dx, dy)


def caption(case: Case) -> str:
    """The caption of every image of ``case``: exactly what is drawn."""
    region = "brain" if case.region == "head" and case.modality == "MRI" else case.region
    if case.finding == "none":
        return NORMAL_TEMPLATES[case.template].format(mod=case.modality, region=region)
    word = {"CT": "dense", "MRI": "intense"}[case.modality]
    if case.region == "head":
        where = f"in the {case.side} {'frontal' if case.level == 'upper' else 'occipital'} lobe"
    elif case.region == "chest":
        where = f"in the {case.side} {case.level} lobe"
    else:
        where = f"in the {case.side} {case.level} quadrant"
    return FINDING_TEMPLATES[case.template].format(
        mod=case.modality, region=region, size=case.size, density=case.density + word, noun=case.finding, where=where
    )


def concepts(case: Case) -> list[str]:
    """UMLS CUIs of the modality, region, organ shown and finding."""
    names = [case.modality, case.region, ORGAN[case.region]] + ([case.finding] if case.finding != "none" else [])
    return [CUIS[n][0] for n in names]


# --------------------------------------------------------------------------- drawing

# grey levels per modality: CT like a soft-tissue window, MRI like a T2-weighted image
TISSUE = {
    "CT": dict(body=105, fat=75, bone=245, brain=120, white=112, csf=35, lung=75, heart=135, liver=145, vessel=165),
    "MRI": dict(body=140, fat=215, bone=25, brain=125, white=100, csf=225, lung=60, heart=190, liver=90, vessel=20),
}


def _ellipse(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0


def _anatomy(case: Case, S: int, scale: float) -> tuple[np.ndarray, tuple[float, float]]:
    """The body without the finding, and the lesion centre (pixels) for this region and side."""
    t = TISSUE[case.modality]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    c, k = S / 2, S * scale
    img = np.zeros((S, S), np.float32)

    def fill(mask: np.ndarray, value: float) -> None:
        img[mask] = value

    sign = 1.0 if case.side == "left" else -1.0  # patient's left = image right
    upper = case.level == "upper"
    if case.region == "head":
        fill(_ellipse(yy, xx, c, c, 0.40 * k, 0.46 * k), t["fat"] if case.modality == "MRI" else t["bone"])
        if case.modality == "MRI":
            fill(_ellipse(yy, xx, c, c, 0.385 * k, 0.445 * k), t["bone"])
        fill(_ellipse(yy, xx, c, c, 0.36 * k, 0.42 * k), t["brain"])
        fill(_ellipse(yy, xx, c, c, 0.27 * k, 0.33 * k), t["white"])
        for side in (-1, 1):
            fill(_ellipse(yy, xx, c + side * 0.04 * k, c, 0.022 * k, 0.08 * k), t["csf"])
        centre = (c + sign * 0.17 * k, c + (-0.17 if upper else 0.17) * k)
    elif case.region == "chest":
        fill(_ellipse(yy, xx, c, c, 0.45 * k, 0.32 * k), t["fat"])
        fill(_ellipse(yy, xx, c, c, 0.43 * k, 0.30 * k), t["body"])
        for side in (-1, 1):
            fill(_ellipse(yy, xx, c + side * 0.20 * k, c - 0.02 * k, 0.15 * k, 0.22 * k), t["lung"])
        fill(_ellipse(yy, xx, c + 0.03 * k, c + 0.04 * k, 0.08 * k, 0.10 * k), t["heart"])
        fill(
            _ellipse(yy, xx, c, c + 0.23 * k, 0.04 * k, 0.04 * k),
            t["bone"] if case.modality == "CT" else t["body"] - 30,
        )
        centre = (c + sign * 0.21 * k, c + (-0.10 if upper else 0.08) * k)
    else:  # abdomen: liver on the patient's right (image left), spine and aorta behind
        fill(_ellipse(yy, xx, c, c, 0.44 * k, 0.34 * k), t["fat"])
        fill(_ellipse(yy, xx, c, c, 0.41 * k, 0.31 * k), t["body"])
        fill(_ellipse(yy, xx, c - 0.17 * k, c - 0.08 * k, 0.20 * k, 0.16 * k), t["liver"])
        fill(
            _ellipse(yy, xx, c, c + 0.22 * k, 0.045 * k, 0.045 * k),
            t["bone"] if case.modality == "CT" else t["body"] - 30,
        )
        fill(_ellipse(yy, xx, c, c + 0.13 * k, 0.025 * k, 0.025 * k), t["vessel"])
        centre = (c + sign * 0.18 * k, c + (-0.09 if upper else 0.12) * k)
    return img, centre


def _draw_finding(img: np.ndarray, case: Case, centre: tuple[float, float], S: int, rng: np.random.Generator) -> None:
    """Paint the case's finding into ``img`` in place, relative to the organ's grey level there."""
    cx = centre[0] + (case.dx + rng.uniform(-0.012, 0.012)) * S
    cy = centre[1] + (case.dy + rng.uniform(-0.012, 0.012)) * S
    r = (0.045 if case.size == "small" else 0.095) * S * rng.uniform(0.9, 1.1)
    organ = float(img[int(cy), int(cx)])
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    dist = np.hypot(xx - cx, yy - cy)
    if case.finding == "cyst":  # very dark, homogeneous, sharp, with a thin bright rim
        img[(dist <= r + 1.0) & (dist > r)] = min(organ + 45, 250)
        img[dist <= r] = max(organ - 95, 3)
        return
    value = min(organ + 75, 250) if case.density == "hyper" else max(organ - 70, 5)
    if case.finding == "mass":  # lobulated: a union of overlapping lobes, heterogeneous inside
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2])
        alpha = np.zeros_like(dist)
        for ang in angles:
            d = np.hypot(xx - cx - 0.45 * r * np.cos(ang), yy - cy - 0.45 * r * np.sin(ang))
            alpha = np.maximum(alpha, np.clip(0.65 * r - d + 0.5, 0, 1))
        value_map = value + rng.normal(0, 12, img.shape).astype(np.float32)
    else:  # lesion: round with a soft edge
        alpha = np.clip((r - dist) / 2.0 + 0.5, 0, 1)
        value_map = np.full_like(img, value)
    img[:] = img * (1 - alpha) + value_map * alpha


def render(case: Case, slice_index: int, size: int, seed: int, case_index: int) -> np.ndarray:
    """One slice of ``case`` as a ``size`` x ``size`` uint8 grey image (its own seeded generator)."""
    rng = np.random.default_rng([seed, case_index, slice_index])
    img, centre = _anatomy(case, size, scale=1.0 + rng.uniform(-0.03, 0.03))
    if case.finding != "none":
        _draw_finding(img, case, centre, size, rng)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(0.7))
    out = np.asarray(pil, dtype=np.float32)
    if case.modality == "MRI":  # smooth coil bias field and stronger noise
        field = np.asarray(
            Image.fromarray(rng.normal(0, 1, (4, 4)).astype(np.float32), "F").resize((size, size), Image.BILINEAR)
        )
        out = out * (1 + 0.07 * field) + rng.normal(0, 5, out.shape)
    else:
        out = out + rng.normal(0, 3.5, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _plan(n: int, rng: np.random.Generator) -> list[tuple[Case, int, str]]:
    """Cases with their number of slices and split, adding up to ``n`` images (~70/15/15 by case)."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(int(rng.integers(1, 4)), n - sum(sizes)))
    if len(sizes) < 3:
        sizes = [1] * n
    cases = [sample_case(rng, i + 1) for i in range(len(sizes))]
    order = rng.permutation(len(cases))
    plan, done = [], 0
    for i in order:
        share = done / n
        plan.append([cases[i], sizes[i], next(s for s, cum in SPLIT_SHARES if share < cum)])
        done += sizes[i]
    for need in ("valid", "test"):  # small sets: every split gets at least one case
        if not any(p[2] == need for p in plan):
            count = {s: sum(p[2] == s for p in plan) for s, _ in SPLIT_SHARES}
            donor = max(count, key=lambda s: count[s])
            next(p for p in reversed(plan) if p[2] == donor)[2] = need
    return [(case, size, split) for case, size, split in plan]


def _csv(rows: list[list[object]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError([Problem(str(out), None, "exists and is not a folder; refusing to overwrite it")])
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(
            [
                Problem(
                    str(out),
                    None,
                    f"folder is not empty and is not a phantom data set (no {MARKER}); "
                    "refusing to overwrite it: choose a new or empty folder",
                )
            ]
        )


def write_phantom(out: str | Path, n: int = 240, seed: int = 0, image_size: int = 128) -> Path:
    """Write the phantom data set (ImageCLEF layout) to ``out`` atomically and return ``out``.

    ``out`` may be new, empty, or an earlier phantom set (replaced); anything else is refused.
    """
    if n < 3:
        raise ValueError(f"n must be at least 3 (one image per split), got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out = Path(out)
    _prepare_out(out)
    with atomic_dir(out) as tmp:
        _write_into(tmp, n, seed, image_size)
    return out


def _write_into(root: Path, n: int, seed: int, image_size: int) -> None:
    rng = np.random.default_rng(seed)
    plan = _plan(n, rng)
    captions: dict[str, list[list[object]]] = {s: [["ID", "Caption"]] for s, _ in SPLIT_SHARES}
    cuis: dict[str, list[list[object]]] = {s: [["ID", "CUIs"]] for s, _ in SPLIT_SHARES}
    meta: list[list[object]] = [
        [
            "ID",
            "case_id",
            "split",
            "modality",
            "plane",
            "region",
            "finding",
            "size",
            "density",
            "side",
            "level",
            "slice",
        ]
    ]
    counters = dict.fromkeys(captions, 0)
    for split in captions:
        (root / split).mkdir()
    for case_index, (case, slices, split) in enumerate(plan):
        text, cui = caption(case), ";".join(concepts(case))
        for s in range(slices):
            counters[split] += 1
            image_id = f"PHANTOM_{split}_{counters[split]:06d}"
            pixels = render(case, s, image_size, seed, case_index)
            buf = io.BytesIO()
            Image.fromarray(pixels, "L").save(buf, "JPEG", quality=JPEG_QUALITY)
            (root / split / f"{image_id}.jpg").write_bytes(buf.getvalue())
            captions[split].append([image_id, text])
            cuis[split].append([image_id, cui])
            meta.append(
                [
                    image_id,
                    case.case_id,
                    split,
                    case.modality,
                    "axial",
                    case.region,
                    case.finding,
                    case.size,
                    case.density,
                    case.side,
                    case.level,
                    s + 1,
                ]
            )
    for split in captions:
        (root / f"{split}_captions.csv").write_bytes(_csv(captions[split]))
        (root / f"{split}_concepts.csv").write_bytes(_csv(cuis[split]))
    (root / "cui_mapping.csv").write_bytes(_csv([["CUI", "Name"], *sorted(CUIS.values())]))
    (root / "metadata.csv").write_bytes(_csv(meta))
    info = {
        "generator": "medcap.data.phantom",
        "version": 1,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "images": counters,
        "cases": len(plan),
    }
    (root / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
