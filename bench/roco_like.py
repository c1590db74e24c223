"""ROCO-like data without images for ``bench/scale_fuse.py``: captions recombined from a sentence bank (real
MedPix 2.0 sentences, or template ones) within a body region, cases that share a caption, and image
embeddings near a low-dimensional subspace that follows the caption, so retrieval means something."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDPIX = ROOT.parent / "shared" / "data" / "medpix2"
DIM, LATENT = 512, 16  # embedding width; the subspace the captions' latents span
INDEX, QUERY = "train", "valid"  # the index split and the query split of every run


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


# --------------------------------------------------------------------------- the data and runs of a benchmark


def profile_config(root: Path, data_root: Path, n: int, overrides: list[str]) -> dict:
    """medpix-cpu, on the data set of size ``n``, with the exact pool-MBR beside its fusers."""
    import yaml

    from medcap.configio import apply_overrides

    cfg = yaml.safe_load((ROOT / "medcap" / "profiles" / "medpix-cpu.yaml").read_text())
    cfg.pop("ablation", None)
    cfg["name"], cfg["runs_dir"] = f"n{n}", str(root / "runs")
    cfg["data"].update(root=str(data_root), index_split=INDEX, query_splits=[QUERY], verify_images=False)
    cfg["generators"] = [g for g in cfg["generators"] if g["kind"] in ("nearest", "consensus")]
    mbr_pool = next(f for f in cfg["fusers"] if f["name"] == "mbr-pool")
    cfg["fusers"].append({**mbr_pool, "name": "mbr-exact", "shortlist": None})
    if not any(f["name"] == "ranker" for f in cfg["fusers"]):  # the profile left it out (docs/results.md)
        ranker = {k: v for k, v in mbr_pool.items() if k not in ("name", "kind", "pool")}
        cfg["fusers"].append({**ranker, "name": "ranker", "kind": "ranker", "top": 32})
    cfg["eval"]["metrics"] = ["bertscore", "rouge1"]
    cfg["submit"]["caption_set"] = "mbr-pool"
    return apply_overrides(cfg, overrides)


def make_data(
    root: Path, sizes: list[int], queries: int, text: str, overrides: list[str], seed: int = 0, cases: str = "roco",
    medpix: Path = MEDPIX,
) -> None:  # fmt: skip
    """Captions, placeholder images and a config per size; embeddings written as each run's embed artifacts.
    Kept when already there (``--dir``); ``text="medpix"`` draws sentences from the captions in ``medpix``."""
    import yaml

    stamp = {"sizes": sizes, "queries": queries, "text": text, "cases": cases, "seed": seed, "set": overrides, "v": 1}
    if (root / "data.json").is_file() and json.loads((root / "data.json").read_text()) == stamp:
        print(f"# data: {root} (kept)", flush=True)
        return
    t0 = time.perf_counter()
    if text == "medpix":
        if not any(medpix.glob("*_captions.csv")):
            raise SystemExit(
                f"no MedPix captions in {medpix} (expected train_captions.csv, valid_captions.csv): "
                "rerun with --text synthetic for template sentences"
            )
        bank = medpix_bank(medpix)
    else:
        bank = synthetic_bank(seed)
    n_sent = sum(len(o) for _, o in bank.values())
    index, index_keys = make_cases(bank, max(sizes), seed, "i", cases)
    query, query_keys = make_cases(bank, queries, seed, "q", cases)
    vectors = {INDEX: embeddings(index_keys, seed, 0), QUERY: embeddings(query_keys, seed, 1)}
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    blank = images / "blank.jpg"
    if not blank.is_file():  # every image links to it: a new mtime would change every data key (all artifacts stale)
        Image.new("L", (1, 1)).save(blank, format="JPEG")
    for i, _, _ in index + query:
        link = images / f"{i}.jpg"
        if not link.is_symlink():
            link.symlink_to(blank.name)
    for n in sizes:
        data = root / "data" / f"n{n}"
        data.mkdir(parents=True, exist_ok=True)
        if not (data / "images").exists():
            (data / "images").symlink_to(images, target_is_directory=True)
        for split, rows in ((INDEX, index[:n]), (QUERY, query)):
            with open(data / f"{split}_captions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["ID", "Caption"])
                w.writerows([(i, cap) for i, _, cap in rows])
        with open(data / "metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ID", "case_id", "split"])
            w.writerows([(i, case, INDEX) for i, case, _ in index[:n]] + [(i, case, QUERY) for i, case, _ in query])
        cfg = profile_config(root, data, n, overrides)
        (root / f"n{n}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        write_embeddings(root / f"n{n}.yaml", {INDEX: (index[:n], vectors[INDEX][:n]), QUERY: (query, vectors[QUERY])})
    (root / "data.json").write_text(json.dumps(stamp))
    distinct = len({c for _, _, c in index})
    print(
        f"# data: {text} text, {n_sent:,} bank sentences in {len(bank)} regions; index {max(sizes):,} images "
        f"({distinct:,} distinct captions), {queries:,} queries; {time.perf_counter() - t0:.0f} s",
        flush=True,
    )


def write_embeddings(config: Path, splits: dict) -> None:
    """Each split's vectors as the run's embed artifact, under the key the embed stage expects."""
    from medcap.config import load_config
    from medcap.pipeline import Pipeline
    from medcap.retrieval.embed import write_embeddings as write

    pipe = Pipeline(load_config(config))
    for split, (rows, vectors) in splits.items():
        ids = [i for i, _, _ in rows]
        assert ids == [ex.id for ex in pipe.split(split).examples]
        write(pipe.path("embed", split), pipe.key("embed", split), ids, vectors)
