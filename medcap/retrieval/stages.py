"""The retrieval stages: embed every split, index the index split, find each query's neighbours.

``embed`` writes ``embeddings/ENCODER/SPLIT.npy`` (resumable chunks), ``index`` the FAISS index of
the index split (with ``retrieval.index.space: caption`` also ``ENCODER.projection.npz``, the
image -> caption-embedding map fitted on the index split, and the index over projected vectors), ``retrieve`` ``neighbours/SPLIT.jsonl`` (resumable): the k nearest index images of
every query image, never the image itself nor, with ``exclude_same_group``, an image of its case.
``train_encoder`` is ``medcap train encoder``: contrastive training of the encoder's projections.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.keys import key_settings
from medcap.models.hub import model_identity
from medcap.pipeline import Stage
from medcap.runs import Manifest, ResumableJsonl, safe_name

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

QUERY_CHUNK = 1024  # queries searched and written per batch (the resumable unit)
CROSSFIT_FOLDS = 5  # caption space: folds by case for the neighbours of the index split's own images


def sentence_model_of(pipe: Pipeline) -> Any:
    """The caption-space sentence encoder (MiniLM), loaded once per process."""
    from medcap.models.textenc import sentence_model

    return pipe.resource(("sentence-model",), sentence_model)


def projection_path(index_path: Path) -> Path:
    """The caption-space projection beside its index (a side file: borrowed and replaced with it)."""
    return index_path.with_name(index_path.stem + ".projection.npz")


def captions_path(index_path: Path) -> Path:
    """The caption embeddings the projection was fitted to (a side file of the index, reused by cross-fitting)."""
    return index_path.with_name(index_path.stem + ".captions.npz")


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    from medcap.files import write_atomic

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_atomic(path, buf.getvalue())


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    from medcap.files import write_atomic

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def projected_path(neighbours_path: Path) -> Path:
    """The queries' predicted caption embeddings beside their neighbours (caption space; ``.ids.json`` too)."""
    return neighbours_path.with_name(neighbours_path.stem + ".projected.npy")


def query_projections(pipe: Pipeline, split: str) -> tuple[list[str], np.ndarray]:
    """(IDs, predicted caption embeddings) of ``split``'s images as ``retrieve`` searched with them: fitted
    without the image's own fold when it belongs to the index split (cross-fitted), else the run's map."""
    import json

    out = projected_path(pipe.path("retrieve", split))
    return json.loads(out.with_suffix(".ids.json").read_text()), np.load(out)


def load_projection(pipe: Pipeline) -> Any:
    """The run's fitted projection (caption space), or None for image-space retrieval."""
    from medcap.retrieval.projection import Projection

    if pipe.cfg.retrieval.index.space != "caption":
        return None
    return Projection.load(projection_path(pipe.path("index")))


def crossfitted_split(pipe: Pipeline, split: str) -> bool:
    """True when ``split``'s caption-space neighbours are cross-fitted: every one of its images is an index image
    and it is training data (not a query split), e.g. the index split itself for a learned fuser."""
    if pipe.cfg.retrieval.index.space != "caption" or split in pipe.cfg.data.query_splits:
        return False
    index_ids = {ex.id for ex in pipe.split(pipe.cfg.data.index_split).examples}
    return all(ex.id in index_ids for ex in pipe.split(split).examples)


def check_projection_leak(pipe: Pipeline, split: str) -> bool:
    """Whether ``split``'s caption-space neighbours must be cross-fitted (:func:`crossfitted_split`); refuses a
    query split that shares images with the index (their own captions fitted the projection)."""
    if crossfitted_split(pipe, split):
        return True
    index_ids = {ex.id for ex in pipe.split(pipe.cfg.data.index_split).examples}
    shared = [ex.id for ex in pipe.split(split).examples if ex.id in index_ids]
    if shared:
        raise ValueError(
            f"split {split!r} shares {len(shared)} image(s) (e.g. {shared[0]!r}) with the index split "
            f"{pipe.cfg.data.index_split!r}, on whose captions the caption-space projection was fitted: their "
            "neighbours would be found with their own captions. Query a split outside the index (index train for "
            "valid figures; train+valid for a test split), or set retrieval.index.space=image"
        )
    return False


def encoder_of(pipe: Pipeline) -> Any:
    """The run's encoder, loaded once per process and shared by the stages that need it."""
    from medcap.retrieval.encoders import load_encoder

    enc = pipe.cfg.retrieval.encoder
    return pipe.resource(("encoder", enc.name, enc.pretrained, enc.revision), lambda: load_encoder(enc))


