"""ROCO-like data without images for ``bench/scale_fuse.py``: captions recombined from a sentence bank (real
MedPix 2.0 sentences, or template ones) within a body region, cases that share a caption, and image
embeddings near a low-dimensional subspace that follows the caption, so retrieval means something."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from pathlib import Path

DIM, LATENT = 512, 16  # embedding width; the subspace the captions' latents span


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

ORGANS = {
    "brain": ("frontal lobe", "temporal lobe", "cerebellum", "basal ganglia", "parietal lobe", "pons"),
    "chest": ("right upper lobe", "left lower lobe", "mediastinum", "hilum", "pleura", "lingula"),
    "abdomen": ("liver", "spleen", "pancreatic head", "right kidney", "gallbladder", "left adrenal gland"),
    "spine": ("L4 vertebral body", "cervical cord", "T12 level", "sacrum", "conus medullaris", "C5-C6 disc"),
    "pelvis": ("bladder", "prostate", "uterus", "right ovary", "acetabulum", "sigmoid colon"),
    "extremity": ("distal femur", "proximal tibia", "humeral head", "scaphoid", "calcaneus", "patella"),
}
MODALITIES = ("Axial CT", "Coronal CT", "Contrast-enhanced CT", "Axial T2-weighted MRI", "Sagittal T1 MRI",
              "FLAIR MRI", "Frontal radiograph", "Ultrasound")  # fmt: skip
FINDINGS = ("mass", "cystic lesion", "enhancing nodule", "fracture", "abscess", "hemorrhage", "calcification",
            "fluid collection", "infarct", "thickening")  # fmt: skip
EXTRAS = ("There is surrounding edema.", "No lymphadenopathy is seen.", "Findings are consistent with metastasis.",
          "There is mild mass effect.", "The remaining structures are unremarkable.", "Compare with prior imaging.",
          "Note the fluid-fluid level.", "There is no free air.", "Adjacent bone is intact.",
          "A small effusion is present.")  # fmt: skip


def synthetic_bank(seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    """Per region: (first sentences, other sentences), from templates."""
    import numpy as np

    rng = np.random.default_rng([seed, 1])
    bank = {}
    for region, parts in ORGANS.items():
        first = sorted(
            {
                f"{rng.choice(MODALITIES)} of the {region} shows a {rng.integers(1, 9)} cm {rng.choice(FINDINGS)} "
                f"in the {rng.choice(parts)}."
                for _ in range(400)
            }
        )
        other = sorted(
            {f"The {rng.choice(parts)} shows {rng.choice(FINDINGS)}." for _ in range(120)}
            | {f"No {rng.choice(FINDINGS)} in the {rng.choice(parts)}." for _ in range(120)}
            | set(EXTRAS)
        )
        bank[region] = (first, other)
    return bank


def medpix_bank(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per MedPix body region (``location_category``): (first sentences, other sentences) of its captions."""
    region = {}
    meta = folder / "metadata.csv"
    if meta.is_file():
        with open(meta, newline="") as f:
            region = {r["ID"]: r.get("location_category") or "all" for r in csv.DictReader(f)}
    bank: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted(folder.glob("*_captions.csv")):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                parts = [s.strip() for s in _SENTENCE_END.split((r.get("Caption") or "").strip()) if s.strip()]
                parts = [s for s in parts if len(s.split()) >= 3]
                if not parts:
                    continue
                first, other = bank.setdefault(region.get(r["ID"], "all"), (set(), set()))
                first.add(parts[0])
                other.update(parts[1:])
    return {k: (sorted(f), sorted(o | f)) for k, (f, o) in sorted(bank.items()) if len(f) >= 2}


def make_cases(
    bank: dict, n_images: int, seed: int, prefix: str, cases: str = "roco"
) -> tuple[list[tuple[str, str, str]], list]:
    """Images (ID, case, caption) and each image's sentence keys. ``cases="roco"``: one image per case and
    a caption of its own (ROCO / ImageCLEF: 80k images, 80k distinct captions); ``"medpix"``: cases of 1-4
    images that share a caption of 1-3 sentences."""
    import numpy as np

    if cases not in ("roco", "medpix"):
        raise ValueError(f"cases: {cases!r} is not one of roco | medpix")
    rng = np.random.default_rng([seed, 2, *prefix.encode()])  # the index and the queries draw apart
    if cases == "roco":
        return _distinct_captions(bank, n_images, rng, prefix)
    regions = sorted(bank)
    weights = np.array([len(bank[r][0]) for r in regions], dtype=np.float64)
    weights /= weights.sum()
    images, keys, c = [], [], 0
    while len(images) < n_images:
        region = regions[rng.choice(len(regions), p=weights)]
        first, other = bank[region]
        n = rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2])
        chosen = [first[rng.integers(len(first))]]
        for s in rng.permutation(len(other))[: n - 1]:
            if other[s] not in chosen:
                chosen.append(other[s])
        caption = " ".join(chosen)
        case = f"{prefix}c{c:07d}"
        for _ in range(rng.choice([1, 2, 3, 4], p=[0.5, 0.25, 0.15, 0.1])):
            images.append((f"{prefix}{len(images):07d}", case, caption))
            keys.append(tuple((region, s) for s in chosen))
        c += 1
    return images[:n_images], keys[:n_images]


def _distinct_captions(bank: dict, n_images: int, rng, prefix: str) -> tuple[list[tuple[str, str, str]], list]:
    """One image per case, captions of 2-3 sentences of one region, none repeated."""
    import numpy as np

    regions = sorted(bank)
    weights = np.array([len(bank[r][0]) for r in regions], dtype=np.float64)
    weights /= weights.sum()
    images, keys, seen, repeats = [], [], set(), 0
    while len(images) < n_images:
        region = regions[rng.choice(len(regions), p=weights)]
        first, other = bank[region]
        chosen = [first[rng.integers(len(first))]]
        for s in rng.permutation(len(other))[: rng.choice([1, 2], p=[0.6, 0.4])]:
            if other[s] not in chosen:
                chosen.append(other[s])
        caption = " ".join(chosen)
        if caption in seen:
            repeats += 1
            if repeats > 100 * n_images:
                raise ValueError(f"the sentence bank gives fewer than {n_images:,} distinct captions")
            continue
        seen.add(caption)
        images.append((f"{prefix}{len(images):07d}", f"{prefix}c{len(images):07d}", caption))
        keys.append(tuple((region, s) for s in chosen))
    return images, keys


def embeddings(keys: list, seed: int, kind: int):
    """Unit float16 vectors near a LATENT-dim subspace: the region's latent and the mean of the sentences',
    plus per-image jitter and off-subspace noise."""
    import numpy as np

    basis = np.linalg.qr(np.random.default_rng([seed, 3]).normal(size=(DIM, LATENT)))[0]  # shared by every split
    rng = np.random.default_rng([seed, 4, kind])
    latent: dict = {}

    def of(key) -> np.ndarray:
        if key not in latent:
            h = int.from_bytes(hashlib.blake2b("\0".join(key).encode(), digest_size=8).digest(), "little")
            latent[key] = np.random.default_rng([seed, 5, h]).normal(size=LATENT)
        return latent[key]

    z = np.stack([0.7 * of((ks[0][0], "")) + np.mean([of(k) for k in ks], axis=0) for ks in keys])  # region too
    z += 0.3 * rng.normal(size=z.shape) * np.linalg.norm(z, axis=1, keepdims=True) / math.sqrt(LATENT)
    v = z @ basis.T
    v += 0.3 * rng.normal(size=v.shape) * np.linalg.norm(v, axis=1, keepdims=True) / math.sqrt(DIM)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float16)
