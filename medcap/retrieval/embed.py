"""Cached, resumable image embeddings: ``embeddings/ENCODER/SPLIT.npy`` (+ ``SPLIT.ids.json``).

The finished artifact is a float16 array with L2-normalised rows, in example order, and a
manifest with the cache key. While it is being made, each batch is saved as a chunk in
``SPLIT.partial/`` (``chunk-000007.npy`` + ``chunk-000007.ids.json``) under a manifest holding
the key, so a crash loses one batch: a rerun with the same key embeds only the missing IDs;
a rerun with another key starts afresh. A fresh artifact is returned without loading the encoder.
A batch that runs out of GPU memory is encoded in halves, and the smaller size is kept (``medcap.models.oom``).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import EncoderConfig
from medcap.files import write_atomic, write_json
from medcap.models.oom import HalvingBatches
from medcap.records import Example
from medcap.runs import Manifest, is_fresh

if TYPE_CHECKING:
    from PIL import Image

    from medcap.retrieval.encoders import Encoder

log = logging.getLogger(__name__)

STAGE = "embed"


def ids_path(out: Path) -> Path:
    """``SPLIT.ids.json`` beside ``SPLIT.npy``."""
    return out.with_name(out.stem + ".ids.json")


def partial_dir(out: Path) -> Path:
    """``SPLIT.partial/``: the chunks of an unfinished run."""
    return out.with_name(out.stem + ".partial")


def load_embeddings(out: Path) -> tuple[list[str], np.ndarray]:
    """The IDs and the float16 array of a finished embeddings artifact."""
    out = Path(out)
    ids = json.loads(ids_path(out).read_text())
    vectors = np.load(out)
    if len(ids) != len(vectors):
        raise ValueError(f"{out}: {len(vectors)} rows but {len(ids)} IDs in {ids_path(out)}")
    return ids, vectors


def embed_examples(
    encoder_cfg: EncoderConfig,
    examples: list[Example],
    out: Path,
    key: str,
    *,
    encoder: Encoder | None = None,
) -> tuple[list[str], np.ndarray]:
    """Embed the images of ``examples`` into ``out`` (cached by ``key``, resumable); return (IDs, vectors)."""
    out = Path(out)
    if is_fresh(out, key):
        log.info("%s: up to date", out)
        return load_embeddings(out)
    ids = [ex.id for ex in examples]
    _check_unique(ids)
    done = _load_chunks(partial_dir(out), key)
    todo = [ex for ex in examples if ex.id not in done]
    if done:
        log.info("%s: resuming, %d of %d IDs already embedded", out, len(ids) - len(todo), len(ids))
    if todo:
        if encoder is None:
            from medcap.retrieval.encoders import load_encoder

            encoder = load_encoder(encoder_cfg)
        _embed_into_chunks(encoder, encoder_cfg, todo, partial_dir(out), key, len(ids), done)
    vectors = _assemble(ids, done)
    write_embeddings(out, key, ids, vectors)
    return ids, vectors


def _check_unique(ids: list[str]) -> None:
    seen: set[str] = set()
    dupes = sorted({i for i in ids if i in seen or seen.add(i)})
    if dupes:
        raise ValueError(f"embed_examples: duplicate image IDs {dupes[:10]}")


# --------------------------------------------------------------------------- chunks


def _load_chunks(folder: Path, key: str) -> dict[str, np.ndarray]:
    """Vectors of finished chunks made with ``key``; a folder made with another key is removed."""
    manifest = Manifest.read(folder / "chunks")
    if manifest is None or manifest.key != key:
        if folder.exists():
            log.info("%s: made with other settings; starting afresh", folder)
            shutil.rmtree(folder)
        return {}
    done: dict[str, np.ndarray] = {}
    for npy in sorted(folder.glob("chunk-*.npy")):
        ids_file = npy.with_suffix(".ids.json")
        try:
            chunk_ids = json.loads(ids_file.read_text())
            vectors = np.load(npy)
        except (OSError, ValueError) as e:  # a chunk torn by a crash: embed those IDs again
            log.warning("%s: unreadable chunk (%s); its IDs will be embedded again", npy, e)
            continue
        if len(chunk_ids) != len(vectors):
            log.warning("%s: %d rows for %d IDs; ignored", npy, len(vectors), len(chunk_ids))
            continue
        done.update(zip(chunk_ids, vectors, strict=True))
    return done


def _save_chunk(folder: Path, number: int, ids: list[str], vectors: np.ndarray) -> None:
    """IDs first, then the array: a chunk counts only when its array exists."""
    stem = folder / f"chunk-{number:06d}"
    write_json(stem.with_suffix(".ids.json"), ids)
    write_atomic(stem.with_suffix(".npy"), _npy_bytes(vectors))


def _embed_into_chunks(
    encoder: Any,
    cfg: EncoderConfig,
    todo: list[Example],
    folder: Path,
    key: str,
    total: int,
    done: dict[str, np.ndarray],
) -> None:
    """Embed ``todo`` a batch at a time, saving each batch as a chunk and adding it to ``done``."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    Manifest(STAGE, key, complete=False).write(folder / "chunks")
    number = 1 + max((int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.npy")), default=-1)
    halving = HalvingBatches(cfg.batch_size, f"embed {cfg.name}", hint="lower retrieval.encoder.batch_size")
    with tqdm(total=total, initial=total - len(todo), desc=f"embed {folder.stem}", unit="img") as bar:
        for batch_ids, pixels in _batches(encoder.preprocess, todo, cfg.batch_size, cfg.num_workers):
            vectors = _to_float16(_encode(encoder, pixels, halving))
            _save_chunk(folder, number, batch_ids, vectors)
            done.update(zip(batch_ids, vectors, strict=True))
            number += 1
            bar.update(len(batch_ids))


def _encode(encoder: Any, pixels: Any, halving: HalvingBatches) -> np.ndarray:
    """Encode one loaded batch, in slices of ``halving.size`` rows (fewer after an out-of-memory error)."""

    def rows(part: range) -> list[np.ndarray]:
        return list(np.asarray(encoder.encode_pixels(pixels[part.start : part.stop])))

    return np.stack(halving.run(range(len(pixels)), rows))


def _assemble(ids: list[str], done: dict[str, np.ndarray]) -> np.ndarray:
    if not ids:
        return np.zeros((0, 0), dtype=np.float16)
    return np.stack([done[i] for i in ids]).astype(np.float16, copy=False)


def write_embeddings(out: Path, key: str, ids: list[str], vectors: np.ndarray) -> None:
    """Write a finished embeddings artifact (IDs, float16 array, manifest); drop the chunks of a partial run."""
    Manifest(STAGE, key, complete=False).write(out)  # an interrupted write is never taken as fresh
    write_json(ids_path(out), ids)
    write_atomic(out, _npy_bytes(vectors))
    Manifest(STAGE, key, complete=True, count=len(ids), info={"dim": int(vectors.shape[1])}).write(out)
    folder = partial_dir(out)
    if folder.exists():
        shutil.rmtree(folder)


def _to_float16(vectors: np.ndarray) -> np.ndarray:
    """Renormalise in float32, then store as float16."""
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v.astype(np.float16)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- image batches


def load_image(example: Example) -> Image.Image:
    """The RGB image of ``example``, through :func:`medcap.data.load_image` when it exists."""
    try:
        from medcap.data import load_image as data_load_image
    except ImportError:
        data_load_image = None
    if data_load_image is not None:
        return data_load_image(example)
    from PIL import Image

    if isinstance(example.image, bytes):
        return Image.open(io.BytesIO(example.image)).convert("RGB")
    if example.image is None:
        raise ValueError(f"image {example.id!r}: no image file or bytes")
    return Image.open(example.image).convert("RGB")


class _ImageDataset:
    """Decodes and preprocesses images (in DataLoader workers when ``num_workers`` > 0)."""

    def __init__(self, examples: list[Example], preprocess: Any):
        self.examples, self.preprocess = examples, preprocess

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[str, Any]:
        ex = self.examples[i]
        return ex.id, self.preprocess(load_image(ex))


def _batches(
    preprocess: Any, examples: list[Example], batch_size: int, num_workers: int
) -> Iterator[tuple[list[str], Any]]:
    """(IDs, stacked pixel tensor) per batch, in example order."""
    import torch

    dataset = _ImageDataset(examples, preprocess)
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=_collate
        )
        yield from loader
        return
    for start in range(0, len(dataset), batch_size):
        yield _collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def _collate(items: list[tuple[str, Any]]) -> tuple[list[str], Any]:
    import torch

    return [i for i, _ in items], torch.stack([p for _, p in items])