class Embed(Stage):
    name = "embed"
    command = "medcap embed CONFIG"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(split,) for split in pipe.splits]

    def path(self, pipe: Pipeline, split: str) -> Path:
        return pipe.run.embeddings(pipe.cfg.retrieval.encoder.name, split)

    def needs(self, pipe: Pipeline, split: str) -> list[tuple]:
        return [("embed", p) for p in pipe.parents(split)]  # a fold or a union: rows of its parents' arrays

    def settings(self, pipe: Pipeline, split: str) -> Any:
        from medcap.retrieval.encoders import encoder_identity

        enc = pipe.cfg.retrieval.encoder
        return key_settings(enc), encoder_identity(enc.name), model_identity(enc.pretrained), pipe.data_key(split)

    def make(self, pipe: Pipeline, out: Path, key: str, split: str) -> None:
        from medcap.retrieval.embed import embed_examples, load_embeddings, write_embeddings

        if pipe.parents(split):
            rows = {}
            for p in pipe.parents(split):
                ids, vectors = load_embeddings(pipe.path("embed", p))
                rows.update(zip(ids, vectors, strict=True))
            ids = [ex.id for ex in pipe.split(split).examples]
            write_embeddings(out, key, ids, np.stack([rows[i] for i in ids]))
            return
        enc = pipe.cfg.retrieval.encoder
        embed_examples(enc, pipe.split(split).examples, out, key, encoder=encoder_of(pipe))


class Index(Stage):
    name = "index"
    command = "medcap index CONFIG"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [()]

    def path(self, pipe: Pipeline) -> Path:
        return pipe.run.index(pipe.cfg.retrieval.encoder.name)

    def needs(self, pipe: Pipeline) -> list[tuple]:
        return [("embed", pipe.cfg.data.index_split)]

    def settings(self, pipe: Pipeline) -> Any:
        return key_settings(pipe.cfg.retrieval.index), "v2"  # v2: the fitted caption embeddings kept beside it

    def make(self, pipe: Pipeline, out: Path, key: str) -> None:
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.index import build_index, save_index

        cfg, split = pipe.cfg.retrieval.index, pipe.cfg.data.index_split
        emb = pipe.path("embed", split)
        ids, vectors = load_embeddings(emb)
        side = projection_path(out)
        if cfg.space == "caption":
            from medcap.retrieval.projection import caption_embeddings, fit_projection

            by_id = {ex.id: ex for ex in pipe.split(split).examples}
            rows = [k for k, i in enumerate(ids) if (by_id[i].caption or "").strip()]
            texts = caption_embeddings([by_id[ids[k]].caption for k in rows], sentence_model_of(pipe))
            projection = fit_projection(vectors[rows], texts, cfg.ridge)
            projection.save(side)
            _save_npz(captions_path(out), rows=np.asarray(rows, dtype=np.int64), texts=texts.astype(np.float32))
            vectors = projection(vectors)
        else:
            side.unlink(missing_ok=True)
        save_index(build_index(vectors, cfg), out)
        Manifest("index", key, complete=True, inputs=(str(emb),), count=len(ids)).write(out)


class Retrieve(Stage):
    name = "retrieve"
    command = "medcap retrieve CONFIG"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(split,) for split in pipe.cfg.data.query_splits]

    def path(self, pipe: Pipeline, split: str) -> Path:
        return pipe.run.neighbours(split)

    def needs(self, pipe: Pipeline, split: str) -> list[tuple]:
        return [("index",), ("embed", split), ("embed", pipe.cfg.data.index_split)]

    def settings(self, pipe: Pipeline, split: str) -> Any:
        r = pipe.cfg.retrieval
        # captions, concepts and cases of the index and the queries' cases come from the data; the seed cuts
        # the folds of cross-fitted neighbours (v2: the queries' projections kept beside the neighbours)
        seed = pipe.cfg.seed if crossfitted_split(pipe, split) else None
        return r.k, r.exclude_same_group, pipe.data_key(pipe.cfg.data.index_split), pipe.data_key(split), seed, "v2"

    def make(self, pipe: Pipeline, out: Path, key: str, split: str) -> None:
        from medcap.files import write_json
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.index import load_index
        from medcap.retrieval.neighbours import find_neighbours, neighbour_records

        r, index_split = pipe.cfg.retrieval, pipe.cfg.data.index_split
        index_path, emb = pipe.path("index"), pipe.path("embed", split)
        index_ids, index_vectors = load_embeddings(pipe.path("embed", index_split))
        query_ids, queries = load_embeddings(emb)
        projection = load_projection(pipe)
        index_examples = {ex.id: ex for ex in pipe.split(index_split).examples}
        query_groups = {ex.id: ex.group for ex in pipe.split(split).examples}
        groups = [index_examples[i].group for i in index_ids]
        searches = [(lambda: load_index(index_path, r.index), index_ids, groups, query_ids, queries)]
        if projection is not None:
            if check_projection_leak(pipe, split):
                searches = crossfit_searches(pipe, index_path, index_ids, index_vectors, query_ids, queries)
            else:
                searches = [(searches[0][0], index_ids, groups, query_ids, projection(queries))]
            side = projected_path(out)
            write_json(side.with_suffix(".ids.json"), [q for s in searches for q in s[3]])
            _save_npy(side, np.concatenate([s[4] for s in searches]).astype(np.float32))

        sink = ResumableJsonl(out, "retrieve", key, inputs=(str(index_path), str(emb)))
        for load, ids_, groups_, q_ids, q_vectors in searches:
            todo = [i for i, qid in enumerate(q_ids) if qid not in sink.done]
            if not todo:
                continue
            index = load()
            for start in range(0, len(todo), QUERY_CHUNK):
                rows = todo[start : start + QUERY_CHUNK]
                ids = [q_ids[i] for i in rows]
                hits = find_neighbours(
                    index, ids_, ids, q_vectors[rows], r.k,
                    index_groups=groups_,
                    query_groups=[query_groups.get(i) for i in ids],
                    exclude_same_group=r.exclude_same_group,
                )  # fmt: skip
                sink.write([n.to_json() for n in neighbour_records(hits, ids, index_examples)])
        sink.finish()


def crossfit_searches(pipe: Pipeline, index_path: Path, index_ids, index_vectors, query_ids, queries) -> list[tuple]:
    """Caption-space searches for queries that are index images, exactly as for a test image: the index split is
    cut into ``CROSSFIT_FOLDS`` folds by case; fold ``f``'s queries are projected by a map fitted on the other
    folds and searched in an index of the other folds projected by that map. Returns, per fold,
    (index loader, index IDs, their cases, query IDs, projected queries)."""
    from medcap.data.folds import group_folds
    from medcap.retrieval.index import build_index
    from medcap.retrieval.projection import fit_projection

    cfg = pipe.cfg.retrieval.index
    examples = {ex.id: ex for ex in pipe.split(pipe.cfg.data.index_split).examples}
    with np.load(captions_path(index_path)) as z:
        fitted, texts = z["rows"], z["texts"]
    text_of = dict(zip((index_ids[k] for k in fitted), texts, strict=True))
    folds = group_folds([(examples[i], None) for i in index_ids], CROSSFIT_FOLDS, pipe.cfg.seed)
    row = {i: k for k, i in enumerate(query_ids)}
    out = []
    for held in folds:
        held_set = set(held)
        rest = [k for k, i in enumerate(index_ids) if i not in held_set]
        fit_rows = [k for k in rest if index_ids[k] in text_of]
        projection = fit_projection(
            index_vectors[fit_rows], np.stack([text_of[index_ids[k]] for k in fit_rows]), cfg.ridge
        )
        ids = [index_ids[k] for k in rest]
        vectors = projection(index_vectors[rest])
        q = [i for i in held if i in row]
        out.append(
            (
                lambda v=vectors: build_index(v, cfg),
                ids,
                [examples[i].group for i in ids],
                q,
                projection(queries[[row[i] for i in q]]) if q else np.zeros((0, vectors.shape[1]), np.float32),
            )
        )
    return out


def train_encoder(pipe: Pipeline, out: Path | None = None) -> tuple[str, Path]:
    """Train the run's encoder projections on the index split's pairs; returns (``local-dir:`` name, folder).

    Validates on the first captioned query split (else on a 10% hold-out of captions). The image
    side is left as it is by default, so the cached embeddings and the index stay valid.
    """
    from medcap.retrieval.contrastive import train_encoder as fit
    from medcap.retrieval.embed import load_embeddings

    enc, t, data = pipe.cfg.retrieval.encoder, pipe.cfg.retrieval.encoder_training, pipe.cfg.data

    def pairs(split: str):
        by_id = {e.id: e for e in pipe.split(split).examples}
        ids, vectors = load_embeddings(pipe.make("embed", split))
        keep = [k for k, i in enumerate(ids) if (by_id[i].caption or "").strip()]
        return [by_id[ids[k]] for k in keep], [by_id[ids[k]].caption for k in keep], vectors[keep]

    images, captions, vectors = pairs(data.index_split)
    valid = next((p for s in data.query_splits if s != data.index_split and (p := pairs(s))[1]), None)
    folder = out or pipe.run.root / "models" / f"encoder-{safe_name(enc.name)}"
    name = fit(
        enc,
        images,
        captions,
        folder,
        image_embeddings=vectors,
        valid=valid,
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=t.seed,
        train_text_tower=t.train_text_tower,
        train_image_projection=t.train_image_projection,
    )
    return name, folder
